"""Every kernel module's jitted kernels hash on their own: Triton resolves each callee through the
globals of the module that defined it, so a helper aliased from another module (kernels.attention
takes kernels.rope's cache conversions) needs that module jitted too. Triton 3.6, the GPU image's,
checks this when it hashes a kernel for its cache, at its first launch; kernels.check's order (rope
before attention) hid it, an engine whose first launch was attention's failed on the H200."""

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import kernels  # noqa: E402

MODULES = sorted(m.name for m in pkgutil.iter_modules(kernels.__path__)
                 if "_KERNELS = " in (Path(kernels.__path__[0]) / f"{m.name}.py").read_text())

# compiled-mode JITFunctions (the interpreter's have no cache_key); nothing is launched, so no GPU
ENV = {**os.environ, "TRITON_INTERPRET": "0"}

PROBE = """
import importlib, sys
from kernels._triton import jit_module
m = importlib.import_module("kernels." + sys.argv[1])
jit_module(vars(m), m._KERNELS)
for n in m._KERNELS:
    getattr(m, n).cache_key  # raises on a callee that is a plain function
"""


def test_the_kernel_modules_are_found():
    assert {"attention", "rope", "moe", "moe_gate", "linear"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_each_module_jits_alone(name):
    # a fresh interpreter: jit_module's once-only state would let an earlier module's jitting hide a gap
    r = subprocess.run([sys.executable, "-c", PROBE, name], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_probe_catches_an_unjitted_callee():
    # without the home module jitted first (the fix), attention's kernels reference rope's plain _e4m3
    code = PROBE.replace("jit_module(vars(m), m._KERNELS)",
                         "import triton\nfor n in m._KERNELS: setattr(m, n, triton.jit(getattr(m, n)))")
    r = subprocess.run([sys.executable, "-c", code, "attention"], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode != 0 and "Unsupported function referenced" in r.stderr
