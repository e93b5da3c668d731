"""Decode-sized linear layers, y = x @ W^T + b for a few rows, as one Triton launch where kernels.tune
measured it faster than cuBLAS on this GPU, for this shape and batch.

At batch 1 a decode step's linears (fused qkv, the output projection, the router, the unembedding)
are streams of bf16 weights: on an H200 cuBLAS ran them at 58% of copy bandwidth, ~1.26 ms of a
5.08 ms gpt-oss-120b step, and with more launches than the linears themselves (BENCHMARKS.md
"GPU"). Here a program owns BLOCK_N output features for up to BLOCK_M rows and streams its
[BLOCK_N, K] slice of W through a software-pipelined loop (num_stages) into tensor-core dots, the
rows padded to the MMA's 16 (the MMA has the spare throughput, the stream has none); the bias is
added in the epilogue, in fp32, before the one rounding to the output dtype.

Split-K (config SPLIT_K > 1). With few features a program per BLOCK_N leaves most of 132 SMs idle (the
router's 128: 4 programs of 32); cuBLAS splits K there, as a GEMM and then a second kernel
(splitKreduce, 1.86 us a call, 72 a 120b step: bench/results). Here the split is one launch, grid
(N tiles, row tiles, SPLIT_K): program s streams a K range of whole BLOCK_K steps (the last shorter,
or empty) and stores its fp32 tile to `part` [SPLIT_K, padded rows, N]. Then a barrier, so all of its
threads have stored, and one acq_rel atomic per program takes a ticket from the tile's counter; the
program holding the last ticket sums part[0..SPLIT_K) in that fixed order (the same bits whichever
program arrives last), read through L2 (.cg), adds the bias, rounds once, and sets the counter back
to 0. On a GPU the release half publishes each partial and the last ticket's acquire sees them all;
the interpreter runs the programs one after another, so the tile's last program reduces.
The counters are not zeroed per call, which would be the extra launch again: `_triton.tickets`.

GEMV (config GEMV, one row only). The MMA pads a decode row to 16 and stages W through shared memory;
at batch 1 neither buys anything. Here each thread multiplies its slice of the [BLOCK_N, BLOCK_K] W tile
by the row's K slice and keeps the fp32 products in registers, added up over the K steps in place; the
tile's K lanes are summed once, after the loop. A different summation order from the MMA's, so not the
same bits (within fp32 rounding of the reference, tested). A GEMV entry serves one row: at more, the
call is F.linear, as without an entry.

It is never a default: with no measured entry (kernels/configs, kernels.tuned) the call is
F.linear, cuBLAS on a GPU. kernels.tune's "linear" family times cuBLAS beside the candidates and
writes an entry only where a candidate wins and matches the reference. The reference is
`linear_reference` (F.linear in fp32); tests/kernels/test_linear.py compares the two under the
interpreter.
"""

import torch
import torch.nn.functional as F

from . import tuned
from ._triton import interpreting, jit_module, launch, on_gpu, tickets, tl, triton
from .pdl import PREFETCH_PTX  # noqa: F401 (read as a global by _l2_prefetch where kernels.aot compiles it)
from .pdl import enter as _pdl_enter
from .pdl import l2_prefetch as _l2_prefetch

MAX_ROWS = 64  # beyond, a linear is a GEMM cuBLAS is built for: never looked up


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def _bias_store(acc, b_ptr, y_ptr, rm, rn, M, N, stride_y, HAS_BIAS: tl.constexpr):
    """The epilogue: + bias in fp32, one rounding to y's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def _linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, K_SPLIT, stride_x, stride_w, stride_y,
                   HAS_BIAS: tl.constexpr, DOT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, L2PF: tl.constexpr = False,
                   PTX: tl.constexpr = False, PDL: tl.constexpr = False, GEMV: tl.constexpr = False):
    """y[rows, cols] = x[rows] @ W[cols]^T (+ b[cols]) for BLOCK_N cols and BLOCK_M rows. SPLIT_K > 1: over
    K[s * K_SPLIT:][:K_SPLIT] for s = program_id(2), into part[s]; the tile's last program sums part.
    GEMV (BLOCK_M 1): no MMA; each thread keeps fp32 products of its slice of the tile, summed over K
    steps in place and across the tile's K lanes once at the end (module docstring).
    L2PF (on a GPU, PTX): the program's rows of W bulk-prefetched into L2 before the PDL wait (weights are
    never written, so this may overlap the previous kernel; kernels.pdl.l2_prefetch)."""
    if L2PF:  # W's rows of this column tile (asked by its first row tile only: the others read the same)
        n0 = tl.program_id(0) * BLOCK_N
        rows = tl.where(tl.program_id(1) == 0, tl.minimum(BLOCK_N, N - n0), 0).to(tl.int64)
        step: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
        first = w_ptr.to(tl.int64) + n0.to(tl.int64) * stride_w * step
        _l2_prefetch(first, tl.where(rows > 0, first + ((rows - 1) * stride_w + K) * step, first), 32, PTX)
    _pdl_enter(PDL)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_w
    k_lo = tl.program_id(2) * K_SPLIT if SPLIT_K > 1 else 0
    k_hi = tl.minimum(k_lo + K_SPLIT, K) if SPLIT_K > 1 else K
    if GEMV:
        prods = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):  # K_SPLIT is a multiple of BLOCK_K: a step stays in its split
        k = k0 + rk
        w = tl.load(w_rows + k[None, :], mask=(rn < N)[:, None] & (k < K)[None, :], other=0.0)
        if GEMV:  # the one row, broadcast over the tile's BLOCK_N rows of W
            x = tl.load(x_ptr + k, mask=k < K, other=0.0)
            prods += w.to(tl.float32) * x.to(tl.float32)[None, :]
        else:
            x = tl.load(x_rows + k[None, :], mask=(rm < M)[:, None] & (k < K)[None, :], other=0.0)
            if DOT_BF16:
                acc = tl.dot(x, tl.trans(w), acc)
            else:  # fp32 activations: an fp32 dot, not the GPU's default tf32 (F.linear's, unless torch allows
                # tf32, which the interpreter would not show); 16-bit ones take the bf16 dot, interpreted too
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    if GEMV:
        acc = tl.sum(prods, axis=1)[None, :]
    if SPLIT_K == 1:
        _bias_store(acc, b_ptr, y_ptr, rm, rn, M, N, stride_y, HAS_BIAS)
    else:
        # part [SPLIT_K, M_pad, N] fp32, its rows padded to whole tiles: only columns are masked
        parts = part_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        split = (tl.num_programs(1) * BLOCK_M).to(tl.int64) * N
        tl.store(parts + tl.program_id(2) * split, acc, mask=(rn < N)[None, :])
        tl.debug_barrier()  # all of this program's threads have stored before its ticket is taken
        count = count_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        # a scalar atomic runs once per program; acq_rel: releases this partial, and the last arriver's
        # acquire sees every earlier one's
        if tl.atomic_add(count, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for s in tl.static_range(SPLIT_K):  # in split order, whoever came last: a deterministic sum
                # .cg: from L2, where the other SMs' stores are, not from this SM's L1
                acc += tl.load(parts + s * split, mask=(rn < N)[None, :], other=0.0, cache_modifier=".cg")
            _bias_store(acc, b_ptr, y_ptr, rm, rn, M, N, stride_y, HAS_BIAS)
            tl.store(count, 0)  # zero again for the next launch: a CUDA graph replays the same counters


_KERNELS = ("_pdl_enter", "_l2_prefetch", "_linear_kernel", "_bias_store")
_NO_SPECIALIZE = {"_linear_kernel": ("M",)}


def tuning_shape(N: int, K: int, bias: bool, dtype) -> str:
    return tuned.shape_key(N=N, K=K, bias=bias, dtype=dtype)


def entry(N: int, K: int, bias: bool, rows: int, dtype, device) -> dict | None:
    """The measured config of an N x K linear at `rows` rows on `device`, or None (then F.linear)."""
    if not 0 < rows <= MAX_ROWS:
        return None
    return tuned.lookup("linear", tuning_shape(N, K, bias, dtype), rows, device)


def config_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict | None:
    """The measured config for this launch, or None (then F.linear)."""
    if x.dim() != 2 or weight.dim() != 2:
        return None
    cfg = entry(*weight.shape, bias is not None, x.shape[0], x.dtype, x.device)
    return None if cfg and cfg.get("GEMV") and x.shape[0] != 1 else cfg


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: dict) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T + bias [N] -> [M, N] in x.dtype, at config cfg (BLOCK_N, BLOCK_K,
    optional BLOCK_M (default: M rounded up to 16..64), SPLIT_K (default 1), GEMV (one row), num_warps,
    num_stages)."""
    jit_module(globals(), _KERNELS)
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    meta = {k: v for k, v in cfg.items() if k.startswith("BLOCK") or k in ("L2PF", "GEMV")}
    if meta.get("GEMV"):
        if M != 1:
            raise ValueError(f"linear: a GEMV config takes one row, not {M}")
        meta["BLOCK_M"] = 1
    meta.setdefault("BLOCK_M", max(16, min(64, triton.next_power_of_2(M))))
    split = meta["SPLIT_K"] = cfg.get("SPLIT_K", 1)
    grid = (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]), split)
    # each split a whole number of K steps; the last may be shorter (or empty)
    k_split = triton.cdiv(triton.cdiv(K, split), meta["BLOCK_K"]) * meta["BLOCK_K"] if split > 1 else K
    part, count = y, y  # unused without a split
    if split > 1:
        part = torch.empty(split, grid[1] * meta["BLOCK_M"], N, dtype=torch.float32, device=x.device)
        count = tickets(x.device, grid[0] * grid[1])
    opts = {} if interpreting() else {k: v for k, v in cfg.items() if k.startswith("num_")}
    launch(_linear_kernel, grid, x, weight, bias if bias is not None else y, y, part, count, M, N, K, k_split,
           x.stride(0), weight.stride(0), y.stride(0),
           HAS_BIAS=bias is not None, DOT_BF16=x.dtype in (torch.bfloat16, torch.float16),
           PTX=on_gpu(x), **meta, **opts)
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """kernels.linear's launch where a measured config exists for it, else F.linear."""
    cfg = config_for(x, weight, bias)
    return F.linear(x, weight, bias) if cfg is None else linear_triton(x, weight, bias, cfg)


__all__ = ["MAX_ROWS", "config_for", "entry", "linear", "linear_reference", "linear_triton", "tuning_shape"]
