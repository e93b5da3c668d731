"""What running requests as a batch costs against sending them yourself.

    python -m bench.batches [--requests 32] [--max-tokens 32] [--repeats 2] [--out bench/results/batches.json]

The app on a local Ray Serve (one replica group on a random `small` checkpoint, fp32, CPU; the ingress, the
batch store replica). The same `--requests` chat requests (greedy, EOS ignored) run, interleaved over
`--repeats` rounds:

- direct: a client sends them all at once over HTTP (one thread a request, the openai SDK);
- batch: the client uploads them as a JSONL file, creates a batch and polls it every 250 ms until it is
  completed; the batch runner sends each line through the app's own ASGI interface (the flex tier).

Reported: wall time (direct: first send to last answer; batch: create to `completed` seen), output tokens/s,
and whether every request's text is the same both ways.

With `--interactive N`, then, what a batch leaves interactive traffic: N short requests (one output token, the
default tier; one every 0.5 s, each timed from send to answer) sent while a background of `--requests`
long requests (`--background-tokens` each) fills a group of `--max-num-seqs` 16, three ways: no background;
the background as a batch (its lines on the flex tier); the same background sent directly (default tier).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kernels._cli import at_least

PORT = 8766
POLL_S = 0.25  # each poll is CPU work in the proxy, ingress and store: on a small host, work taken from the engine


def bodies(a) -> list[dict]:
    return [{"model": "m", "messages": [{"role": "user", "content": f"Tell me about item number {i}."}],
             "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True} for i in range(a.requests)]


def direct(client, reqs: list[dict]) -> tuple[float, list[str], int]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(reqs)) as pool:
        outs = list(pool.map(lambda b: client.chat.completions.create(
            **{k: v for k, v in b.items() if k != "ignore_eos"}, extra_body={"ignore_eos": True}), reqs))
    wall = time.perf_counter() - t0
    return wall, [o.choices[0].message.content for o in outs], sum(o.usage.completion_tokens for o in outs)


def batch(client, reqs: list[dict]) -> tuple[float, list[str], int]:
    lines = [{"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions", "body": b}
             for i, b in enumerate(reqs)]
    f = client.files.create(file=("in.jsonl", io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())),
                            purpose="batch")
    t0 = time.perf_counter()
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while b.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(POLL_S)
        b = client.batches.retrieve(b.id)
    wall = time.perf_counter() - t0
    assert b.status == "completed" and b.request_counts.completed == len(reqs), b
    out = sorted((json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()),
                 key=lambda x: int(x["custom_id"]))
    return wall, [x["response"]["body"]["choices"][0]["message"]["content"] for x in out], b.usage.output_tokens


def probe(client, n: int) -> list[float]:
    """Latencies of `n` one-token interactive requests sent 0.5 s apart (each on its own, not after the
    previous one's answer: all of them arrive while a background runs)."""
    def one(i: int) -> float:
        time.sleep(0.5 * i)
        t0 = time.perf_counter()
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"Quick {i}?"}],
                                       max_tokens=1, temperature=0)
        return time.perf_counter() - t0
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def interference(client, a) -> dict:
    """Interactive latency with no background, a batch background and a direct one (see the docstring)."""
    bg = [{**b, "max_tokens": a.background_tokens} for b in bodies(a)]
    res = {"none": probe(client, a.interactive)}
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(batch, client, bg)
        time.sleep(3.0)  # the batch's lines are in the engine
        res["batch"] = probe(client, a.interactive)
        run.result()
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(direct, client, bg)
        time.sleep(3.0)
        res["direct"] = probe(client, a.interactive)
        run.result()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=at_least(1), default=32)
    p.add_argument("--max-tokens", type=at_least(1), default=32)
    p.add_argument("--repeats", type=at_least(0), default=2, help="rounds of the throughput comparison (0: none)")
    p.add_argument("--interactive", type=int, default=0, help="then measure N interactive requests' latency "
                                                             "beside a background (0: not)")
    p.add_argument("--background-tokens", type=at_least(1), default=128)
    p.add_argument("--max-num-seqs", type=at_least(1), default=None,
                   help="the group's batch (default: --requests; 16 suits --interactive)")
    p.add_argument("--out", default=None, help="JSON results file (default: none)")
    a = p.parse_args(argv)
    import os

    import openai
    import ray
    from ray import serve

    from cluster.config import ModelGroupConfig, ServeConfig
    from deployments.serve_app import build_application
    from engine.core import EngineConfig
    from models.checkpoint import make_checkpoint
    runs: dict[str, list] = {"direct": [], "batch": []}
    texts: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "small", "small", "hf", "mxfp4", seed=0)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=(os.cpu_count() or 2) + 1, include_dashboard=False,  # + the ingress and proxy
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("TIKTOKEN_ENCODINGS_BASE",)
                                           if k in os.environ}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": PORT})
            group = ModelGroupConfig(name="m", path=str(ckpt), cpus_per_rank=float(torch.get_num_threads()),
                                     engine=EngineConfig(max_model_len=1024, num_blocks=1024,
                                                         max_num_seqs=a.max_num_seqs or a.requests))
            serve.run(build_application(ServeConfig(port=PORT, models=[group])), name="bench", route_prefix="/")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="x", max_retries=0, timeout=600)
            direct(client, bodies(a)[:2])  # warm-up: first-call costs out of the figures
            if a.interactive:
                probe(client, 2)
            for _ in range(a.repeats):
                for name, fn in (("direct", direct), ("batch", batch)):
                    wall, out, toks = fn(client, bodies(a))
                    runs[name].append({"wall_s": wall, "output_tokens": toks})
                    texts.setdefault(name, out)
                    print(f"{name:6s} {wall:6.2f} s  {toks / wall:7.1f} output tok/s", file=sys.stderr)
            lat = interference(client, a) if a.interactive else {}
        finally:
            serve.shutdown()
            ray.shutdown()
    runs = {k: v for k, v in runs.items() if v}  # none with --repeats 0
    summary = {name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                      "output_tok_s": statistics.median(r["output_tokens"] / r["wall_s"] for r in rs)}
               for name, rs in runs.items()}
    same = texts.get("direct") == texts.get("batch")
    ratio = summary["batch"]["output_tok_s"] / summary["direct"]["output_tok_s"] if summary else None
    if summary:
        print("| way | wall s (median) | output tok/s |\n|---|---:|---:|\n" + "\n".join(
            f"| {n} | {s['wall_s']:.2f} | {s['output_tok_s']:.1f} |" for n, s in summary.items()))
        print(f"\nbatch / direct throughput: {ratio:.3f}; same texts: {same}")
    if lat:
        print("\n| background | interactive latency median | max |\n|---|---:|---:|\n" + "\n".join(
            f"| {k} | {statistics.median(v):.3f} s | {max(v):.3f} s |" for k, v in lat.items()))
    if a.out:
        Path(a.out).write_text(json.dumps({
            "command": "python -m bench.batches " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "args": vars(a), "runs": runs, "summary": summary, "ratio": ratio, "same_texts": same,
            "interactive_latency_s": lat}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
