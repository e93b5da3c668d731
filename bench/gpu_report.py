"""bench.gpu's results as markdown: a table per (GPU, model) with its side-by-side ratios and profiles,
and the block of BENCHMARKS.md between the bench.gpu markers, written from the JSON the device
machine returns (never by hand)."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

from bench import step_profile


# issue 6's goals, per model: (kind, batch, output tokens/s to reach, strictly above?)
GOALS = {"gpt-oss-120b": [("decode", 1, 430.0, True), ("throughput", None, 7000.0, False)]}


def _whole(row: dict) -> bool:
    """A throughput row from a run that finished every request (a decode row: always)."""
    return row.get("requests_finished", 0) >= row.get("requests", 0)


def _kv(row: dict) -> str:
    """The row's KV cache (EngineConfig.kv_cache_dtype; runs before it existed: auto)."""
    return row.get("kv_cache_dtype", "auto")


def _label(row: dict) -> str:
    return row["kind"] + (" (fp8 KV)" if _kv(row) == "fp8" else "")


def _goals(res: dict) -> list[str]:
    """A line per goal of this model, met or not, from the rows themselves, each row of that kind with its
    KV cache and batch; a throughput figure counts only from a whole run (every request finished), not
    from a window cut short."""
    out = []
    for kind, batch, goal, strict in GOALS.get(res["model"], []):
        rows = [r for r in res["results"] if r["kind"] == kind and batch in (None, r["batch"])]
        what = (f"{kind}" + (f" batch {batch}" if batch else " (1k/1k)")
                + f" {'>' if strict else '>='} {goal:,.0f} tok/s")
        if not rows:
            out.append(f"Goal {what}: not measured in this run.")
            continue
        verdicts = []
        for r in rows:
            met = r["tokens_per_s"] > goal if strict else r["tokens_per_s"] >= goal
            verdict = ("met" if met else "not met") if _whole(r) else "not established (window cut short)"
            how = "" if len(rows) == 1 and _kv(r) == "auto" else (
                f", {'fp8' if _kv(r) == 'fp8' else 'model-dtype'} KV cache, batch {r['batch']}")
            verdicts.append(f"{verdict} ({r['tokens_per_s']:,.1f} tok/s{how})")
        out.append(f"Goal {what}: {'; '.join(verdicts)}.")
    return out


def _variant_lines(res: dict) -> list[tuple[str, bool, str]]:
    """bench.gpu.decode_variants' lines: (result key prefix, the variant's figure first, the line's lead)."""
    return [
        ("lockstep", False, "Overlapped scheduling (the default on CUDA) against lockstep, decode measured back to "
                            "back: "),
        ("sampled", True, "Decode at temperature 1 (sampled by the fused kernel) against greedy, back to back: "),
        ("padded", True, "Decode padded to the next graph bucket (batch 1 in the bucket of 2: cuBLAS's one-row path "
                         "adds a linear's bias in a kernel of its own, its two-row path in the GEMM) against its own "
                         "bucket, back to back: "),
        ("unfused_gate", False, "Decode with the one-launch MoE gate (kernels/moe_gate.py: the MLP's add and norm, "
                                "router, routing and align) and the combine as W2's tail (kernels/moe_combine.py) "
                                "against those as launches of their own (GPTOSS_GATE_MAX_ROWS=0), back to back: "),
        ("pdl", True, "Decode with programmatic dependent launch (GPTOSS_PDL=1, kernels/pdl.py) against without "
                      "it (the default), back to back: "),
        ("pdl_exit", True, "Decode with programmatic dependent launch at each kernel's exit (GPTOSS_PDL=exit: no "
                           "early signal) against without it, back to back: "),
        # results from before PDL was off by default (session 27), when the variant turned it off
        ("no_pdl", False, f"Decode with programmatic dependent launch (kernels/pdl.py; on in this run: "
                          f"{res.get('pdl', '?')}) against without it (GPTOSS_PDL=0), back to back: ")]


def markdown(res: dict) -> str:
    out = [f"### {res['model']} on {res['gpu']}",
           f"bf16 + MXFP4 experts, kernels {res['kernels']} (triton: {res['use_triton']}), copy bandwidth "
           f"{res['copy_bandwidth_GBps']:.0f} GB/s, bf16 matmul {res['matmul_TFLOPs']:.1f} TFLOP/s. "
           f"`{res['command']}`", "",
           "| workload | batch | context | tokens/s | roofline tokens/s | bound | % of roofline |",
           "|---|---:|---:|---:|---:|---|---:|"]
    sources = list(dict.fromkeys(r["source"] for r in res["results"] if r.get("source")))
    for r in res["results"]:
        mark = "*" * (sources.index(r["source"]) + 1) if r.get("source") else ""
        out.append(f"| {_label(r)}{mark} | {r['batch']} | {r['context']} | {r['tokens_per_s']:.1f} | "
                   f"{r['roofline_tokens_per_s']:.1f} | {r['roofline_bound']} | "
                   f"{100 * r['fraction_of_roofline']:.1f} |")
    thr = [r for r in res["results"] if r["kind"] == "throughput" and "requests" in r]
    goals = _goals(res)
    out += [""] * bool(sources or thr or goals)
    out += goals
    out += [f"{'*' * (i + 1)} measured by `{src}`" for i, src in enumerate(sources)]
    out += [f"{_label(r)[0].upper()}{_label(r)[1:]} ({r['isl']} in, {r['osl']} out, concurrency {r['batch']}): "
            f"{r['requests_finished']} of {r['requests']} requests "
            "finished in the measured window" + ("" if _whole(r) else
                                                 " (cut short by --throughput-seconds: the rate so far)")
            + _split(r) for r in thr]
    paths = [r for r in res["results"] if r.get("kernel_paths")]
    if paths:
        out += ["", "Decode kernel paths (kernels/configs for this GPU): " + "; ".join(
            f"batch {r['batch']}: MoE {r['kernel_paths']['moe']}, linears on kernels.linear: "
            f"{', '.join(r['kernel_paths']['linears']) or 'none (cuBLAS)'}" for r in paths)]
    for key, variant_first, intro in _variant_lines(res):
        rows = [r for r in res["results"] if f"{key}_tokens_per_s" in r]
        if not rows:
            continue
        pairs = []
        for r in rows:
            tok, ms = (r[f"{key}_tokens_per_s"], r["tokens_per_s"]), (r[f"{key}_step_ms"], r["step_ms"])
            if not variant_first:
                tok, ms = tok[::-1], ms[::-1]
            speedup = f"{r['overlap_speedup']:.2f}x, " if key == "lockstep" else ""
            pairs.append(f"batch {r['batch']}: {tok[0]:.1f} vs {tok[1]:.1f} tok/s ({speedup}{ms[0]:.2f} vs "
                         f"{ms[1]:.2f} ms/step)")
        out += ["", intro + "; ".join(pairs)]
    for r in res.get("profiles", []):
        out += step_profile.markdown(r)
    errors = [f"{'Device fault' if e.get('device_fault') else 'Failed'} in {e['what']}: {e['error'][:300]}"
              + (f" (`{e['source']}`)" if e.get("source") else "") for e in res.get("errors", [])]
    out += [""] * bool(errors) + errors
    if not res.get("complete", True):
        out += ["", "(cut short: the run ended before its last measurement)"]
    return "\n".join(out)


def _split(r: dict) -> str:
    """Where a throughput run's time went: steps that computed prompt tokens, and decode-only steps."""
    if "decode_steps" not in r:
        return ""
    parts = []
    for kind, what in (("prefill", "steps with prompt tokens"), ("decode", "decode-only steps")):
        n, sec, gen = r[f"{kind}_steps"], r[f"{kind}_s"], r[f"{kind}_generated"]
        if n:
            parts.append(f"{sec:.1f} s in {n} {what} ({1e3 * sec / n:.1f} ms a step, {gen / n:.0f} tokens "
                         f"generated a step, {gen / sec if sec else 0:.0f} tok/s)")
    return ". " + "; ".join(parts) if parts else ""


BEGIN, END = "<!-- bench.gpu results: begin -->", "<!-- bench.gpu results: end -->"


SESSION = datetime.timedelta(hours=6)  # runs this close to the newest belong to its device session


def _when(date: str) -> datetime.datetime:
    """bench.gpu's ISO date (with the device's UTC offset) as naive UTC, comparable with any other."""
    t = datetime.datetime.fromisoformat(date)
    return t.astimezone(datetime.timezone.utc).replace(tzinfo=None) if t.tzinfo else t


def merged(runs: list[dict]) -> dict:
    """One (GPU, model)'s runs -> the newest, completed by the runs of its session: a row (kind, batch, KV
    cache) the newest lacks comes from the newest run that has it (a call with --phases throughput alone,
    say, beside the decode run), tagged with that run's command and date; profiles likewise, from the
    newest with any."""
    runs = sorted(runs, key=lambda r: _when(r["date"]), reverse=True)
    head = runs[0]
    session = [r for r in runs if _when(head["date"]) - _when(r["date"]) <= SESSION]
    out, seen = dict(head, results=[]), set()
    for r in session:
        for row in r["results"]:
            if (row["kind"], row["batch"], _kv(row)) not in seen:
                seen.add((row["kind"], row["batch"], _kv(row)))
                out["results"].append(row if r is head else dict(row, source=f"{r['command']} ({r['date']})"))
    out["profiles"] = next((r["profiles"] for r in session if r.get("profiles")), [])
    out["errors"] = [e if r is head else dict(e, source=f"{r['command']} ({r['date']})")
                     for r in session for e in r.get("errors", [])]
    return out


def update_benchmarks(results: Path, target: Path) -> int:
    """Put the newest result per (GPU, model) found under `results`, completed by its session's other runs
    (merged), between BEGIN and END in `target` (appended with a heading the first time): GPU runs happen
    on another machine, whose JSON comes back as files, and BENCHMARKS.md is written from them here, never
    by hand."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for f in sorted(results.glob("gpu-*.json")):
        res = json.loads(f.read_text())
        if res.get("dry_run") or not (res.get("results") or res.get("errors")):
            continue
        runs.setdefault((res["gpu"], res["model"]), []).append(res)
    newest = {key: (m["date"], m) for key, m in ((k, merged(v)) for k, v in runs.items())}
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
