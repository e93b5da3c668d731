"""Predicted outputs on CPU: an edit-style workload with and without its predictions.

    python -m bench.prediction [--requests 8] [--tokens 256] [--edits 4] [--batches 1,8] [--repeats 2]
                               [--out bench/results/prediction.json]

The task predicted outputs serve: re-emit a text with a few changes. On random weights the text a request
re-emits is its own greedy output: each request (random `small` checkpoint, fp32, a random 64..192-token
prompt, `--tokens` output tokens, EOS ignored) runs once without a prediction, and that output, with
`--edits` spans of 8 tokens replaced by other tokens, is its prediction. Then the same requests run, at each
batch size, without and with their predictions, interleaved over `--repeats` rounds (best round counts):
output tokens/s, engine steps, draft tokens accepted and rejected, and whether every output is the same.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import time
from pathlib import Path

import torch

from bench import small_model
from kernels._cli import at_least, counts


def run(model, reqs, batch: int):
    """All requests, `batch` at a time -> (outputs, seconds, steps, accepted, rejected)."""
    from engine.core import EngineConfig, LLMEngine, output_tokens
    outs, steps, acc, rej = {}, 0, 0, 0
    eng = LLMEngine(model, EngineConfig(block_size=16, num_blocks=2048, max_num_seqs=batch, max_tokens_per_step=2048))
    t0 = time.perf_counter()
    for r in reqs:
        eng.add_request(r)
    res: dict[str, list] = {r.request_id: [] for r in reqs}
    while eng.has_work():
        for o in eng.step():
            res[o.request_id].append(o)
        steps += 1
    wall = time.perf_counter() - t0
    for rid, os_ in res.items():
        outs[rid] = output_tokens(os_)
        acc += os_[-1].usage.accepted_prediction_tokens
        rej += os_[-1].usage.rejected_prediction_tokens
    return outs, wall, steps, acc, rej


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=at_least(1), default=8)
    ap.add_argument("--tokens", type=at_least(16), default=256)
    ap.add_argument("--edits", type=at_least(0), default=4)
    ap.add_argument("--batches", type=counts(), default=[1, 8])
    ap.add_argument("--repeats", type=at_least(1), default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/prediction.json")
    a = ap.parse_args()
    from engine.request import GenerateRequest
    from engine.sampler import SamplingParams
    model = small_model()
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(199998) for _ in range(rng.randint(64, 192))] for _ in range(a.requests)]

    def reqs(preds=None):
        return [GenerateRequest(f"r{i}", p, SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True),
                                harmony=False, prediction=preds[f"r{i}"] if preds else None)
                for i, p in enumerate(prompts)]
    want, *_ = run(model, reqs(), a.requests)
    preds = {}
    for rid, toks in want.items():
        p = list(toks)
        for start in rng.sample(range(0, a.tokens - 8, 8), a.edits):
            p[start:start + 8] = [rng.randrange(199998) for _ in range(8)]
        preds[rid] = p
    rows = []
    for batch in a.batches:
        best = {}
        for rep in range(a.repeats):
            for with_pred in (False, True):
                outs, wall, steps, acc, rej = run(model, reqs(preds if with_pred else None), batch)
                r = {"batch": batch, "prediction": with_pred, "seconds": wall, "steps": steps,
                     "tok_s": a.requests * a.tokens / wall, "accepted": acc, "rejected": rej,
                     "same_tokens": outs == want}
                print(f"batch {batch} {'with' if with_pred else 'without'} predictions, round {rep + 1}: "
                      f"{r['tok_s']:.1f} tok/s, {steps} steps, {acc} accepted, {rej} rejected, "
                      f"same tokens: {r['same_tokens']}", flush=True)
                if with_pred not in best or wall < best[with_pred]["seconds"]:
                    best[with_pred] = r
        rows += [best[False], best[True]]
        print(f"batch {batch}: {best[True]['tok_s'] / best[False]['tok_s']:.2f}x tok/s, "
              f"{best[False]['steps'] / best[True]['steps']:.2f}x fewer steps")
    cmd = "python -m bench.prediction " + " ".join(sys.argv[1:])
    result = {"command": cmd.strip(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "torch_threads": torch.get_num_threads(), "preset": "small", "dtype": "float32",
              "requests": a.requests, "tokens": a.tokens, "edits": a.edits, "repeats": a.repeats, "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
