"""The serving stack's cost: the same workload through HTTP + Ray Serve vs the engine alone.

    python -m bench.http_vs_engine [--preset small] [--requests 32] [--rounds 2] [--stream] [--replica-threads N]
                                   [--out bench/results/http_vs_engine.json]

Both sides run one replica group of one rank on the same random checkpoint,
with the same engine config, on seeded token-id prompts (16..256 tokens) and
fixed output lengths (16..128 tokens, EOS ignored, greedy), all requests
submitted at once. The engine side is `AsyncEngine` in this process; the HTTP
side is the real app (`deployments.serve_app`) on a local Ray, called with the
`openai` SDK (AsyncOpenAI, streaming /v1/completions). Rounds alternate
(engine, HTTP, engine, HTTP...) and the best round of each counts.
Reported: output tokens/s of each and their ratio; time to first token of a
lone request on an idle system (median of 10) on each side, and the difference
(what the stack adds).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

PORT = 8799


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(199998) for _ in range(rng.randint(16, 256))], rng.randint(16, 128)) for _ in range(n)]


def engine_config(work):
    from engine.core import EngineConfig
    need = sum(-(-(len(p) + o) // 16) for p, o in work)
    return EngineConfig(block_size=16, num_blocks=need + 64, max_num_seqs=max(len(work), 1),
                        max_tokens_per_step=512, enable_prefix_cache=False)


async def engine_round(eng, work, tag: str) -> tuple[float, int]:
    from engine.request import GenerateRequest
    from engine.sampler import SamplingParams

    async def one(i, p, o):
        n = 0
        req = GenerateRequest(f"{tag}-{i}", p, SamplingParams(temperature=0, max_tokens=o, ignore_eos=True),
                              harmony=False)
        async for out in eng.generate(req):
            n += len(out.token_ids)
        return n
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p, o) for i, (p, o) in enumerate(work)))
    return time.perf_counter() - t0, sum(counts)


async def http_round(client, work, stream: bool = False) -> tuple[float, int]:
    async def one(p, o):
        if not stream:
            r = await client.completions.create(model="bench", prompt=p, max_tokens=o, temperature=0,
                                                extra_body={"ignore_eos": True})
            return r.usage.completion_tokens
        n = 0
        s = await client.completions.create(model="bench", prompt=p, max_tokens=o, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
        async for chunk in s:
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        return n
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(p, o) for p, o in work))
    return time.perf_counter() - t0, sum(counts)


async def engine_ttft(eng, prompt, k: int) -> float:
    from engine.request import GenerateRequest
    from engine.sampler import SamplingParams
    ts = []
    for i in range(k):
        t0 = time.perf_counter()
        gen = eng.generate(GenerateRequest(f"ttft-{i}", prompt, SamplingParams(temperature=0, max_tokens=1),
                                           harmony=False))
        async for _ in gen:
            ts.append(time.perf_counter() - t0)
            break
        await gen.aclose()
    return statistics.median(ts)


async def http_ttft(client, prompt, k: int) -> float:
    ts = []
    for _ in range(k):
        t0 = time.perf_counter()
        stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=1, stream=True)
        async for _ in stream:
            ts.append(time.perf_counter() - t0)
            break
        await stream.close()
    return statistics.median(ts)


async def run(args, ckpt: Path) -> dict:
    import openai
    import ray
    import torch
    from ray import serve

    from cluster.config import ModelGroupConfig, ServeConfig
    from deployments.serve_app import build_application
    from engine.async_engine import AsyncEngine
    from engine.core import LLMEngine
    from models import load_model

    work = workload(args.requests, args.seed)
    cfg_engine = engine_config(work)
    threads = torch.get_num_threads()
    eng = AsyncEngine(LLMEngine(load_model(ckpt, torch.float32), cfg_engine))
    await engine_round(eng, work[:2], "warm")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=(os.cpu_count() or 2) + 1, include_dashboard=False,  # + the ingress and proxy
             runtime_env={"env_vars": {k: os.environ[k] for k in ("TIKTOKEN_ENCODINGS_BASE",) if k in os.environ}})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    group = ModelGroupConfig(name="bench", path=str(ckpt), cpus_per_rank=float(args.replica_threads or threads),
                             engine=cfg_engine,
                             max_pending=args.requests * 2)
    serve.run(build_application(ServeConfig(port=PORT, models=[group])), name="bench", route_prefix="/")
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="x", max_retries=0, timeout=600)
    await http_round(client, work[:2])

    rounds = {"engine": [], "http": [], **({"http_stream": []} if args.stream else {})}
    try:
        for r in range(args.rounds):
            rounds["engine"].append(await engine_round(eng, work, f"r{r}"))
            rounds["http"].append(await http_round(client, work))
            if args.stream:
                rounds["http_stream"].append(await http_round(client, work, stream=True))
        prompt = work[0][0][:64]
        ttft = {"engine": await engine_ttft(eng, prompt, 10), "http": await http_ttft(client, prompt, 10)}
    finally:
        eng.shutdown()
        serve.shutdown()
        ray.shutdown()
    best = {k: max(n / w for w, n in v) for k, v in rounds.items()}
    return {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "preset": args.preset, "requests": args.requests, "torch_threads": threads,
        "replica_threads": args.replica_threads or threads,
        "output_tokens": rounds["engine"][0][1],
        "rounds": {k: [{"seconds": round(w, 3), "tok_per_s": round(n / w, 1)} for w, n in v] for k, v in rounds.items()},
        "engine_tok_per_s": round(best["engine"], 1), "http_tok_per_s": round(best["http"], 1),
        "ratio": round(best["http"] / best["engine"], 3),
        **({"http_stream_tok_per_s": round(best["http_stream"], 1),
            "stream_ratio": round(best["http_stream"] / best["engine"], 3)} if args.stream else {}),
        "ttft_engine_ms": round(ttft["engine"] * 1e3, 1), "ttft_http_ms": round(ttft["http"] * 1e3, 1),
        "ttft_added_ms": round((ttft["http"] - ttft["engine"]) * 1e3, 1),
        "command": "python -m bench.http_vs_engine " + " ".join(sys.argv[1:]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.http_vs_engine", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", action="store_true", help="also time the HTTP side with streaming (SSE) responses")
    p.add_argument("--replica-threads", type=int, default=0,
                   help="torch threads of the replica group (default: this process's, as the engine side)")
    p.add_argument("--out", default="bench/results/http_vs_engine.json")
    args = p.parse_args(argv)
    if args.requests < 1 or args.rounds < 1:
        p.error("--requests and --rounds must be >= 1")
    from models.checkpoint import make_checkpoint
    with tempfile.TemporaryDirectory() as d:
        ckpt = make_checkpoint(Path(d) / args.preset, args.preset, "hf", "mxfp4", seed=args.seed)
        res = asyncio.run(run(args, ckpt))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
