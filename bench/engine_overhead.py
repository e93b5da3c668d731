"""Host time per engine step outside the model and the sampler, by decode batch size.

    python -m bench.engine_overhead [--batches 1,8,64,256] [--context 1024] [--steps 50]
    python -m bench.engine_overhead --ranks 2x2 [--batches 1,8,64] [--steps 20] [--combine]
    python -m bench.engine_overhead --ranks 1x2 --attn-dp [--context 1024]

On a GPU a decode step is a CUDA-graph replay plus this host time (scheduling,
batch building, output handling, block bookkeeping) unless the two overlap, so
it bounds the step rate: 430 tok/s at batch 1 leaves 2.3 ms for the whole step.
Measured on CPU with the tiny model as the time inside the engine's own parts of
a step (scheduler.schedule, _build_step, _sample_spec, _update), which is
what stays on the host on any device. Greedy raw requests with ignore_eos, so
every sequence decodes for the whole measurement.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kernels._cli import at_least, counts, tp_x_ep


def measure(batch: int, context: int, steps: int, warmup: int = 3) -> dict:
    from bench.gpu_measure import engine, requests
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
    eng._sample_spec = timed(eng._sample_spec, "sampling_batch")
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


def measure_ranks(workers, batch: int, steps: int, sample_on_rank: bool, overlap: bool = False,
                  context: int = 8) -> dict:
    """Decode ms per step of an engine over rank workers, and the pickled bytes rank 0 sends back
    per step: sampled token ids (sample_on_rank) or the [batch, vocab] logits (the engine samples);
    with `overlap`, each step is sent before the previous one's reply is read. Under attention data
    parallelism (workers.attn_dp) also the most KV blocks one attention group held."""
    import pickle

    from bench.gpu_measure import requests
    from engine.core import EngineConfig, LLMEngine
    from parallel.worker import MultiProcessExecutor
    step_tokens = max(batch, 64, min(batch * context, 4096))
    # every sequence still decodes when the last prompt is in: the first ones decode during the prefill
    out_len = steps + 12 + -(-batch * context // step_tokens)
    per_seq = -(-(context + out_len) // 16) + 1
    cfg = EngineConfig(block_size=16, num_blocks=batch * per_seq + 8, max_num_seqs=batch,
                       max_tokens_per_step=step_tokens, overlap_scheduling=overlap,
                       max_model_len=context + out_len + 16)
    dp = workers.layout[0].dp if workers.attn_dp else 1
    eng = LLMEngine(None, cfg, model_config=workers.config, data_parallel=dp,
                    executor_factory=lambda spec: MultiProcessExecutor(workers, spec, sample_on_rank))
    sizes, real = [], workers.collect

    def collect(ticket, timeout=None):
        out = real(ticket, timeout)
        if ticket in ("step", "step_sampled"):
            sizes.append(len(pickle.dumps(out[0])))
        return out
    workers.collect = collect
    try:
        for r in requests(batch, context, out_len, seed=batch):
            eng.add_request(r)
        while any(s.num_computed < s.prompt_len for ss in eng.seqs.values() for s in ss):
            eng.step()
        for _ in range(4):
            eng.step()
        sizes.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        groups = getattr(eng.blocks, "groups", [eng.blocks])
        return {"ms_per_step": (time.perf_counter() - t0) * 1e3 / steps, "bytes_back": sum(sizes) / len(sizes),
                "kv_blocks_per_rank": max(g.usage()["full_used"] for g in groups)}
    finally:
        workers.collect = real
        for rid in list(eng.seqs):
            eng.abort(rid)
        while eng.has_work():  # the step in flight
            eng.step()


def ranks_table(tp: int, ep: int, batches: list[int], steps: int, rounds: int = 2) -> None:
    import tempfile
    from pathlib import Path

    from models.checkpoint import make_checkpoint

    from parallel.worker import RankWorkers, WorkerSpec
    with tempfile.TemporaryDirectory() as d:
        path = make_checkpoint(Path(d) / "tiny", "tiny", "hf", "mxfp4", seed=0)
        workers = RankWorkers(WorkerSpec(str(path), tp, ep))
        try:
            print("| batch | logits back, lockstep: ms/step | token ids back, lockstep | token ids back, overlapped "
                  "| speedup (overlapped vs logits) | bytes back per step (logits / token ids) |")
            print("|---:|---:|---:|---:|---:|---|")
            modes = {"logits": (False, False), "ids": (True, False), "overlap": (True, True)}
            for b in batches:
                best = {}
                for _ in range(rounds):  # interleaved, best of `rounds`
                    for name, (on_rank, overlap) in modes.items():
                        r = measure_ranks(workers, b, steps, on_rank, overlap)
                        if name not in best or r["ms_per_step"] < best[name]["ms_per_step"]:
                            best[name] = r
                lg, ids, ov = best["logits"], best["ids"], best["overlap"]
                print(f"| {b} | {lg['ms_per_step']:.1f} | {ids['ms_per_step']:.1f} | {ov['ms_per_step']:.1f} | "
                      f"{lg['ms_per_step'] / ov['ms_per_step']:.2f}x | {lg['bytes_back']:,.0f} / {ids['bytes_back']:,.0f} |",
                      flush=True)
        finally:
            workers.shutdown()


def combine_table(tp: int, ep: int, batches: list[int], steps: int, rounds: int = 2) -> None:
    """Decode ms/step over rank workers whose MoE combines by all-to-all vs by all-reduce
    (models.layers.MoE), both alive, rounds interleaved, best of `rounds`; sampling on rank 0, overlapped."""
    import tempfile
    from pathlib import Path

    from models.checkpoint import make_checkpoint
    from parallel.worker import RankWorkers, WorkerSpec
    with tempfile.TemporaryDirectory() as d:
        path = make_checkpoint(Path(d) / "tiny", "tiny", "hf", "mxfp4", seed=0)
        sets = {c: RankWorkers(WorkerSpec(str(path), tp, ep, moe_combine=c)) for c in ("all_to_all", "all_reduce")}
        try:
            print("| batch | all-to-all ms/step | all-reduce ms/step | all-to-all / all-reduce |")
            print("|---:|---:|---:|---:|")
            for b in batches:
                best = {}
                for _ in range(rounds):
                    for c, w in sets.items():
                        best[c] = min(best.get(c, float("inf")), measure_ranks(w, b, steps, True, True)["ms_per_step"])
                a2a, ar = best["all_to_all"], best["all_reduce"]
                print(f"| {b} | {a2a:.1f} | {ar:.1f} | {a2a / ar:.2f}x |", flush=True)
        finally:
            for w in sets.values():
                w.shutdown()


def attn_dp_table(tp: int, ep: int, batches: list[int], steps: int, context: int, rounds: int = 2) -> None:
    """Decode ms/step and KV blocks per rank with replicated attention vs attention data parallelism
    (ep/tp groups, each its own sequences), both alive, rounds interleaved, best of `rounds`."""
    import tempfile
    from pathlib import Path

    from models.checkpoint import make_checkpoint
    from parallel.worker import RankWorkers, WorkerSpec
    with tempfile.TemporaryDirectory() as d:
        path = make_checkpoint(Path(d) / "tiny", "tiny", "hf", "mxfp4", seed=0)
        sets = {dp: RankWorkers(WorkerSpec(str(path), tp, ep, attn_dp=dp)) for dp in (False, True)}
        try:
            print("| batch | context | replicated ms/step | attention DP ms/step | speedup "
                  "| KV blocks per rank (replicated / DP) |")
            print("|---:|---:|---:|---:|---:|---|")
            for b in batches:
                best = {}
                for _ in range(rounds):
                    for dp, w in sets.items():
                        r = measure_ranks(w, b, steps, True, True, context)
                        if dp not in best or r["ms_per_step"] < best[dp]["ms_per_step"]:
                            best[dp] = r
                rep, dp = best[False], best[True]
                print(f"| {b} | {context} | {rep['ms_per_step']:.1f} | {dp['ms_per_step']:.1f} | "
                      f"{rep['ms_per_step'] / dp['ms_per_step']:.2f}x | {rep['kv_blocks_per_rank']} / "
                      f"{dp['kv_blocks_per_rank']} |", flush=True)
        finally:
            for w in sets.values():
                w.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=counts(), default="1,8,64,256")
    ap.add_argument("--context", type=at_least(1), default=1024)
    ap.add_argument("--steps", type=at_least(1), default=50)
    ap.add_argument("--ranks", metavar="TPxEP", type=tp_x_ep,
                    help="instead: decode over tp x ep local rank workers, sampling on rank 0 vs in the engine")
    ap.add_argument("--combine", action="store_true",
                    help="with --ranks: the MoE combining by all-to-all vs by all-reduce instead")
    ap.add_argument("--attn-dp", action="store_true",
                    help="with --ranks: replicated attention vs attention data parallelism instead")
    a = ap.parse_args(argv)
    if (a.combine or a.attn_dp) and not a.ranks:
        ap.error(f"--{'combine' if a.combine else 'attn-dp'} needs --ranks TPxEP")
    from bench.gpu import find_vocab
    find_vocab()
    torch.set_num_threads(1)
    if a.ranks:
        (tp, ep), batches = a.ranks, a.batches
        if a.attn_dp:
            attn_dp_table(tp, ep, batches, a.steps, a.context)
        else:
            (combine_table if a.combine else ranks_table)(tp, ep, batches, a.steps)
        return 0
    print("| batch | context | host ms/step | host us/sequence | schedule / build / sampling batch / update ms |")
    print("|---:|---:|---:|---:|---|")
    for b in a.batches:
        r = measure(b, a.context, a.steps)
        split = " / ".join(f"{r[k + '_ms']:.2f}" for k in ("schedule", "build", "sampling_batch", "update"))
        print(f"| {r['batch']} | {r['context']} | {r['host_ms_per_step']:.2f} | {r['host_us_per_sequence']:.1f} "
              f"| {split} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
