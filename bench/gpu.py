"""GPU benchmark: decode, prefill and 1k-in/1k-out throughput of gpt-oss beside a bandwidth roofline.

    python -m bench.gpu [--models gpt-oss-120b,gpt-oss-20b] [--ckpt-dir DIR] [--batches 1,8,64,256]
    python -m bench.gpu --dry-run        # the whole flow on CPU with the tiny preset (what the tests run)

Weights: random full-shape checkpoints (MXFP4 experts, HF layout), loaded with
load_model(dtype=bf16, keep_mxfp4=True). `--weights memory` (default) draws each
tensor on the device as it is loaded (models.checkpoint.RandomCheckpoint: the
tensors `gptoss checkpoint make` writes, without ~65 GB of disk for 120b);
`--weights disk` writes the checkpoint under --ckpt-dir on first use, as
`python -m cli.main checkpoint make DIR/<preset> --preset <preset>` would, and
loads it (a dry run's --ckpt-dir defaults to a temporary folder); --delete-created
removes a checkpoint the run wrote, also when an earlier process of a supervised run
wrote it. Every number runs through engine.core.LLMEngine (scheduler, sampler and all):
* decode: B sequences with --decode-context-token prompts; steps timed once
  every sequence is decoding; tokens/s = B * steps / time. Greedy; the
  --sampled-batches also at temperature 1 (the fused sampling kernel), the
  --lockstep-batches also without overlapped scheduling, and the --padded-batches
  also padded to the next graph bucket (batch 1 in the bucket of 2: on the GPU
  two rows let cuBLAS add each linear's bias inside the GEMM, where its one-row
  path launches a copy of its own), and the --unfused-gate-batches also with
  the few-row MoE fusions off (GPTOSS_GATE_MAX_ROWS=0: the MLP norm, router,
  routing, align and combine as launches of their own), and the --pdl-batches
  also with programmatic dependent launch (GPTOSS_PDL=1, then =exit; off by
  default), back to back.
* prefill: --prefill-seqs prompts of --prefill-len tokens, max_tokens=1,
  chunked at --max-tokens-per-step; tokens/s = prompt tokens / time.
* profile, last (CUPTI may leave later work slower once it has run): decode at --profile-batches
  again, timed, then --profile-steps steps under torch.profiler: device time per kernel category
  beside the bytes the roofline says it moves (bench.step_profile), kernels per step, the Chrome
  trace beside the JSON; then --profile-prefill-steps full prefill chunks the same way. --phases
  runs a subset (e.g. decode,profile while tuning kernels).
* throughput: --requests prompts of --isl tokens, --osl outputs each, at most
  --concurrency running; output tokens/s. The engine warms up first, as a
  Serve group does (every decode graph captured: the batch shrinks through
  every bucket as requests finish). --throughput-seconds caps the phase:
  tokens/s is then the tokens generated up to the cap over the time taken.
* --kv-cache-dtype fp8: every engine of the run on an fp8 KV cache (half the
  bytes: --concurrency 1024 fits 1k/1k on one H200 beside 120b's weights); each
  row says its cache, and the roofline counts its bytes.
The JSON file is rewritten after every measurement, so a run cut short (a
device time limit) keeps what it measured. A measurement that raises is recorded
(`errors`) and the run goes on; on a GPU the run is supervised (kernels.faults), so
after a device fault a fresh process loads the model again and measures the rest
into the same file, without the measurement that faulted.

Roofline (bench.roofline): bytes one step must move (attention + router weights, the experts
the step's tokens are expected to touch under uniform routing, KV read and
written, embedding rows, unembedding, logits) over the device-to-device copy
bandwidth measured in this run; activations are left out. Prefill also gets a
compute roofline from a measured bf16 matmul; its roofline is the lower. The
throughput roofline is decode at batch --concurrency with context isl + osl/2
(prefill time ignored). JSON goes to --out (one file per model); a markdown
summary for BENCHMARKS.md is printed.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import step_profile
from bench.gpu_args import parse as parse_args
from bench.gpu_kernels import paths as kernel_paths
from bench.gpu_measure import bench_decode, bench_prefill, bench_throughput, log, profile_prefill
from bench.gpu_report import markdown, update_benchmarks
from bench.roofline import Roofline, copy_bandwidth, matmul_flops, sync
from kernels import faults


def checkpoint(preset: str, ckpt_dir: Path) -> tuple[Path, bool]:
    path = ckpt_dir / preset
    if (path / "config.json").exists():
        return path, False
    from models.checkpoint import make_checkpoint
    log(f"writing {path} (= python -m cli.main checkpoint make {path} --preset {preset})")
    make_checkpoint(path, preset, "hf", "mxfp4", seed=0, overwrite=True)
    return path, True


def load(preset: str, a, dev: torch.device):
    from models import load_model
    created = False
    if a.weights == "memory":
        from models.checkpoint import RandomCheckpoint
        source = RandomCheckpoint(preset, "mxfp4", seed=0, device=dev)
    else:
        source, created = checkpoint(preset, Path(a.ckpt_dir))
    t0 = time.perf_counter()
    model = load_model(source, dtype=torch.bfloat16, device=dev, keep_mxfp4=True)
    sync(dev)
    log(f"loaded {preset} ({a.weights}) in {time.perf_counter() - t0:.1f} s")
    return model, source if created else None


def gpu_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None


def run_model(preset: str, a, dev: torch.device, bw: float, flops: float, command: str, save, prior=None,
              state=None) -> dict:
    """Measure one preset; `save(result)` is called after every measurement with the result so far.
    state: a supervised run's kernels.faults.State, prior: the result its earlier processes saved. What they
    measured, failed or faulted on is not run again, and a device fault raises kernels.faults.DeviceFault."""
    from kernels import dispatch, pdl
    from kernels._triton import environ
    model, created = load(preset, a, dev)
    if state is not None:  # a later process finds it on disk: --delete-created must still remove it
        created = created or state.notes.get("created", {}).get(preset)
        state.notes.setdefault("created", {})[preset] = created and str(created)
        state.save()
    gpu = gpu_name(dev)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    res = prior or {"gpu": gpu, "model": preset, "dtype": "bfloat16", "experts": "mxfp4", "command": command,
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "weights": a.weights,
           "kernels": os.environ.get("GPTOSS_KERNELS", "auto"), "use_triton": dispatch.use_triton(dev),
           "pdl": dispatch.use_triton(dev) and pdl.enabled(dev),
           "torch": torch.__version__, "triton": triton_version, "dry_run": a.dry_run,
           "copy_bandwidth_GBps": bw / 1e9, "matmul_TFLOPs": flops / 1e12, "kv_cache_dtype": a.kv_cache_dtype,
           "complete": False, "results": []}
    kv = a.kv_cache_dtype
    errors = res.setdefault("errors", [])

    def attempt(what: str, fn, *args, **kw):
        """fn's result, or None when it raised: the error goes into the JSON and the run goes on with its
        next measurement (an OOM at one batch must not cost the rest), unless it was a device fault: the CUDA
        context is lost, every later launch would fail the same way (kernels.faults). None too for what an
        earlier process of a supervised run measured, failed or faulted on."""
        key = f"{preset} {what}"
        if state is not None and (key in state.done or state.faulted(key)):
            return None
        try:
            got = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - recorded, and re-raised when the context is gone
            fault = faults.is_sticky(e)
            errors.append({"what": what, "error": f"{type(e).__name__}: {e}"[:500], "device_fault": fault})
            save(res)
            log(f"  {what}: {'DEVICE FAULT' if fault else 'failed'} ({type(e).__name__}: {str(e)[:200]})")
            if fault and state is not None:
                raise faults.DeviceFault(key, e) from e
            if fault:
                raise
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            got = None
        if state is not None:
            state.finish(key)
        return got

    roof = Roofline(model.config, kv_bytes=1 if kv == "fp8" else 2)
    decode = functools.partial(bench_decode, kv=kv)  # every engine of the run on that cache
    rows = res["results"]

    def add(kind, batch, context, tok_s, step_tokens, contexts, sampled, extra=None):
        nbytes = roof.step_bytes(step_tokens, contexts, sampled)
        mem = step_tokens / (nbytes / bw)
        roofline, bound = mem, "memory"
        if kind == "prefill":
            comp = step_tokens / (roof.step_flops(step_tokens, contexts, sampled) / flops)
            roofline, bound = min(mem, comp), ("memory" if mem <= comp else "compute")
        rows.append({"gpu": gpu, "model": preset, "command": command, "kind": kind, "batch": batch,
                     "context": context, "tokens_per_s": tok_s, "roofline_tokens_per_s": roofline,
                     "roofline_bound": bound, "fraction_of_roofline": tok_s / roofline, "bytes_per_step": nbytes,
                     "kv_cache_dtype": kv, **(extra or {})})
        peak = peak_gib(dev)
        if peak is not None:  # each process of a supervised run has its own peak: the run's is the largest
            res["peak_memory_GiB"] = max(res.get("peak_memory_GiB", 0), peak)
        save(res)
        log(f"  {kind:10} batch {batch:4} context {context:6}: {tok_s:10.1f} tok/s "
            f"(roofline {roofline:10.1f}, {bound})")
        return rows[-1]

    ctx = a.decode_context + a.warmup_steps + a.decode_steps // 2
    for B in a.batches if "decode" in a.phases else ():
        row = next((r for r in rows if r["kind"] == "decode" and r["batch"] == B), None)  # an earlier process's
        if row is None:
            got = attempt(f"decode batch {B}", decode, model, dev, B, a.decode_context, a.decode_steps,
                          a.warmup_steps, a.max_tokens_per_step)
            if got is None:
                continue
            # what the GPU's tuned file picked for this batch (MoE tiles, linears): what the figure measured
            row = add("decode", B, ctx, got[0], B, [ctx] * B, B,
                      {"step_ms": got[1] * 1e3, "kernel_paths": kernel_paths(model.config, B, dev)})
        for name, batches, kw, env in decode_variants(a):  # each measured just after the plain run
            if B in batches:
                with environ(**env):
                    got = attempt(f"decode batch {B} {name}", decode, model, dev, B, a.decode_context,
                                  a.decode_steps, a.warmup_steps, a.max_tokens_per_step, **kw)
                if got is not None:
                    row.update({f"{name}_tokens_per_s": got[0], f"{name}_step_ms": got[1] * 1e3})
                    if name == "lockstep":
                        row["overlap_speedup"] = row["tokens_per_s"] / got[0]
                    save(res)
    tok_s = attempt("prefill", bench_prefill, model, dev, a.prefill_seqs, a.prefill_len, a.max_tokens_per_step,
                    kv=kv) if "prefill" in a.phases else None
    if tok_s is not None:
        chunk = min(a.max_tokens_per_step, a.prefill_seqs * a.prefill_len)
        add("prefill", a.prefill_seqs, a.prefill_len, tok_s, chunk, *_chunk_shape(chunk, a.prefill_len))
    got = attempt("throughput", bench_throughput, model, dev, a.requests, a.isl, a.osl, a.concurrency,
                  a.max_tokens_per_step, a.throughput_seconds, kv=kv) if "throughput" in a.phases else None
    if got is not None:
        tok_s, done, split = got
        tctx = a.isl + a.osl // 2  # not ctx: the profiles below are decode at --decode-context
        add("throughput", a.concurrency, tctx, tok_s, a.concurrency, [tctx] * a.concurrency, a.concurrency,
            {"isl": a.isl, "osl": a.osl, "requests": a.requests, "requests_finished": done, **split,
             "metric": "output tokens/s"})
    # with PDL a kernel starts while the one before it runs and waits in its first instruction: its span
    # would hold that wait, and the categories' times would overlap. Profiled without it unless asked.
    apart = {"GPTOSS_PDL": "1" if a.profile_pdl else "0"}
    for B in a.profile_batches if "profile" in a.phases else ():
        prof = _profiler(roof, dev, bw, B, [ctx] * B, B, Path(a.out) / f"profile-{preset}-b{B}.json.gz"
                         if a.out else None, f"batch {B}")
        with environ(**apart):
            got = attempt(f"profile batch {B}", decode, model, dev, B, a.decode_context, a.decode_steps,
                          a.warmup_steps, a.max_tokens_per_step, profile_steps=a.profile_steps, profile=prof)
        if got is None:
            continue
        tok_s, step_s, profiled = got
        res.setdefault("profiles", []).append({"kind": "decode", "batch": B, "context": ctx, "tokens_per_s": tok_s,
                                               "step_ms": step_s * 1e3, "profile": profiled,
                                               "pdl": bool(a.profile_pdl and res.get("pdl"))})
        save(res)
        log(f"  profiled decode batch {B}: " + ("failed" if "error" in profiled else
                                                f"{profiled['busy_ms_per_step']:.3f} ms busy of {step_s * 1e3:.3f} "
                                                f"ms per step, {profiled['kernels_per_step']:.0f} kernels"))
    if "profile" in a.phases and a.profile_prefill_steps:
        chunk = a.max_tokens_per_step
        trace = Path(a.out) / f"profile-{preset}-p{chunk}.json.gz" if a.out else None
        prof = _profiler(roof, dev, bw, chunk, *_chunk_shape(chunk, a.prefill_len), trace, f"prefill chunk {chunk}")
        with environ(**apart):
            got = attempt(f"profile prefill chunk {chunk}", profile_prefill, model, dev, a.prefill_len, chunk,
                          a.profile_prefill_steps, prof, kv=kv)
        if got is not None:
            profiled, seqs = got
            res.setdefault("profiles", []).append({"kind": "prefill", "batch": seqs, "tokens": chunk,
                                                   "context": a.prefill_len, "profile": profiled,
                                                   "pdl": bool(a.profile_pdl and res.get("pdl"))})
            save(res)
            log(f"  profiled prefill chunks of {chunk}: " + ("failed" if "error" in profiled else
                                                             f"{profiled['busy_ms_per_step']:.3f} ms busy per chunk, "
                                                             f"{profiled['kernels_per_step']:.0f} kernels"))
    del model
    if created and a.delete_created:
        import shutil
        shutil.rmtree(created)
    res["complete"] = True
    save(res)
    return res


def decode_variants(a) -> list[tuple[str, list[int], dict, dict]]:
    """The decode runs repeated beside the plain one: (result key prefix, batches, bench_decode kwargs, env)."""
    return [("lockstep", a.lockstep_batches, dict(overlap=False), {}),  # overlapped scheduling off
            ("sampled", a.sampled_batches, dict(temperature=1.0), {}),  # the API's default: the sampling kernel
            ("padded", a.padded_batches, dict(padded=True), {}),  # to the next graph bucket (padding: no expert)
            ("unfused_gate", a.unfused_gate_batches, {}, {"GPTOSS_GATE_MAX_ROWS": "0"}),  # kernels.moe_gate off
            ("pdl", a.pdl_batches, {}, {"GPTOSS_PDL": "1"}),  # a launch overlaps the one before (not default)
            ("pdl_exit", a.pdl_batches, {}, {"GPTOSS_PDL": "exit"})]  # ... only as its CTAs exit (kernels/pdl.py)


def _chunk_shape(chunk: int, length: int) -> tuple[list[int], int]:
    """A prefill chunk of prompts of `length` for the roofline: (mean attended lengths, sequences sampled)."""
    n = max(1, chunk // length)
    return [length // 2] * n, n


def _profiler(roof, dev, bw: float, tokens: int, contexts: list[int], sampled: int, trace, what: str):
    """-> profile(step, n): bench.step_profile of n steps beside the roofline's bytes for such a step."""
    def prof(step, n):
        try:  # a profiler failure costs the profile, not the rest of the device time
            return step_profile.profile(step, n, dev, roof.step_parts(tokens, contexts, sampled), bw, trace)
        except Exception as e:  # noqa: BLE001
            if faults.is_sticky(e):  # the context is gone: the measurement around it records the fault
                raise
            log(f"  profile of {what} failed: {type(e).__name__}: {e}")
            return {"error": f"{type(e).__name__}: {e}"[:500]}
    return prof


def find_vocab() -> None:
    """Raw-mode output decoding needs the o200k vocabulary; offline machines keep a copy (see README)."""
    if "TIKTOKEN_ENCODINGS_BASE" in os.environ:
        return
    root = Path(__file__).resolve().parents[1]
    for d in (root.parent / "shared" / "vocab", root / "shared" / "vocab", root / "vocab"):
        if (d / "o200k_base.tiktoken").exists():
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(d)
            return


def main(argv=None) -> int:
    a = parse_args(argv, __doc__)
    if a.update_benchmarks:
        return update_benchmarks(Path(a.update_benchmarks), Path(a.benchmarks_file))
    argv = list(sys.argv[1:] if argv is None else argv)
    find_vocab()
    command = "python -m bench.gpu " + " ".join(faults.public_argv(argv))
    if a.kernels:
        os.environ["GPTOSS_KERNELS"] = a.kernels
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here (use --dry-run to exercise the flow on CPU)", file=sys.stderr)
        return 2
    if dev.type == "cuda" and a.resume is None and not a.dry_run:
        # a device fault must not cost what comes after it; two fresh processes (model loads) that each fault
        # before measuring anything mean a fault on every measurement's path (the runbook's switches)
        return faults.supervise("bench.gpu", argv, max_barren=2)
    state = faults.State.load(a.resume) if a.resume else None
    notes = state.notes if state is not None else {}
    with tempfile.TemporaryDirectory() as tmp:
        if a.ckpt_dir is None:
            a.ckpt_dir = tmp if a.dry_run else str(Path.home() / ".cache" / "gptoss" / "bench")
        out = Path(a.out or (Path(tmp) / "results" if a.dry_run else "bench/results"))
        out.mkdir(parents=True, exist_ok=True)
        a.out = str(out)
        if "stamp" not in notes:  # measured once: every process of a supervised run on the same roofline
            notes.update(bw=copy_bandwidth(dev, int(a.copy_gib * 2 ** 30)),
                         flops=matmul_flops(dev, 256 if a.dry_run else 8192),
                         stamp=datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
            # a run's files are its own: one started in the same second as another must not resume that one's
            stamp, n = notes["stamp"], 2
            while any(out.glob(f"gpu-*-{notes['stamp']}.json")):
                notes["stamp"], n = f"{stamp}-{n}", n + 1
            if state is not None:
                state.save()
        bw, flops = notes["bw"], notes["flops"]
        log(f"copy bandwidth {bw / 1e9:.1f} GB/s, bf16 matmul {flops / 1e12:.2f} TFLOP/s")
        slug = re.sub(r"[^a-z0-9]+", "-", gpu_name(dev).lower()).strip("-")
        errors = 0
        for preset in a.models:
            f = out / f"gpu-{preset}-{slug}-{notes['stamp']}.json"
            save = lambda res, f=f: f.write_text(json.dumps(res, indent=1) + "\n")  # noqa: E731
            if state is not None and f"{preset} complete" in state.done:  # an earlier process measured it
                res = json.loads(f.read_text())
            else:
                prior = json.loads(f.read_text()) if state is not None and f.exists() else None
                try:
                    res = run_model(preset, a, dev, bw, flops, command, save, prior, state)
                except faults.DeviceFault as e:  # recorded in the JSON; a fresh process goes on after it
                    state.fault(e)
                    return faults.FAULT_EXIT
                if state is not None:
                    state.finish(f"{preset} complete")
                print(markdown(res) + f"\n\n(wrote {f})\n", flush=True)
            errors += len(res["errors"])
    return 1 if errors else 0  # the figures that did measure are written either way

if __name__ == "__main__":
    sys.exit(main())
