"""Prefill-sized expert matmuls on dequantized weights (the `DQ` tiles of kernels.moe).

A step with many rows per expert (a prefill chunk: ~256 at 8,192 tokens on 120b) may decode each expert
matrix it runs once, into a bf16 scratch, and run kernels.moe's MMA tiles (`DQ=True`) as plain 16-bit
`tl.dot`s over it. Why: `tl.dot_scaled` upcasts a weight tile once per BLOCK_M rows, at ~14
thread-instructions an FP4 value (BENCHMARKS.md "GPU"), which held session 9's 8,192-token chunk at ~28% of
the bf16 matmul rate. Decoding once costs one pass over the weights (read 4.25 bits, write 16 a value: about
5.4 GB, ~1.3 ms, for a 120b layer's W1) and leaves Hopper's best-served GEMM shape. Not a default: chosen
where kernels.tune measured it faster (its "dq" groups, prefill-sized buckets only: at a decode step's few
rows an expert's weights are read about once anyway, and the scratch pass would triple the bytes).

The scratch holds W1 [E, 2I, H] (4.2 GB on 120b; W2's [E, H, I] reuses it after W1 ran), allocated per
step from torch's caching allocator, so the KV-cache sizing's activation probe (engine/kv_budget.py, the
largest step at its tuned configs) counts it.
"""

import torch

from ._triton import jit_module, launch, tl, triton
from .pdl import enter as _pdl_enter

BLOCK_B = 64  # 16-byte scale blocks a program: 2,048 values, 4 warps


def _fp4(c, scale):
    """E2M1 codes (int32, 0..15) -> fp32 by building the float's bits, times the block scale."""
    mag = c & 7
    e = mag >> 1
    m = mag & 1
    normal = ((e + 126) << 23) | (m << 22)          # 2**(e-1) * (1 + m/2)
    sub = tl.where(m == 1, 0x3F000000, 0)           # e == 0: 0.5 or 0
    bits = tl.where(e == 0, sub, normal) | ((c & 8) << 28)
    return bits.to(tl.float32, bitcast=True) * scale


def _dequant_kernel(wb_ptr, ws_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr, PDL: tl.constexpr = False):
    """Scale blocks [pid * BLOCK_B, +BLOCK_B) of a flattened MXFP4 matrix: 16 bytes and one E8M0 scale each
    -> 32 values, the low nibble the even k (the checkpoint's order)."""
    _pdl_enter(PDL)
    blk = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    m = blk < n_blocks
    b = tl.load(wb_ptr + blk[:, None] * 16 + tl.arange(0, 16)[None, :], mask=m[:, None], other=0).to(tl.int32)
    s = tl.load(ws_ptr + blk, mask=m, other=127)
    scale = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)[:, None]  # 2**(s-127)
    v = tl.interleave(_fp4(b & 15, scale), _fp4(b >> 4, scale))
    tl.store(out_ptr + blk[:, None] * 32 + tl.arange(0, 32)[None, :], v.to(out_ptr.dtype.element_ty),
             mask=m[:, None])


def dequant(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """blocks [..., R, K/32, 16] uint8, scales [..., R, K/32] -> bf16 [..., R, K] (into `out`'s storage when
    given: a bf16 tensor of at least that many elements). Every value is exact in bf16 (E2M1 times a power of
    two) where it is normal and finite: scales 2**-125 .. 2**125."""
    jit_module(globals(), _KERNELS)
    shape = (*scales.shape, 32)
    n = scales.numel()
    if out is None:
        out = torch.empty(shape, dtype=torch.bfloat16, device=blocks.device)
    else:
        if out.dtype != torch.bfloat16 or out.numel() < 32 * n:
            raise ValueError(f"out: a bf16 tensor of {32 * n} elements or more, not {out.dtype} {out.numel()}")
        out = out.reshape(-1)[:32 * n].view(shape)
    launch(_dequant_kernel, (triton.cdiv(n, BLOCK_B),), blocks.contiguous(), scales.contiguous(), out, n,
           BLOCK_B=BLOCK_B)
    return out.view(*scales.shape[:-1], scales.shape[-1] * 32)


_KERNELS = ("_pdl_enter", "_fp4", "_dequant_kernel")
_NO_SPECIALIZE = {"_dequant_kernel": ("n_blocks",)}
