"""Every Triton kernel compiles for sm_90 (H100/H200) at the launchers' real-model configurations,
without spills, within a block's shared memory and the register file. No GPU needed: Triton bundles
ptxas. The interpreter tests cannot see any of this.

The suite imports triton under TRITON_INTERPRET=1 (tests/conftest.py), which leaves triton.language
interpreted for the whole process, so aot.check compiles in one fresh process, once per module."""

import functools

import pytest

pytest.importorskip("triton")

from kernels import aot  # noqa: E402

ARCH = 90
CONFIGS = aot.plan(ARCH)  # recording the launches is cheap (no compiling): enough to name the cases


@functools.cache
def _usages() -> list[aot.Usage]:
    rows = aot.check(ARCH)
    assert [(u.kernel, u.config) for u in rows] == [(c.kernel, c.label) for c in CONFIGS]
    return rows


def test_every_kernel_is_covered():
    import kernels.attention
    import kernels.moe
    import kernels.rmsnorm
    import kernels.rope
    import kernels.route
    mods = (kernels.attention, kernels.moe, kernels.rmsnorm, kernels.rope, kernels.route)
    assert {c.kernel for c in CONFIGS} == {n for m in mods for n in m._KERNELS if n.endswith("_kernel")}


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=[f"{c.kernel}[{c.label}]" for c in CONFIGS])
def test_compiles_without_spills_within_limits(i):
    u = _usages()[i]
    where = f"{u.kernel} {u.config} ({u.uses})"
    assert u.error is None, f"{where}: {u.error}"
    assert (u.spill_stores, u.spill_loads) == (0, 0), f"{where} spills"
    assert 0 < u.regs <= 255, where
    assert u.smem <= min(228 * 1024, aot.SMEM_LIMIT[ARCH]), where
    assert u.num_warps == CONFIGS[i].options.num_warps, where
