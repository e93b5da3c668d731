"""The MoE kernel's variants side by side, in one run, at a model's shapes.

    python -m bench.moe_variants [--model gpt-oss-120b] [--tokens 1,8,64,256]
    python -m bench.moe_variants --dry-run    # tiny preset on CPU under TRITON_INTERPRET=1 (the flow only)

Per token count (routing uniform over the experts, as kernels.tune draws it):
`own` is the kernels' own E2M1 decode feeding bf16 dots, `scaled` the same
launch through tl.dot_scaled (the default on a GPU for 16-bit activations),
both at the launcher's default config, `gemv` the single-pair tiles of
kernels.moe_gemv (kernels.moe_configs.gemv_config), `rs` the register-operand MMA
tiles of kernels.moe_rs (kernels.moe_configs.rs_config), `split` the default MMA tiles split 4 ways over K
(kernels.moe_configs.split_configs: more programs for a decode step's few tiles), `dq` the MMA tiles over
weights decoded once a call to bf16 (kernels.moe_dq; the decode's time included), and `scaled tuned` at the config that
kernels/configs holds for this device (when it has one). Each is checked
against moe_reference (max error over max |reference|) and timed as a CUDA-graph
replay under triton.testing.do_bench; GB/s counts the expert weights the step
touches (every routed expert's W1 and W2 once) over that time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch


def _timer(fn, cuda: bool) -> float:
    """Seconds per call: graph replay under do_bench on CUDA; one perf_counter call otherwise."""
    if not cuda:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    import triton
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=20, rep=100) / 1e3


def run(model: str, tokens: list[int], device: str, dtype, state=None):
    """Yields a row per (tokens, variant) as it is measured. A variant that raises gets a row with its
    error and the run goes on; with a kernels.faults state (a supervised run on a GPU), a device fault is
    recorded and raised (the context is lost), and a variant that faulted before is skipped."""
    from kernels import _tune_cases as cases
    from kernels import faults
    from kernels import tuned
    from kernels.moe_configs import default_config, dq_configs, gemv_configs, rs_configs, split_configs
    from models.checkpoint import PRESETS
    cfg = PRESETS[model]
    ws = cases.moe_weights(cfg, dtype, device)
    per_expert = sum(t[0].numel() * t.element_size() for t in ws)
    cuda = torch.device(device).type == "cuda"
    for n in tokens:
        f, args, kw, ref = cases.make_call("moe", cfg, n, None, 0, dtype, device, ws)
        r = ref().float()
        touched = torch.unique(args[1][0]).numel()
        d = default_config(n * cfg.num_experts_per_tok, cfg.num_local_experts, not cuda)
        variants = [("own", False, {"moe_w1": d, "moe_w2": d}), ("scaled", True, {"moe_w1": d, "moe_w2": d}),
                    ("gemv", None, gemv_configs(not cuda)), ("rs", None, rs_configs(not cuda)),
                    ("split", None, split_configs(not cuda)), ("dq", None, dq_configs(not cuda, 128 if cuda else 16))]
        if cuda and tuned.lookup("moe_w1", _shape(cfg, dtype), n, args[0].device) is not None:
            variants.append(("scaled tuned", True, {}))
        for name, scaled, forced in variants:
            key, row = f"{n} {name}", dict(tokens=n, experts=touched, variant=name)
            if state and key in state.done:
                continue
            if state and (prior := state.faulted(name)):
                yield dict(row, error=f"skipped: faulted the device earlier in this run ({prior[:120]})")
                continue
            try:
                with tuned.forced(forced):
                    call = lambda: f(*args, **kw, scaled=scaled)  # noqa: E731
                    err = ((call().float() - r).abs().max() / r.abs().max()).item()
                    sec = _timer(call, cuda)
                row.update(us=sec * 1e6, rel_err=err, GBps=touched * per_expert / sec / 1e9)
            except Exception as e:  # noqa: BLE001 - one variant's error (a compile error, no resources) is its row's
                if state and faults.is_sticky(e):
                    state.finish(key)
                    fault = faults.DeviceFault(name, e)
                    fault.row = row
                    raise fault from e
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            if state:
                state.finish(key)
            yield row


def _shape(cfg, dtype) -> str:
    from kernels.moe_configs import tuning_shape
    return tuning_shape(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok, dtype)


HEAD = "| tokens | experts touched | variant | us | max error / max | weight GB/s |\n|---:|---:|---|---:|---:|---:|"


def line(r: dict) -> str:
    if "error" in r:
        return f"| {r['tokens']} | {r['experts']} | {r['variant']} | - | {r['error']} | - |"
    return f"| {r['tokens']} | {r['experts']} | {r['variant']} | {r['us']:.1f} | {r['rel_err']:.1e} | {r['GBps']:.0f} |"


def main(argv=None) -> int:
    from kernels import faults
    from kernels._cli import counts
    from models.checkpoint import PRESETS
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt-oss-120b", choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=counts(), default="1,8,64,256", help="tokens per step, comma separated")
    ap.add_argument("--dry-run", action="store_true", help="tiny preset, CPU, Triton interpreter")
    ap.add_argument("--resume", type=Path, help=argparse.SUPPRESS)  # kernels.faults: a supervised child's state
    a = ap.parse_args(argv)
    tokens = a.tokens
    if a.dry_run:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("bench.moe_variants --dry-run: set TRITON_INTERPRET=1 (before Python starts)", file=sys.stderr)
            return 2
        model, device = "tiny", "cpu"
    elif not torch.cuda.is_available():
        print("bench.moe_variants: needs CUDA (or --dry-run)", file=sys.stderr)
        return 2
    elif a.resume is None:  # a device fault must not lose the other variants' rows (kernels.faults)
        return faults.supervise("bench.moe_variants", argv)
    else:
        model, device = a.model, "cuda"
    state = faults.State.load(a.resume) if a.resume else None
    if not (state and state.done):
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter)"
        shown = " ".join(faults.public_argv(argv))
        print(f"### MoE variants, {model} on {name}\n\n`python -m bench.moe_variants {shown}`\n\n{HEAD}",
              flush=True)
    try:
        for r in run(model, tokens, device, torch.bfloat16, state):
            print(line(r), flush=True)
    except faults.DeviceFault as f:
        state.fault(f)
        print(line(dict(f.row, error=f"FAULT ({f.error[:160]})")), flush=True)
        return faults.FAULT_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
