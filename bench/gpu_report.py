"""bench.gpu's results as markdown: a table per (GPU, model) with its side-by-side ratios and profiles,
and the block of BENCHMARKS.md between the bench.gpu markers, written from the JSON the device
machine returns (never by hand)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import step_profile


def markdown(res: dict) -> str:
    out = [f"### {res['model']} on {res['gpu']}",
           f"bf16 + MXFP4 experts, kernels {res['kernels']} (triton: {res['use_triton']}), copy bandwidth "
           f"{res['copy_bandwidth_GBps']:.0f} GB/s, bf16 matmul {res['matmul_TFLOPs']:.1f} TFLOP/s. "
           f"`{res['command']}`", "",
           "| workload | batch | context | tokens/s | roofline tokens/s | bound | % of roofline |",
           "|---|---:|---:|---:|---:|---|---:|"]
    for r in res["results"]:
        out.append(f"| {r['kind']} | {r['batch']} | {r['context']} | {r['tokens_per_s']:.1f} | "
                   f"{r['roofline_tokens_per_s']:.1f} | {r['roofline_bound']} | {100 * r['fraction_of_roofline']:.1f} |")
    paths = [r for r in res["results"] if r.get("kernel_paths")]
    if paths:
        out += ["", "Decode kernel paths (kernels/configs for this GPU): " + "; ".join(
            f"batch {r['batch']}: MoE {r['kernel_paths']['moe']}, linears on kernels.linear: "
            f"{', '.join(r['kernel_paths']['linears']) or 'none (cuBLAS)'}" for r in paths)]
    lock = [r for r in res["results"] if "lockstep_tokens_per_s" in r]
    if lock:
        out += ["", "Overlapped scheduling (the default on CUDA) against lockstep, decode measured back to back: " +
                "; ".join(f"batch {r['batch']}: {r['tokens_per_s']:.1f} vs {r['lockstep_tokens_per_s']:.1f} tok/s "
                          f"({r['overlap_speedup']:.2f}x, {r['step_ms']:.2f} vs {r['lockstep_step_ms']:.2f} ms/step)"
                          for r in lock)]
    smp = [r for r in res["results"] if "sampled_tokens_per_s" in r]
    if smp:
        out += ["", "Decode at temperature 1 (sampled by the fused kernel) against greedy, back to back: " +
                "; ".join(f"batch {r['batch']}: {r['sampled_tokens_per_s']:.1f} vs {r['tokens_per_s']:.1f} tok/s "
                          f"({r['sampled_step_ms']:.2f} vs {r['step_ms']:.2f} ms/step)" for r in smp)]
    pad = [r for r in res["results"] if "padded_tokens_per_s" in r]
    if pad:
        out += ["", "Decode padded to the next graph bucket (batch 1 in the bucket of 2: cuBLAS's one-row path "
                "adds a linear's bias in a kernel of its own, its two-row path in the GEMM) against its own "
                "bucket, back to back: " +
                "; ".join(f"batch {r['batch']}: {r['padded_tokens_per_s']:.1f} vs {r['tokens_per_s']:.1f} tok/s "
                          f"({r['padded_step_ms']:.2f} vs {r['step_ms']:.2f} ms/step)" for r in pad)]
    ung = [r for r in res["results"] if "unfused_gate_tokens_per_s" in r]
    if ung:
        pairs = "; ".join(f"batch {r['batch']}: {r['tokens_per_s']:.1f} vs {r['unfused_gate_tokens_per_s']:.1f} "
                          f"tok/s ({r['step_ms']:.2f} vs {r['unfused_gate_step_ms']:.2f} ms/step)" for r in ung)
        out += ["", "Decode with the one-launch MoE gate (kernels/moe_gate.py: the MLP's add and norm, router, "
                "routing and align) and the combine as W2's tail (kernels/moe_combine.py) against those as "
                "launches of their own (GPTOSS_GATE_MAX_ROWS=0), back to back: " + pairs]
    npd = [r for r in res["results"] if "no_pdl_tokens_per_s" in r]
    if npd:
        pairs = "; ".join(f"batch {r['batch']}: {r['tokens_per_s']:.1f} vs {r['no_pdl_tokens_per_s']:.1f} "
                          f"tok/s ({r['step_ms']:.2f} vs {r['no_pdl_step_ms']:.2f} ms/step)" for r in npd)
        out += ["", f"Decode with programmatic dependent launch (kernels/pdl.py; on in this run: "
                f"{res.get('pdl', '?')}) against without it (GPTOSS_PDL=0), back to back: " + pairs]
    for r in res.get("profiles", []):
        out += step_profile.markdown(r)
    if not res.get("complete", True):
        out += ["", "(cut short: the run ended before its last measurement)"]
    return "\n".join(out)


BEGIN, END = "<!-- bench.gpu results: begin -->", "<!-- bench.gpu results: end -->"


def update_benchmarks(results: Path, target: Path) -> int:
    """Put the newest result per (GPU, model) found under `results` between BEGIN and END in `target`
    (appended with a heading the first time): GPU runs happen on another machine, whose JSON comes back
    as files, and BENCHMARKS.md is written from them here, never by hand."""
    newest: dict[tuple[str, str], tuple[str, dict]] = {}
    for f in sorted(results.glob("gpu-*.json")):
        res = json.loads(f.read_text())
        if res.get("dry_run") or not res.get("results"):
            continue
        key = (res["gpu"], res["model"])
        if key not in newest or res["date"] > newest[key][0]:
            newest[key] = (res["date"], res)
    if not newest:
        print(f"bench.gpu: no GPU results (gpu-*.json, not dry runs) under {results}", file=sys.stderr)
        return 2
    body = "\n\n".join(f"{markdown(res)}\n\nMeasured {date}." for date, res in newest.values())
    block = f"{BEGIN}\n{body}\n{END}"
    text = target.read_text() if target.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## GPU (bench/gpu.py)\n\n" + block + "\n"
    target.write_text(text)
    print(f"wrote {len(newest)} result table(s) into {target}", file=sys.stderr)
    return 0
