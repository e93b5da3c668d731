"""Host time per engine step outside the model and the sampler, by decode batch size.

    python -m bench.engine_overhead [--batches 1,8,64,256] [--context 1024] [--steps 50]

On a GPU a decode step is a CUDA-graph replay plus this host time (scheduling,
batch building, output handling, block bookkeeping) unless the two overlap, so
it bounds the step rate: 430 tok/s at batch 1 leaves 2.3 ms for the whole step.
Measured on CPU with the tiny model as the time inside the engine's own parts of
a step (scheduler.schedule, _build_step, _sampling_batch, _update), which is
what stays on the host on any device. Greedy raw requests with ignore_eos, so
every sequence decodes for the whole measurement.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def measure(batch: int, context: int, steps: int, warmup: int = 3) -> dict:
    from bench.gpu import engine, requests
    from models import load_model
    from models.checkpoint import RandomCheckpoint
    model = load_model(RandomCheckpoint("tiny"), dtype=torch.float32)
    eng = engine(model, batch, context + steps + warmup + 8, max(8192, batch))
    parts = {"schedule": 0.0, "build": 0.0, "sampling_batch": 0.0, "update": 0.0}

    def timed(fn, part):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                parts[part] += time.perf_counter() - t0
        return wrapper

    eng.scheduler.schedule = timed(eng.scheduler.schedule, "schedule")
    eng._build_step = timed(eng._build_step, "build")
    eng._sampling_batch = timed(eng._sampling_batch, "sampling_batch")
    eng._update = timed(eng._update, "update")
    for r in requests(batch, context, steps + warmup + 4, seed=batch):
        eng.add_request(r)
    while any(s.num_computed < s.prompt_len for ss in eng.seqs.values() for s in ss):
        eng.step()
    for _ in range(warmup):
        eng.step()
    parts.update(dict.fromkeys(parts, 0.0))
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    wall = (time.perf_counter() - t0) / steps
    host = sum(parts.values()) / steps
    return {"batch": batch, "context": context, "host_ms_per_step": host * 1e3, "wall_ms_per_step": wall * 1e3,
            "host_us_per_sequence": host * 1e6 / batch, **{f"{k}_ms": v * 1e3 / steps for k, v in parts.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args(argv)
    from bench.gpu import find_vocab
    find_vocab()
    torch.set_num_threads(1)
    print("| batch | context | host ms/step | host us/sequence | schedule / build / sampling batch / update ms |")
    print("|---:|---:|---:|---:|---|")
    for b in (int(x) for x in a.batches.split(",")):
        r = measure(b, a.context, a.steps)
        split = " / ".join(f"{r[k + '_ms']:.2f}" for k in ("schedule", "build", "sampling_batch", "update"))
        print(f"| {r['batch']} | {r['context']} | {r['host_ms_per_step']:.2f} | {r['host_us_per_sequence']:.1f} "
              f"| {split} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
