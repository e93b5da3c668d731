"""kernels.tune's work list and what each item sweeps: the tasks (family, model, batch bucket) in the order
they are tuned, and per task the candidate configs of each kernel, all known before any GPU work, so that
the compile workers can start on a task while the one before it is timed. Candidate sets: kernels/_tune_cases.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _tune_cases as cases
from ._tune_results import Result


@dataclass
class Task:
    family: str  # moe | gate | attn_decode | attn_prefill | linear
    model: str  # the preset the shapes come from
    models: list[str]  # every model with this shape
    n: int  # batch bucket: tokens (moe, prefill, linear) or sequences (decode)
    window: int | None = None
    linear: str | None = None  # which of _tune_cases.LINEARS


@dataclass
class Sweep:
    """One kernel's candidates, launched beside fixed configs of the others (`others`)."""
    kernel: str  # the tuned.forced key: moe_w1, moe_w2, gate, attn_decode, attn_prefill, linear
    cands: list[dict]
    others: dict
    timed: set[str] | None  # the Triton kernels whose launches are timed (None: all)
    check: list[str]  # the Triton kernels whose sm_<arch> compile must be clean
    stages: tuple = ()  # phase 2: the three fastest retried at these num_stages ...
    extra: tuple = ()  # ... and with each of these settings
    group: str = ""  # moe: path and BLOCK_M (mma16, rs16, gemv); W1 and W2 of one group go together


@dataclass
class Plan:
    """What a task sweeps, known before any GPU work: its phase-1 compiles can start early
    (kernels.tune.Tuner.prefetch)."""
    task: Task
    sweeps: list[Sweep]
    results: dict[str, Result]
    default: dict | None = None


def tasks(models: list[str], batches: list[int], families: set[str], prefill_from: int,
          linears: tuple[str, ...] = cases.LINEARS) -> list[Task]:
    """Batches in the order given (the default: smallest first; batch-1 decode is what the defaults were
    least sure of), so a run cut short by --max-seconds has written those; attention and linear shapes
    shared by several models are tuned once."""
    from models.checkpoint import PRESETS
    from .linear import MAX_ROWS
    from .moe_gate import GATE_MAX_ROWS
    out: list[Task] = []
    for n in batches:
        if "moe" in families:
            out += [Task("moe", m, [m], n) for m in models]
        if "gate" in families and n <= GATE_MAX_ROWS:  # kernels.moe_gate's one launch: decode steps only
            out += [Task("gate", m, [m], n) for m in models]
        if "linear" in families and n <= MAX_ROWS:
            by_shape: dict[tuple, Task] = {}
            for m in models:
                # up to GATE_MAX_ROWS the router is inside kernels.moe_gate's launch: nothing to tune
                for which in (w for w in linears if not (w == "router" and n <= GATE_MAX_ROWS)):
                    key = cases.linear_shape(PRESETS[m], which)
                    if key in by_shape:
                        by_shape[key].models.append(m)
                    else:
                        by_shape[key] = Task("linear", m, [m], n, linear=which)
            out += list(by_shape.values())
        if "attn" not in families:
            continue
        fam = "attn_decode" if n < prefill_from else "attn_prefill"
        by_shape: dict[tuple, Task] = {}
        for m in models:
            c = PRESETS[m]
            for w in (c.sliding_window, None):
                key = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, w)
                if key in by_shape:
                    by_shape[key].models.append(m)
                else:
                    by_shape[key] = Task(fam, m, [m], n, w)
        out += list(by_shape.values())
    return out


def plan_task(task: Task, dtype: torch.dtype, dry: bool, context: int) -> Plan:
    """What `task` sweeps; `dry`: the interpreter's tiny flow (the default's tiles, two candidates each)."""
    return {"moe": _moe, "linear": _linear, "gate": _gate}.get(task.family, _attention)(task, dtype, dry, context)


def _moe(task: Task, dtype: torch.dtype, dry: bool, context: int) -> Plan:
    from models.checkpoint import PRESETS

    from .moe_configs import default_config, dq_configs, gemv_configs, rs_configs, tuning_shape
    cfg = PRESETS[task.model]
    k, E = cfg.num_experts_per_tok, cfg.num_local_experts
    shape = tuning_shape(cfg.hidden_size, cfg.intermediate_size, E, k, dtype)
    d = default_config(task.n * k, E, dry)
    label = f"{task.model.removeprefix('gpt-oss-')} E={E}"
    results = {kn: Result(kn, shape, label, task.n, default=d) for kn in ("moe_w1", "moe_w2")}
    # each path's W1 and W2 go together (each hands W2 its own activations): one group per path and BLOCK_M
    groups: list[tuple[str, int, dict, tuple[str, str]]] = []
    bms = cases.moe_block_ms(cfg, task.n)
    if dry:  # the default's tiles, and single-pair tiles where the sweep tries them
        bms = [b for b in bms if b in (1, d["BLOCK_M"])]
    for bm in bms:
        if bm == 1:
            groups.append(("gemv", 1, gemv_configs(dry), ("_w1_gemv_kernel", "_w2_gemv_kernel")))
            continue
        groups.append((f"mma{bm}", bm, {kn: {**d, "BLOCK_M": bm} for kn in ("moe_w1", "moe_w2")},
                       ("_w1_kernel", "_w2_kernel")))
        if dtype != torch.float32:  # kernels.moe_rs serves 16-bit activations
            groups.append((f"rs{bm}", bm, rs_configs(dry, bm), ("_w1_rs_kernel", "_w2_rs_kernel")))
        # weights decoded once a step (kernels.moe_dq) for 16-bit GEMM tiles: prefill-sized steps (the dry run
        # walks its flow at the default's tiles)
        if (bm >= cases.DQ_MIN_BLOCK_M and dtype != torch.float32) or (dry and bm == d["BLOCK_M"]):
            groups.append((f"dq{bm}", bm, dq_configs(dry, bm), ("_w1_kernel", "_w2_kernel")))
    sweeps = []
    for key, bm, base, (w1, w2) in groups:
        for kn, other, kernel in (("moe_w1", "moe_w2", w1), ("moe_w2", "moe_w1", w2)):
            dq = key.startswith("dq")
            cands = (cases.dry_candidates(kn, base[kn]) if dry else cases.dq_candidates(kn, bm) if dq
                     else cases.moe_candidates(kn, bm, rs=key.startswith("rs")))
            if key == f"mma{d['BLOCK_M']}" and d not in cands:
                cands = [d, *cands]
            # W1 is timed with align, and with the copy of x the gemv tiles (align, or past a few rows
            # _x16_kernel, makes it) and the rs tiles (_xperm_kernel) read; and with both decodes of the dq tiles
            # (W2's runs between W1 and W2, so the group's W1 + W2 is the step's whole cost)
            timed = ({kernel, "_align_kernel", "_x16_kernel", "_xperm_kernel", "_dequant_kernel"} if kn == "moe_w1"
                     else {kernel})
            check = [kernel, "_dequant_kernel"] if dq and kn == "moe_w1" else [kernel]
            # at one token W2 ends with the combine: also how many chunks its tail takes a pass
            tail = cases.tail_extras(cfg) if kn == "moe_w2" and task.n == 1 else ()
            sweeps.append(Sweep(kn, cands, {other: base[other]}, timed, check, () if dry else cases.MOE_STAGES,
                                () if dry or dq else cases.L2PF + tail, key))
    return Plan(task, sweeps, results, d)


def _attention(task: Task, dtype: torch.dtype, dry: bool, context: int) -> Plan:
    from models.checkpoint import PRESETS

    from .attention import _default_config, tuning_shape
    cfg = PRESETS[task.model]
    decode = task.family == "attn_decode"
    K, Hq, D = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    shape = tuning_shape(Hq, K, D, cases.PAGE, task.window, dtype)
    d = _default_config(1 if decode else task.n, task.n if decode else 1, K, Hq // K, not dry, dry)
    label = f"{','.join(m.removeprefix('gpt-oss-') for m in task.models)} " + (
        f"window={task.window}" if task.window else "full") + (f" ctx={context}" if decode else "")
    res = Result(task.family, shape, label, task.n, default=d)
    cands = (cases.dry_candidates(task.family, d) if dry
             else cases.attn_candidates(decode, cfg, task.n, task.window))
    if d not in cands:
        cands = [d, *cands]
    return Plan(task, [Sweep(task.family, cands, {}, None, ["_attn_kernel"],
                             () if dry else cases.ATTN_STAGES)], {task.family: res}, d)


def _linear(task: Task, dtype: torch.dtype, dry: bool, context: int) -> Plan:
    from models.checkpoint import PRESETS

    from .linear import tuning_shape
    N, K, bias = cases.linear_shape(PRESETS[task.model], task.linear)
    label = f"{','.join(m.removeprefix('gpt-oss-') for m in task.models)} {task.linear} {N}x{K}"
    res = Result("linear", tuning_shape(N, K, bias, dtype), label, task.n)
    if dry:  # and a GEMV tile where the sweep tries them (one row), so the dry run walks it through the flow
        cands = cases.dry_candidates("linear", dict(BLOCK_N=16, BLOCK_K=32))
        cands += [dict(GEMV=True, BLOCK_N=16, BLOCK_K=32)] if task.n == 1 else []
    else:
        cands = cases.linear_candidates(task.n)
    return Plan(task, [Sweep("linear", cands, {}, {"_linear_kernel"}, ["_linear_kernel"],
                             () if dry else cases.LINEAR_STAGES, () if dry else cases.L2PF)],
                {"linear": res})


def _gate(task: Task, dtype: torch.dtype, dry: bool, context: int) -> Plan:
    from models.checkpoint import PRESETS

    from .moe_gate import gate_config, tuning_shape
    cfg = PRESETS[task.model]
    H, E = cfg.hidden_size, cfg.num_local_experts
    d = gate_config(H, E)
    res = Result("gate", tuning_shape(H, E, cfg.num_experts_per_tok, dtype),
                 f"{task.model.removeprefix('gpt-oss-')} gate", task.n, default=d)
    cands = cases.dry_candidates("gate", d) if dry else cases.gate_candidates(cfg)
    if d not in cands:
        cands = [d, *cands]
    return Plan(task, [Sweep("gate", cands, {}, {"_gate_kernel"}, ["_gate_kernel"])], {"gate": res}, d)
