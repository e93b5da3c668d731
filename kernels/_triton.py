"""Optional Triton import and deferred `triton.jit`.

Kernel modules also hold the torch references the CPU path runs, so they must
import without Triton. And `triton.jit` picks interpreter vs compiler from
TRITON_INTERPRET at decoration time: decorating at import would freeze that
choice before a test sets the variable, so kernels are jitted on first launch.
"""

from types import SimpleNamespace

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # the stub only has to survive `def f(X: tl.constexpr)` at import
    triton = None
    tl = SimpleNamespace(constexpr=object)
    HAVE_TRITON = False

_jitted: set[str] = set()


def jit_module(g: dict, names: tuple[str, ...]) -> None:
    """Replace the plain functions `names` in module globals `g` by jitted ones, once.

    Helpers called from kernels must be listed too: kernels look them up in
    the same globals, and compiled kernels can only call jitted functions.
    """
    if g["__name__"] in _jitted:
        return
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; the torch path (GPTOSS_KERNELS=torch) needs no kernels")
    for n in names:
        g[n] = triton.jit(g[n])
    _jitted.add(g["__name__"])


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
