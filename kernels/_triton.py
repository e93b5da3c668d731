"""Optional Triton import, deferred `triton.jit`, and the launch hook kernels.aot records through.

Kernel modules also hold the torch references the CPU path runs, so they must
import without Triton. And `triton.jit` picks interpreter vs compiler from
TRITON_INTERPRET at decoration time: decorating at import would freeze that
choice before a test sets the variable, so kernels are jitted on first launch.
"""

from contextlib import contextmanager
from types import SimpleNamespace

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # the stub only has to survive `def f(X: tl.constexpr)` at import
    triton = None
    tl = SimpleNamespace(constexpr=object)
    HAVE_TRITON = False
if HAVE_TRITON:  # the interpreter's bf16 casts and dots as a GPU does them (CPU tests; no effect compiled)
    from . import _interp
    _interp.install()

_jitted: set[str] = set()
_recorded: list | None = None  # set inside recording()
_captured: list | None = None  # set inside capturing()


def no_specialize(g: dict, name: str) -> tuple[str, ...]:
    """The arguments of kernel `name` (module globals `g`: its `_NO_SPECIALIZE`) that change from step
    to step: token and pair counts, the block-table width. Triton would compile one copy per value
    class (1, a multiple of 16, anything else) of each; those classes change nothing in these kernels'
    code worth a compile stall in the middle of serving."""
    return tuple(g.get("_NO_SPECIALIZE", {}).get(name, ()))


def jit_module(g: dict, names: tuple[str, ...]) -> None:
    """Replace the plain functions `names` in module globals `g` by jitted ones, once.

    Helpers called from kernels must be listed too: kernels look them up in
    the same globals, and compiled kernels can only call jitted functions.
    """
    if g["__name__"] in _jitted or _recorded is not None:
        return
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; the torch path (GPTOSS_KERNELS=torch) needs no kernels")
    _jitted.add(g["__name__"])
    for n in names:
        # a helper aliased from another kernel module resolves its own callees in that module's globals:
        # those must be jitted too, or Triton (3.6 when hashing, any when compiling) rejects the plain one
        home = getattr(g[n], "__globals__", g)
        if home is not g and "_KERNELS" in home:
            jit_module(home, home["_KERNELS"])
        g[n] = triton.jit(g[n], do_not_specialize=no_specialize(g, n))


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs); inside recording(), only noted (plain function, args, kwargs)."""
    if _recorded is not None:
        _recorded.append((getattr(kernel, "fn", kernel), args, kwargs))
        return
    if takes_pdl(kernel) and "PDL" not in kwargs:
        dev = next((a.device for a in args if hasattr(a, "device") and hasattr(a, "data_ptr")), None)
        if dev is not None and dev.type == "cuda":
            from . import pdl
            if pdl.enabled(dev):
                kwargs = dict(kwargs, PDL=pdl.mode(), launch_pdl=True)
    if _captured is not None:
        _captured.append((kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


_takes_pdl: dict = {}


def takes_pdl(kernel) -> bool:
    """Whether a kernel has the PDL argument (kernels.pdl): its first statement is then `_pdl_enter(PDL)`."""
    import inspect
    fn = getattr(kernel, "fn", kernel)
    if fn not in _takes_pdl:
        _takes_pdl[fn] = "PDL" in inspect.signature(fn).parameters
    return _takes_pdl[fn]


@contextmanager
def environ(**values: str):
    """Environment variables set for the block, then restored (the kernel switches read them per call)."""
    import os
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def recording():
    """Collect the launches launchers make for a GPU, on meta tensors, without running anything.

    This is how kernels.aot compiles exactly what runs: the launchers' own
    config choice, argument values and dtypes. Inside, meta tensors count as
    GPU tensors and the interpreter is off whatever TRITON_INTERPRET says, and
    nothing is jitted, so a process whose tests interpret the kernels keeps them
    interpreted. Yields the list of launches.
    """
    global _recorded
    prev, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = prev


@contextmanager
def capturing():
    """Collect launches as (jitted kernel, grid, args, kwargs) instead of running them; yields the list.

    Unlike recording() this changes nothing else (real tensors, interpreter as
    configured): kernels.tune lets a launcher build its real arguments, then
    replays and times one kernel alone with `kernel[grid](*args, **kwargs)`.
    """
    global _captured
    prev, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = prev


_tickets: dict = {}  # (device, stream) -> int32 arrival counters, all zero between launches
_retired: list = []  # outgrown buffers: a CUDA graph captured with one still replays into it


def tickets(device, n: int):
    """At least n int32 arrival counters for launches on this device's current stream: the kernels whose
    last program to finish (a ticket from an acq_rel atomic) completes the launch (kernels.linear's and
    the MoE W1's split-K, kernels.moe_gate, kernels.moe_combine's tail, split attention's merge). Zeroed
    once, at first use, never per launch (that would be a launch of its own): every launch's last program
    sets its counters back to 0, so the next launch and a CUDA graph's replays find them so. Launches on
    another stream may overlap, so they get a buffer of their own (where a capture is a stream's first use,
    that graph holds the zeroing as one node); launches and graphs of one stream share its buffer, which
    holds while they run in that stream's order."""
    import torch
    device = torch.device(device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    c = _tickets.get((device, stream))
    if c is None or c.numel() < n:
        if c is not None:
            _retired.append(c)
        c = _tickets[(device, stream)] = torch.zeros(max(4096, next_pow2(n)), dtype=torch.int32, device=device)
    return c


def on_gpu(t) -> bool:
    """Whether t's kernels run compiled on a GPU (not in the interpreter on CPU tensors)."""
    return t.is_cuda or (_recorded is not None and t.is_meta)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def interpreting() -> bool:
    import os
    return _recorded is None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
