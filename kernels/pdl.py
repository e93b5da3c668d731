"""Programmatic dependent launch (Hopper+): a kernel starts while the one before it in the stream finishes.

A batch-1 decode step is ~265 launches (bench.decode_launches), most of them
a few microseconds long, and each one's start (the grid's launch, its CTAs
placed, the first loads' latency) used to wait for the previous kernel's last
CTA to retire. With PDL the next kernel is launched as soon as every CTA of
the current one has signalled (`griddepcontrol.launch_dependents`), so its
start overlaps the current kernel's work; it then waits
(`griddepcontrol.wait`) until that kernel has completed and its memory is
visible before it touches anything the kernel wrote or may still read.

The rule every project kernel follows: nothing before its `_pdl_enter(PDL)`
touches memory, but for L2 prefetches of weights (`l2_prefetch`: no data
comes back, and no kernel writes weights), so no load or store of a
PDL-launched kernel can race its predecessor. tests/kernels/test_pdl.py checks
each kernel's source; kernels.aot checks each compilation's SASS (no global
memory instruction before the wait). Kernels that are not launched with PDL
(torch's, cuBLAS's) keep the stream's full ordering.

`kernels._triton.launch` adds `PDL=True, launch_pdl=True` to the launches of
kernels that take a PDL argument, on a GPU where `enabled(device)` holds:
compute capability 9.0 or more, GPTOSS_PDL=1, and a self-test that ran
two dependent kernels eagerly and inside a CUDA graph and got the right
result. A platform that fails it (an old driver's graph capture, say) runs
without PDL, with a warning, instead of failing the step.

Off unless GPTOSS_PDL=1: on the H200 (session 27, torch 2.11 + Triton 3.6,
120b, bench.gpu's back-to-back A/B) batch-1 decode ran 286.5 tok/s with it
against 298.8 without. The likely cause, not measured: a kernel that lets its
dependents launch at its start hands SM slots to CTAs that only wait, and the
weight-streaming kernels want every SM. GPTOSS_PDL=exit tests that: every
kernel still waits first, but none signals, so its dependents launch as its
last CTAs exit (the implicit trigger), overlapping only the launch and the
flush; bench.gpu measures both modes beside the default.
"""

import os
import warnings

from ._triton import HAVE_TRITON, tl

ENV = "GPTOSS_PDL"
_probed: dict = {}  # device index -> the self-test's verdict


EXIT = 2  # the PDL constexpr of GPTOSS_PDL=exit launches (GPTOSS_PDL=1's is True)


def enter(PDL: tl.constexpr):
    """First statement of every kernel (imported as `_pdl_enter` and jitted with the module's kernels):
    wait for the previous kernel, then (PDL True, not EXIT) let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        if PDL != 2:  # EXIT: no signal; the dependents launch as this grid's CTAs exit
            tl.extra.cuda.gdc_launch_dependents()


_pdl_enter = enter  # the probes' copy, jitted in place; `enter` stays the plain function other modules import

# cp.async.bulk.prefetch.L2 (sm_90): the TMA unit reads [$1, $1 + $2) into L2; nothing comes back to the thread,
# so it never waits on the bytes (a size <= 0: skipped)
_PREFETCH_PTX_TEXT = ("{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
                      "mov.b32 $0, 0; }")
PREFETCH_PTX = tl.constexpr(_PREFETCH_PTX_TEXT) if HAVE_TRITON else None


def l2_prefetch(start, end, NCH: tl.constexpr, PTX: tl.constexpr):
    """Ask L2 for the bytes at addresses [start, end) (int64 scalars) as NCH bulk prefetches, the range
    rounded inward to whole 16-byte units (the instruction's alignment; never a byte outside it).

    A weight-streaming kernel calls it with its program's whole slice of the weights: the copy engine
    then has all of it in flight at once, where the kernel's own loads keep a step or two ahead, and
    before the PDL wait (weights are never written) it overlaps the previous kernel. Imported as
    `_l2_prefetch` (with PREFETCH_PTX, which it reads as a global) and jitted with the module's kernels.
    -> (chunk addresses, chunk sizes in bytes, <= 0 for none): what it asked for (PTX False: only that)."""
    lo = (start + 15) // 16 * 16
    hi = end // 16 * 16
    span = tl.maximum(hi - lo, 0)
    size = ((span + NCH - 1) // NCH + 15) // 16 * 16
    a = lo + tl.arange(0, NCH).to(tl.int64) * size
    n = tl.minimum(hi - a, size)
    if PTX:
        tl.inline_asm_elementwise(PREFETCH_PTX, "=r,l,r", [a, n.to(tl.int32)], dtype=tl.int32, is_pure=False,
                                  pack=1)
    return a, n


_l2_prefetch = l2_prefetch  # the jitted copy here (tests call it); modules import the plain function


def mode():
    """GPTOSS_PDL -> the PDL constexpr its launches take: "1" True (signal at the start), "exit" EXIT (no
    signal: launch at the CTAs' exit), unset or "0" False (off, the measured default, above)."""
    v = os.environ.get(ENV, "").strip()
    if v not in ("", "0", "1", "exit"):
        raise ValueError(f"{ENV}={v!r}: give 1 (programmatic dependent launch where the GPU has it), exit (the "
                         "same, dependents launched as each kernel exits) or 0 (off)")
    return EXIT if v == "exit" else v == "1"


def wanted() -> bool:
    """GPTOSS_PDL asks for PDL in either mode."""
    return bool(mode())


def enabled(device) -> bool:
    """Whether launches on this CUDA device take PDL (module docstring). Reads GPTOSS_PDL on each call;
    the self-test runs once per device, never inside a graph capture (undecided there: off)."""
    import torch
    if not wanted() or not HAVE_TRITON:
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _probed:
        if torch.cuda.get_device_capability(index)[0] < 9:
            _probed[index] = False
        elif torch.cuda.is_current_stream_capturing():
            return False
        else:
            _probed[index] = _self_test(torch.device("cuda", index))
    return _probed[index]


def _probe_write(x_ptr, N, ROUNDS, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = i.to(tl.float32)
    for _ in range(ROUNDS):  # long enough that a reader which did not wait would see the old values
        v = v * 1.0000001 + 0.5
    tl.store(x_ptr + i, v, mask=i < N)


def _probe_read(x_ptr, y_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < N) * 2.0, mask=i < N)


_KERNELS = ("_pdl_enter", "_l2_prefetch", "_probe_write", "_probe_read")


def _self_test(device) -> bool:
    """Writer then PDL reader, eagerly and replayed from a CUDA graph; True when the reader saw the writes."""
    import torch

    from ._triton import jit_module
    jit_module(globals(), _KERNELS)
    n, block, rounds = 1 << 16, 1024, 4096
    grid = (n // block,)
    try:
        with torch.cuda.device(device):
            x = torch.zeros(n, device=device)
            y = torch.zeros(n, device=device)

            def pair():
                _probe_write[grid](x, n, rounds, BLOCK=block, PDL=True, launch_pdl=True)
                _probe_read[grid](x, y, n, BLOCK=block, PDL=True, launch_pdl=True)

            pair()  # compiles; eager
            torch.cuda.synchronize(device)
            expect = x * 2
            ok = torch.equal(y, expect)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads' CUDA calls stay legal
                pair()
            x.zero_()
            y.zero_()
            graph.replay()
            torch.cuda.synchronize(device)
            ok = ok and torch.equal(y, expect)
    except Exception as e:  # noqa: BLE001 - any failure means: run without PDL
        warnings.warn(f"programmatic dependent launch off on {device}: its self-test failed ({type(e).__name__}: "
                      f"{e})", RuntimeWarning, stacklevel=2)
        return False
    if not ok:
        warnings.warn(f"programmatic dependent launch off on {device}: a dependent kernel read stale data in its "
                      "self-test", RuntimeWarning, stacklevel=2)
    return bool(ok)


__all__ = ["ENV", "EXIT", "PREFETCH_PTX", "enabled", "enter", "l2_prefetch", "mode", "wanted"]
