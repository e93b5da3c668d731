"""Fused residual add + RMSNorm, fp32 math, as models.layers.RMSNorm computes it.

With a residual, the block's `x = x + f(x)` and the next norm read x once:
h = x + residual is rounded to x.dtype (what the model's add stores), written
back as the new residual stream, and normalised from that rounded value, so
the result is the one the unfused model computes.
"""

import torch

from ._triton import interpreting, jit_module, launch, next_pow2, tl
from .pdl import enter as _pdl_enter


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm.forward's arithmetic (tests check it equals the module bit for bit), plus the optional add.

    Not the module itself, so RMSNorm.forward may call the dispatcher without recursing."""
    h = x if residual is None else x + residual
    hf = h.float()
    out = (weight.float() * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)
    return out if residual is None else (out, h)


def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, o_ptr, h_ptr, H, eps, s_x, s_r,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    msk = c < H
    h = tl.load(x_ptr + row * s_x + c, mask=msk, other=0.0)
    if HAS_RES:
        h = (h.to(tl.float32) + tl.load(r_ptr + row * s_r + c, mask=msk, other=0.0).to(tl.float32))
        h = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * H + c, h, mask=msk)
    hf = h.to(tl.float32)
    inv = tl.rsqrt(tl.sum(hf * hf, 0) / H + eps)
    w = tl.load(w_ptr + c, mask=msk, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * H + c, (w * (hf * inv)).to(o_ptr.dtype.element_ty), mask=msk)


_KERNELS = ("_pdl_enter", "_rmsnorm_kernel")


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [N, H] (last dim contiguous) -> out, or (out, x + residual) when a residual is given."""
    jit_module(globals(), _KERNELS)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    N, H = x2.shape
    out = torch.empty(N, H, dtype=x.dtype, device=x.device)
    h = out
    r2 = x2
    if residual is not None:
        r2 = residual.reshape(-1, H)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h = torch.empty(N, H, dtype=x.dtype, device=x.device)
    if N:
        opts = {} if interpreting() else dict(num_warps=8 if H >= 2048 else 4)
        launch(_rmsnorm_kernel, (N,), x2, r2, weight, out, h, H, float(eps), x2.stride(0), r2.stride(0),
               HAS_RES=residual is not None, BLOCK=next_pow2(H), **opts)
    out = out.view(shape)
    return out if residual is None else (out, h.view(shape))


__all__ = ["rmsnorm_reference", "rmsnorm_triton"]
