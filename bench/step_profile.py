"""Where a decode step's device time goes: kernel times from torch.profiler, by category, beside the
bytes each category must move (bench.gpu's Roofline), so a GPU run that misses its roofline says
which kernel to work on next.

bench.gpu profiles decode at --profile-batches in its last phase (a run of CUPTI may leave later
work slower), each after a timed run on the same engine: the JSON's `profiles` get the categories,
top kernels, kernels and device-busy time per step; the Chrome trace goes beside the JSON
(`profile-<model>-b<B>.json.gz`, for Perfetto).

On CUDA the events are the device's kernels, graph replays included (CUPTI reports each kernel a
replayed graph runs, though no CPU op launches it). On CPU (--dry-run) the top-level torch ops stand
in so the flow runs in CI; there every matmul is `linear` and the figures say nothing about a GPU.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

LINEAR = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|^aten::(linear|addmm|mm|matmul|bmm)$", re.I)
COMM = re.compile(r"nccl|^gloo|^c10d::", re.I)
COPY_CATS = ("gpu_memcpy", "gpu_memset")
# which of the roofline's byte parts (bench.roofline.Roofline.step_parts) each category moves
PART_OF = {"linear": ("dense weights", "unembedding"), "moe w1": ("experts w1",), "moe w2": ("experts w2",),
           "attention": ("kv read",), "rope + kv write": ("kv write",), "rmsnorm": ("norm weights",)}


def triton_categories() -> dict[str, str]:
    """Each of the project's Triton kernels (a compiled kernel is named after its function) -> category."""
    from kernels import attention, moe, moe_dq, moe_gate, rmsnorm, rope, route, sample
    # moe_gate's decode gate also holds the MLP norm and the router (a few us a layer): counted as routing
    by_module = {attention: "attention", rmsnorm: "rmsnorm", rope: "rope + kv write", route: "moe route/align/combine",
                 sample: "sampling", moe: "moe route/align/combine", moe_gate: "moe route/align/combine",
                # a prefill step's decode of the experts to bf16 (the DQ tiles): their weight bytes, and 4x as
                # many written, outside the roofline's parts
                moe_dq: "moe dequant"}
    out = {n: cat for mod, cat in by_module.items() for n in mod._KERNELS if n.endswith("_kernel")}
    out.update({"_w1_kernel": "moe w1", "_w2_kernel": "moe w2", "_w1_gemv_kernel": "moe w1",
                "_w2_gemv_kernel": "moe w2", "_x16_kernel": "moe w1", "_w1_rs_kernel": "moe w1",
                "_w2_rs_kernel": "moe w2", "_xperm_kernel": "moe w1", "_linear_kernel": "linear"})
    return out


def categorize(name: str, cat: str = "kernel", triton: dict[str, str] | None = None) -> str:
    triton = triton_categories() if triton is None else triton
    if name in triton:
        return triton[name]
    if cat in COPY_CATS or name.startswith(("Memcpy", "Memset")):
        return "copy"
    if COMM.search(name):
        return "comm"
    if LINEAR.search(name):
        return "linear"
    return "other"


def device_events(trace: dict, on_cuda: bool) -> list[dict]:
    """The events that are the step's work: on CUDA the device's kernels, copies and sets; on CPU the
    top-level torch ops of each thread (their children would count twice)."""
    ev = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    if on_cuda:
        return [e for e in ev if e.get("cat") in ("kernel", *COPY_CATS)]
    out, open_until = [], {}
    for e in sorted((e for e in ev if e.get("cat") == "cpu_op"), key=lambda e: (e["ts"], -e["dur"])):
        key = (e.get("pid"), e.get("tid"))
        if e["ts"] >= open_until.get(key, float("-inf")):
            out.append(e)
            open_until[key] = e["ts"] + e["dur"]
    return out


def busy_us(events: list[dict]) -> float:
    """Time covered by at least one event (kernels on several streams may overlap)."""
    total, end = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e["ts"]):
        s, t = e["ts"], e["ts"] + e["dur"]
        if t > end:
            total += t - max(s, end)
            end = t
    return total


def summarize(events: list[dict], steps: int, parts: dict[str, float], bandwidth: float, top: int = 12) -> dict:
    """Per step: time by category (with the bytes the roofline says it moves and the rate that makes),
    the longest kernels, the kernel count and the device-busy time."""
    triton = triton_categories()
    cats: dict[str, float] = {}
    kernels: dict[str, list] = {}
    for e in events:
        c = categorize(e["name"], e.get("cat", ""), triton)
        cats[c] = cats.get(c, 0.0) + e["dur"]
        k = kernels.setdefault(e["name"], [c, 0, 0.0])
        k[1] += 1
        k[2] += e["dur"]
    total = sum(cats.values()) or 1.0
    rows = []
    for c, us in sorted(cats.items(), key=lambda kv: -kv[1]):
        nbytes = sum(parts.get(p, 0.0) for p in PART_OF.get(c, ()))
        ms = us / steps / 1e3
        rate = nbytes / (ms / 1e3) if nbytes and ms else None
        rows.append({"category": c, "ms_per_step": ms, "share": us / total, "bytes_per_step": nbytes,
                     "GBps": rate / 1e9 if rate else None, "of_copy_bandwidth": rate / bandwidth if rate else None})
    longest = sorted(kernels.items(), key=lambda kv: -kv[1][2])[:top]
    return {"steps": steps, "kernels_per_step": len(events) / steps, "busy_ms_per_step": busy_us(events) / steps / 1e3,
            "kernel_ms_per_step": total / steps / 1e3, "categories": rows,
            "top_kernels": [{"name": n[:120], "category": c, "calls_per_step": calls / steps, "us_per_call": us / calls,
                             "ms_per_step": us / steps / 1e3} for n, (c, calls, us) in longest]}


def profile(step, steps: int, dev: torch.device, parts: dict[str, float], bandwidth: float,
            trace_out: Path | None = None) -> dict:
    """Run `step()` `steps` times under torch.profiler and summarize; trace_out: keep the trace (gzip)."""
    from torch.profiler import ProfilerActivity
    on_cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    if on_cuda:
        torch.cuda.synchronize(dev)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if on_cuda:
            torch.cuda.synchronize(dev)
    fd, tmp = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(tmp)
        trace = json.loads(Path(tmp).read_text())
        if trace_out is not None:
            with open(tmp, "rb") as src, gzip.open(trace_out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    finally:
        os.unlink(tmp)
    out = summarize(device_events(trace, on_cuda), steps, parts, bandwidth)
    out["source"] = "cuda kernels" if on_cuda else "cpu top-level torch ops (dry run)"
    if trace_out is not None:
        out["trace"] = trace_out.name
    return out


def markdown(row: dict) -> list[str]:
    """One of bench.gpu's profiles (batch, step_ms, profile) as a table."""
    p = row["profile"]
    what = (f"Prefill chunks of {row['tokens']} tokens ({row['batch']} prompt{'s' * (row['batch'] != 1)} of "
            f"{row['context']})"
            if row.get("kind") == "prefill" else f"Decode batch {row['batch']}")
    if "error" in p:
        return ["", f"{what}: the profile failed ({p['error']})."]
    step = f" of {row['step_ms']:.2f} ms wall (unprofiled)" if "step_ms" in row else ""
    pdl = {True: " With programmatic dependent launch (kernel spans include the wait for the kernel before).",
           False: " Without programmatic dependent launch (GPTOSS_PDL=0: each kernel's own span)."}
    out = ["", f"{what}, where a step's time goes ({p['source']}): "
               f"{p['busy_ms_per_step']:.3f} ms busy per step{step}, {p['kernels_per_step']:.0f} kernels per step."
               + pdl.get(row.get("pdl"), ""), "",
           "| category | ms/step | share | bytes/step (roofline model) | GB/s | of copy bandwidth |",
           "|---|---:|---:|---:|---:|---:|"]
    for c in p["categories"]:  # no rate where the roofline model gives the category no bytes
        moved = (f"{c['bytes_per_step'] / 1e6:.1f} MB | {c['GBps']:.0f} | {100 * c['of_copy_bandwidth']:.0f}%"
                 if c["GBps"] else "- | - | -")
        out.append(f"| {c['category']} | {c['ms_per_step']:.3f} | {100 * c['share']:.1f}% | {moved} |")
    out += ["", "Longest kernels: " + "; ".join(
        f"`{k['name'][:60]}` {k['ms_per_step']:.3f} ms/step ({k['calls_per_step']:.0f} x {k['us_per_call']:.1f} us)"
        for k in p["top_kernels"][:6])]
    return out
