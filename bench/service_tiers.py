"""What service tiers buy and cost: interactive requests arriving into a batch full of long flex work.

    python -m bench.service_tiers [--background 24] [--interactive 8] [--max-num-seqs 8] [--repeats 2]
                                  [--out bench/results/service_tiers.json]

One engine on a random `small` checkpoint (fp32, CPU) runs `--background` long requests (prompts of 64..256
tokens, 96..160 output tokens, greedy, EOS ignored) with at most `--max-num-seqs` in its batch, so most of
them queue. Every `--every` steps one short interactive request (32-token prompt, 16 output tokens) arrives.
The same arrivals run twice, interleaved over `--repeats` rounds:

- without tiers: every request on the default tier (first come, first served);
- with tiers: the background on flex, the interactive requests on priority.

Reported per run: the interactive requests' time to first token and end-to-end latency (median and max, from
the step they arrived in), the background's output tokens/s over the whole run, preemptions, and whether
every request's greedy tokens are the same in both runs (a preempted request is recomputed exactly).
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


def workload(a) -> tuple[list[tuple[list[int], int]], list[tuple[list[int], int]]]:
    rng = random.Random(a.seed)
    bg = [([rng.randrange(199998) for _ in range(rng.randint(64, 256))], rng.randint(96, 160))
          for _ in range(a.background)]
    fg = [([rng.randrange(199998) for _ in range(32)], 16) for _ in range(a.interactive)]
    return bg, fg


def run(model, bg, fg, a, tiers: bool) -> dict:
    from engine.core import EngineConfig, LLMEngine
    from engine.request import SERVICE_TIERS, GenerateRequest
    from engine.sampler import SamplingParams
    need = sum(-(-(len(p) + o) // 16) for p, o in bg + fg)
    eng = LLMEngine(model, EngineConfig(block_size=16, num_blocks=need + 64, max_num_seqs=a.max_num_seqs,
                                        max_tokens_per_step=512))

    def req(rid, p, o, tier):
        return GenerateRequest(rid, p, SamplingParams(temperature=0, max_tokens=o, ignore_eos=True), harmony=False,
                               priority=SERVICE_TIERS[tier if tiers else "default"])
    for i, (p, o) in enumerate(bg):
        eng.add_request(req(f"bg{i}", p, o, "flex"))
    arrive, first, end, toks = {}, {}, {}, {}
    step, t0 = 0, time.perf_counter()
    while eng.has_work() or len(arrive) < len(fg):
        if step % a.every == 0 and len(arrive) < len(fg):
            k = len(arrive)
            eng.add_request(req(f"fg{k}", *fg[k], "priority"))
            arrive[f"fg{k}"] = time.perf_counter()
        for out in eng.step():
            now = time.perf_counter()
            if out.token_ids:
                first.setdefault(out.request_id, now)
                toks.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                end[out.request_id] = now
        step += 1
    wall = time.perf_counter() - t0
    ttft = [first[r] - t for r, t in arrive.items()]
    e2e = [end[r] - t for r, t in arrive.items()]
    return {"tiers": tiers, "steps": step, "seconds": wall, "preemptions": eng.stats()["preemptions"],
            "interactive_ttft_s": {"median": statistics.median(ttft), "max": max(ttft)},
            "interactive_e2e_s": {"median": statistics.median(e2e), "max": max(e2e)},
            "background_tok_s": sum(o for _, o in bg) / (max(end[f"bg{i}"] for i in range(len(bg))) - t0),
            "tokens": toks}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--background", type=at_least(1), default=24)
    ap.add_argument("--interactive", type=at_least(1), default=8)
    ap.add_argument("--every", type=at_least(1), default=40, help="steps between interactive arrivals")
    ap.add_argument("--max-num-seqs", type=at_least(1), default=8)
    ap.add_argument("--repeats", type=at_least(1), default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/service_tiers.json")
    a = ap.parse_args()
    bg, fg = workload(a)
    model = small_model()
    rounds = []
    for rep in range(a.repeats):
        for tiers in (False, True):
            r = run(model, bg, fg, a, tiers)
            rounds.append(r)
            print(f"round {rep + 1} {'with' if tiers else 'without'} tiers: interactive TTFT median "
                  f"{r['interactive_ttft_s']['median']:.2f} s max {r['interactive_ttft_s']['max']:.2f} s, e2e median "
                  f"{r['interactive_e2e_s']['median']:.2f} s; background {r['background_tok_s']:.1f} tok/s; "
                  f"{r['preemptions']} preemptions; {r['seconds']:.1f} s", flush=True)
    same = all(r["tokens"] == rounds[0]["tokens"] for r in rounds)
    print(f"every request's greedy tokens the same in every run: {same}")
    best = {t: min((r for r in rounds if r["tiers"] == t), key=lambda r: r["seconds"]) for t in (False, True)}
    for r in rounds:
        del r["tokens"]
    cmd = "python -m bench.service_tiers " + " ".join(sys.argv[1:])
    result = {"command": cmd.strip(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "nproc": torch.get_num_threads(), "preset": "small", "dtype": "float32",
              "background": a.background, "interactive": a.interactive, "every": a.every,
              "max_num_seqs": a.max_num_seqs, "same_tokens": same, "rounds": rounds,
              "ttft_median_ratio": best[False]["interactive_ttft_s"]["median"]
              / best[True]["interactive_ttft_s"]["median"],
              "background_tok_s_ratio": best[True]["background_tok_s"] / best[False]["background_tok_s"]}
    print(f"interactive TTFT median, without / with tiers: {result['ttft_median_ratio']:.1f}x; background tok/s, "
          f"with / without: {result['background_tok_s_ratio']:.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
