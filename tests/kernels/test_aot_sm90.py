"""Every Triton kernel compiles for sm_90 (H100/H200) at the launchers' real-model configurations,
without spills, within a block's shared memory and the register file, with its wgmma left asynchronous
and no fp32 dot left at tf32.
No GPU needed: Triton bundles ptxas. The interpreter tests cannot see any of this.

The suite imports triton under TRITON_INTERPRET=1 (tests/conftest.py), which leaves triton.language
interpreted for the whole process, so aot.check compiles in one fresh process, once per module."""

import functools
from pathlib import Path

import pytest

pytest.importorskip("triton")

from kernels import aot, aot_workloads  # noqa: E402

ARCH = 90
CONFIGS = aot.plan(ARCH)  # recording the launches is cheap (no compiling): enough to name the cases


@functools.cache
def _usages() -> list[aot.Usage]:
    rows = aot.check(ARCH)
    assert [(u.kernel, u.config) for u in rows] == [(c.kernel, c.label) for c in CONFIGS]
    return rows


def test_every_kernel_is_covered():
    """Every kernel of every module in kernels/ (found, not listed: a new module is covered too) is compiled."""
    import importlib
    import pkgutil

    import kernels
    mods = [importlib.import_module(f"kernels.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)]
    names = {n for m in mods for n in getattr(m, "_KERNELS", ()) if n.endswith("_kernel")}
    assert {"_dequant_kernel", "_w1_rs_kernel", "_attn_kernel", "_sample_kernel"} <= names
    assert {c.kernel for c in CONFIGS} == names


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=[f"{c.kernel}[{c.label}]" for c in CONFIGS])
def test_compiles_without_spills_within_limits(i):
    u = _usages()[i]
    where = f"{u.kernel} {u.config} ({u.uses})"
    assert u.error is None, f"{where}: {u.error}"
    assert (u.spill_stores, u.spill_loads) == (0, 0), f"{where} spills"
    assert 0 < u.regs <= 255, where
    assert u.smem <= min(228 * 1024, aot.SMEM_LIMIT[ARCH]), where
    assert u.num_warps == CONFIGS[i].options.num_warps, where
    assert u.serialized is None, f"{where}: ptxas serializes its wgmma ({u.serialized})"
    assert CONFIGS[i].options.launch_pdl and u.pdl is None, f"{where}: PDL {u.pdl}"
    assert not u.tf32, f"{where}: an fp32 dot at tf32, which its interpreter test cannot see"


def test_step_shapes_do_not_multiply_compilations():
    """A server meets every token count and block-table width. Within one launch configuration
    (same tiles, splits, warps) those must not each need a compilation of their own: Triton would
    otherwise compile per value class (1, a multiple of 16, other) of every such argument, a stall
    of seconds in the middle of serving. Over 24 step shapes, one compilation per configuration."""
    from models.checkpoint import PRESETS
    cfg = PRESETS["gpt-oss-20b"]
    # decode batches 17..32 all pick one split count; prefill chunks of 2..500 tokens one tile set
    shapes = [(b, 1, ctx) for b in (17, 19, 24, 32) for ctx in (100, 1000, 4099)]
    shapes += [(1, q, q + extra) for q in (2, 3, 16, 17, 100, 500) for extra in (0, 33)]
    uses = [(f"{b}x{q}@{c}", aot_workloads.step_launches(cfg, b, q, c)) for b, q, c in shapes]
    per_kernel = {}
    for c in aot.bind(uses, ARCH):
        per_kernel[c.kernel] = per_kernel.get(c.kernel, 0) + 1
    # attention: decode and prefill tiles, each with and without the window; MoE: decode and prefill
    # tiles (align: two chunk sizes for prefill); norms with and without the residual; rotary into
    # the cache (engine steps) and into new tensors (dense forwards); routing with a graph step's
    # padding mask (its rows dropped) and without (a prefill)
    assert per_kernel["_attn_kernel"] == 4 and per_kernel["_rope_kernel"] == 2, per_kernel
    assert per_kernel["_route_kernel"] == 2, per_kernel
    assert max(per_kernel.values()) <= 4 and sum(per_kernel.values()) <= 18, per_kernel


def test_plan_covers_what_the_model_launches():
    """The plan is built from the launchers called by hand; the model must launch nothing else. Recorded
    from the full-size models themselves on the meta device (aot_workloads.model_launches): every distinct
    compilation they need is in the plan. (It found the MoE reading an identity expert map, HAS_MAP,
    in every single-process run, a variant the plan never compiled.)"""
    def key(c):
        return c.kernel, repr(c.src.signature), repr(c.src.constants), repr(c.src.attrs), repr(c.options)
    planned = {key(c) for c in CONFIGS}
    # and one rank of 120b ep8, with replicated attention and with attention DP (helm's preset), and
    # TP rank 1 of an attention-DP group of 2 (half the heads, the second share of the group's rows)
    cases = [(m, 1, 1, False) for m in aot_workloads.MODELS] + [
        ("gpt-oss-120b", 1, 8, False), ("gpt-oss-120b", 1, 8, True), ("gpt-oss-120b", 2, 8, True)]
    for preset, tp, ep, dp in cases:
        real = aot.bind(aot_workloads.model_launches(preset, ep=ep, attn_dp=dp, tp=tp), ARCH)
        assert len(real) >= 9
        missing = [f"{c.kernel} {c.label} ({', '.join(c.uses)})" for c in real if key(c) not in planned]
        assert not missing, missing


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[2].glob("kernels/configs/*.json")),
                         ids=lambda p: p.name)
def test_the_committed_gpu_configs_compile(path, monkeypatch):
    """The configs kernels.tune measured and committed (kernels/configs/<GPU>.json) are what that GPU runs
    from its first step; a kernel change that a measured config no longer compiles under (a spill at its
    tiles, a constexpr it lost) would otherwise show only on that GPU. The plan recorded with the file
    differs from the defaults' (the file is read), and every compilation in it is clean."""
    from kernels import tuned
    monkeypatch.setenv(tuned.ENV, str(path))
    tuned.clear_cache()
    try:
        configs = aot.plan(ARCH)
    finally:
        tuned.clear_cache()
    assert {(c.kernel, c.label) for c in configs} - {(c.kernel, c.label) for c in CONFIGS}
    rows = aot.check(ARCH)  # a fresh process, which inherits the file's path
    assert [(u.kernel, u.config) for u in rows] == [(c.kernel, c.label) for c in configs]
    bad = [f"{u.kernel} {u.config} ({u.uses}): {'; '.join(u.problems(ARCH))}" for u in rows if u.problems(ARCH)]
    assert not bad, bad


def test_every_graph_buckets_attention_splits_are_compiled():
    """Decode attention's default key-range split count depends on the batch; every CUDA-graph bucket's
    (kernels.cuda_graphs.DEFAULT_BUCKETS: 8 splits up to 4 sequences, 4 at 8, 2 at 16, then 1) is in the
    plan, for 120b's heads. The decode batches alone (1, 8, 64, 256) left out the 16-sequence bucket's 2."""
    import re

    from kernels.attention import _default_config
    from kernels.cuda_graphs import DEFAULT_BUCKETS
    from models.checkpoint import PRESETS
    cfg = PRESETS["gpt-oss-120b"]
    K, G = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    want = {_default_config(1, b, K, G, True, False)["NUM_SPLITS"] for b in DEFAULT_BUCKETS}
    got = {int(re.search(r"NUM_SPLITS=(\d+)", c.label).group(1)) for c in CONFIGS
           if c.kernel == "_attn_kernel" and "ROPE=True" in c.label and "KV=fp8" not in c.label}
    assert want == {8, 4, 2, 1} and want <= got


def test_a_bad_shard_names_the_flag(capsys):
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(SystemExit):
            aot.main(["--shard", bad])
        assert "--shard: expected K/N" in capsys.readouterr().err
