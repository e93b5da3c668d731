"""Engine vs transformers on CPU: output tokens/s on a mixed batch of requests.

    python -m bench.engine_cpu [--requests 32] [--seed 0] [--out bench/results/engine_cpu.json]

Writes a random `small` checkpoint (bf16 experts, so transformers needs no
dequantization), loads it in fp32 into both systems in this process, warms each
up on a tiny request, then times the same workload: seeded random prompts of
16..256 tokens and outputs of 16..128 tokens, greedy, EOS ignored. Throughput
counts only the requested output tokens (identical for both systems); padding
and the extra steps a batch runs for its longest member are transformers' cost.
transformers runs several batching strategies; the best is the baseline.
Timing runs in interleaved rounds (--repeats) and the best round counts: on a
shared host other work slows some rounds a lot (torch's OpenMP threads wait on
a descheduled peer), so medians and CPU seconds are recorded too.
Also: greedy parity of a few requests against transformers run alone (batch 1,
no padding), and the grammar mask cost (engine.grammar.measure_mask_cost).
"""

from __future__ import annotations

import argparse
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

import torch

from kernels._cli import at_least

PAD = 199999


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        plen, olen = rng.randint(16, 256), rng.randint(16, 128)
        out.append(([rng.randrange(199998) for _ in range(plen)], olen))
    return out


def run_engine(model, work, max_tokens_per_step: int) -> tuple[list[list[int]], float, float]:
    """-> (output ids per request, wall seconds, process CPU seconds) of one engine.generate."""
    from engine.core import EngineConfig, LLMEngine, output_tokens
    from engine.request import GenerateRequest
    from engine.sampler import SamplingParams
    need = sum(-(-(len(p) + o) // 16) for p, o in work)
    eng = LLMEngine(model, EngineConfig(block_size=16, num_blocks=need + 64, max_num_seqs=max(len(work), 1),
                                        max_tokens_per_step=max_tokens_per_step))
    reqs = [GenerateRequest(f"r{i}", p, SamplingParams(temperature=0, max_tokens=o, ignore_eos=True), harmony=False)
            for i, (p, o) in enumerate(work)]
    t0, c0 = time.perf_counter(), time.process_time()
    res = eng.generate(reqs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return [output_tokens(res[f"r{i}"]) for i in range(len(work))], wall, cpu


@torch.inference_mode()
def run_hf(model, work, batches: list[list[int]]) -> tuple[list[list[int]], float, float]:
    outs: list[list[int] | None] = [None] * len(work)
    t0, c0 = time.perf_counter(), time.process_time()
    for idx in batches:
        width = max(len(work[i][0]) for i in idx)
        new = max(work[i][1] for i in idx)
        ids = torch.full((len(idx), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding
            p = work[i][0]
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=PAD, temperature=None, top_p=None, top_k=None)
        for r, i in enumerate(idx):
            outs[i] = gen[r, width:width + work[i][1]].tolist()
    return outs, time.perf_counter() - t0, time.process_time() - c0


def hf_strategies(work) -> dict[str, list[list[int]]]:
    n = len(work)
    chunk = lambda order, b: [order[j:j + b] for j in range(0, n, b)]  # noqa: E731
    by_out = sorted(range(n), key=lambda i: work[i][1])
    return {"one batch of all": [list(range(n))],
            "batches of 8, sorted by output length": chunk(by_out, 8),
            "batches of 16, sorted by output length": chunk(by_out, 16)}


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    import transformers
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "python": platform.python_version()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=at_least(1), default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/engine_cpu.json")
    ap.add_argument("--max-tokens-per-step", type=at_least(1), default=512)
    ap.add_argument("--parity", type=at_least(0), default=4, help="requests checked against transformers at batch 1")
    ap.add_argument("--repeats", type=at_least(1), default=3, help="interleaved timing rounds; the best one counts")
    ap.add_argument("--mask-steps", type=at_least(1), default=64)
    ap.add_argument("--threads", type=at_least(0), default=0, help="torch threads (default: torch's own, one per core)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import GptOssForCausalLM as HFModel
    from transformers.utils import logging as hf_logging

    from engine.grammar import measure_mask_cost
    from models import load_model
    from models.checkpoint import make_checkpoint
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    work = workload(a.requests, a.seed)
    n_out = sum(o for _, o in work)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "small", "small", "hf", "bf16", seed=0, overwrite=True)
        ours = load_model(path, dtype=torch.float32)
        hf = HFModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    tiny = [(list(range(1000, 1008)), 4)]
    run_engine(ours, tiny, a.max_tokens_per_step)  # warm-up
    run_hf(hf, tiny, [[0]])

    # interleaved rounds, so load from other work on the host hits every system alike; best round counts
    strategies = hf_strategies(work)
    times: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    eng_key = ("engine", f"continuous batching, max_tokens_per_step={a.max_tokens_per_step}")
    hf_outs = {}
    for rep in range(a.repeats):
        eng_out, s, c = run_engine(ours, work, a.max_tokens_per_step)
        times.setdefault(eng_key, []).append(s)
        cpus.setdefault(eng_key, []).append(c)
        for name, batches in strategies.items():
            hf_outs[name], s, c = run_hf(hf, work, batches)
            times.setdefault(("transformers", name), []).append(s)
            cpus.setdefault(("transformers", name), []).append(c)
        print(f"round {rep + 1}/{a.repeats}, seconds (engine, then each transformers strategy): "
              + " ".join(f"{v[-1]:.1f}" for v in times.values()), flush=True)
    rows = [{"system": sy, "strategy": st, "seconds": min(ts), "tok_s": n_out / min(ts),
             "cpu_seconds": cpus[(sy, st)][ts.index(min(ts))],
             "median_tok_s": n_out / statistics.median(ts), "all_seconds": ts,
             "all_cpu_seconds": cpus[(sy, st)]} for (sy, st), ts in times.items()]
    best = max(rows[1:], key=lambda r: r["tok_s"])
    best_med = max(rows[1:], key=lambda r: r["median_tok_s"])
    ratio, ratio_med = rows[0]["tok_s"] / best["tok_s"], rows[0]["median_tok_s"] / best_med["median_tok_s"]
    for r in rows[1:]:
        r["matches_engine"] = sum(hf_outs[r["strategy"]][i] == eng_out[i] for i in range(len(work)))

    # parity: engine's batched greedy output vs transformers alone (batch 1, no padding), short to long
    parity, by_len = [], sorted(range(len(work)), key=lambda i: len(work[i][0]) + work[i][1])
    picks = sorted({by_len[round(j * (len(work) - 1) / max(a.parity - 1, 1))] for j in range(a.parity)},
                   key=by_len.index)
    for i in picks:
        ref = run_hf(hf, work, [[i]])[0]
        e, h = eng_out[i], ref[i]
        div = next((j for j in range(len(h)) if e[j] != h[j]), None)
        parity.append({"request": i, "prompt_len": len(work[i][0]), "output_len": work[i][1],
                       "match": div is None, "first_divergence": div})

    masks = {str(b): measure_mask_cost(b, a.mask_steps) for b in (1, 8, 32)}

    print(f"{len(work)} requests, {sum(len(p) for p, _ in work)} prompt tokens, {n_out} output tokens "
          f"(small preset, fp32, CPU, {torch.get_num_threads()} threads)")
    print(f"{'system':13} {'strategy':44} {'best s':>7} {'cpu s':>6} {'tok/s':>7} {'median':>7} {'same as engine':>14}")
    for r in rows:
        m = f"{r['matches_engine']}/{len(work)}" if "matches_engine" in r else ""
        print(f"{r['system']:13} {r['strategy']:44} {r['seconds']:7.2f} {r['cpu_seconds']:6.1f} {r['tok_s']:7.1f} "
              f"{r['median_tok_s']:7.1f} {m:>14}")
    print(f"engine / best transformers ({best['strategy']}): {ratio:.2f}x best-of-{a.repeats}, "
          f"{ratio_med:.2f}x by medians")
    print(f"greedy parity vs transformers batch 1: {sum(p['match'] for p in parity)}/{len(parity)} match: "
          + ", ".join(f"r{p['request']}({p['prompt_len']}+{p['output_len']})"
                      + ("" if p["match"] else f" diverges at {p['first_divergence']}") for p in parity))
    print("grammar mask cost, ms per token per sequence: "
          + ", ".join(f"batch {b}: {v:.3f}" for b, v in masks.items()))

    cmd = "python -m bench.engine_cpu " + " ".join(sys.argv[1:])
    result = {"command": cmd.strip(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": machine(), "preset": "small", "dtype": "float32", "requests": len(work), "seed": a.seed,
              "prompt_tokens": sum(len(p) for p, _ in work), "output_tokens": n_out,
              "workload": [{"prompt_len": len(p), "output_len": o} for p, o in work],
              "results": rows, "best_transformers": best["strategy"], "ratio_engine_vs_best_transformers": ratio,
              "ratio_by_medians": ratio_med, "repeats": a.repeats,
              "parity_batch1": parity, "grammar_mask_ms_per_token_per_seq": masks,
              "mask_steps": a.mask_steps}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
