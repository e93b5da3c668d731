"""The floor under flex (EngineConfig.flex_promote_s): flex work under a default load that never lets up.

    python -m bench.flex_floor [--seconds 60] [--floor 10] [--flex 8] [--max-num-seqs 8]
                               [--out bench/results/flex_floor.json]

One engine on a random `small` checkpoint (fp32, CPU), at most `--max-num-seqs` in its batch. `--flex` flex
requests arrive first; from then on default requests keep another batch's worth queued for `--seconds`
(each: 64-token prompt, 32 output tokens, greedy, EOS ignored). The same run with no floor
(flex_promote_s 0) and with `--floor` seconds. Reported: how many flex requests finished within the run
and their latency, and the default requests' output tokens/s and latency (what the floor costs them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import small_model
from kernels._cli import at_least


def run(model, a, promote_s: float) -> dict:
    from engine.core import EngineConfig, LLMEngine
    from engine.request import SERVICE_TIERS, GenerateRequest
    from engine.sampler import SamplingParams
    rng = random.Random(a.seed)
    eng = LLMEngine(model, EngineConfig(block_size=16, num_blocks=4096, max_num_seqs=a.max_num_seqs,
                                        max_tokens_per_step=512, flex_promote_s=promote_s))

    def add(rid, tier):
        prompt = [rng.randrange(199998) for _ in range(64)]
        eng.add_request(GenerateRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                                        harmony=False, priority=SERVICE_TIERS[tier]))
        arrive[rid] = time.perf_counter()
    arrive, end = {}, {}
    for i in range(a.flex):
        add(f"flex{i}", "flex")
    n, t0, default_tokens = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < a.seconds:
        while eng.stats()["waiting_by_tier"].get("default", 0) < a.max_num_seqs:
            add(f"d{n}", "default")
            n += 1
        for out in eng.step():
            if out.request_id.startswith("d"):
                default_tokens += len(out.token_ids)
            if out.finished:
                end[out.request_id] = time.perf_counter()
    wall = time.perf_counter() - t0
    flex = [end[r] - arrive[r] for r in end if r.startswith("flex")]
    dflt = [end[r] - arrive[r] for r in end if r.startswith("d")]
    return {"flex_promote_s": promote_s, "seconds": wall, "flex_finished": len(flex),
            "flex_latency_s": {"median": statistics.median(flex), "max": max(flex)} if flex else None,
            "default_finished": len(dflt), "default_tok_s": default_tokens / wall,
            "default_latency_s": {"median": statistics.median(dflt),
                                  "p90": statistics.quantiles(dflt, n=10)[-1]} if len(dflt) > 1 else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--floor", type=float, default=10.0, help="flex_promote_s of the run with the floor")
    ap.add_argument("--flex", type=at_least(1), default=8)
    ap.add_argument("--max-num-seqs", type=at_least(1), default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/flex_floor.json")
    a = ap.parse_args()
    model = small_model()
    runs = []
    for promote_s in (0.0, a.floor):
        r = run(model, a, promote_s)
        runs.append(r)
        lat = r["flex_latency_s"]
        print(f"flex_promote_s {promote_s:g}: flex finished {r['flex_finished']}/{a.flex}"
              + (f" (latency median {lat['median']:.1f} s, max {lat['max']:.1f} s)" if lat else "")
              + f"; default {r['default_tok_s']:.1f} tok/s, latency median {r['default_latency_s']['median']:.2f} s"
              f" p90 {r['default_latency_s']['p90']:.2f} s", flush=True)
    cmd = "python -m bench.flex_floor " + " ".join(sys.argv[1:])
    result = {"command": cmd.strip(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "nproc": torch.get_num_threads(), "preset": "small", "dtype": "float32", "flex": a.flex,
              "max_num_seqs": a.max_num_seqs, "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
