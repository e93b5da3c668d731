"""Rotary embedding of q and k in one launch, with models.layers.Rotary.apply's arithmetic.

Rotary.apply rotates the two halves of each head (not interleaved pairs):
out = cat(a*c - b*s, b*c + a*s) for x = cat(a, b), every product, difference
and sum rounded to the model dtype as torch's ops round them. The kernel does
the same roundings (fp32 math, cast after each op), so on a GPU it gives the
reference's numbers (fp32 may differ by an ulp where the compiler fuses an FMA).

cos/sin are the per-token [N, D/2] tables Rotary.cos_sin builds once per
forward. q [N, Hq, D] and k [N, K, D] may be strided views (the split of the
fused qkv output); one program per token rotates all its q and k heads into
new contiguous tensors. Writing outputs rather than in place keeps the kernel
free of load/store races between warps that replicate small tiles.
"""

import torch

from ._triton import jit_module, launch, next_pow2, tl


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)), op for op (tests check it bit for bit).

    Not the module's method itself, so Rotary.apply may call the dispatcher without recursing."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


def _rope_heads(x_ptr, o_ptr, row, c, s, heads, half, s_xn, s_xh,
                BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    msk = (h < heads) & (j < half)
    xa = x_ptr + row * s_xn + h * s_xh + j
    a = tl.load(xa, mask=msk, other=0.0)
    b = tl.load(xa + half, mask=msk, other=0.0)
    dt = o_ptr.dtype.element_ty
    af, bf = a.to(tl.float32), b.to(tl.float32)
    ac, bs = (af * c).to(dt).to(tl.float32), (bf * s).to(dt).to(tl.float32)
    bc, as_ = (bf * c).to(dt).to(tl.float32), (af * s).to(dt).to(tl.float32)
    oa = o_ptr + row * heads * (2 * half) + h * (2 * half) + j
    tl.store(oa, (ac - bs).to(dt), mask=msk)
    tl.store(oa + half, (bc + as_).to(dt), mask=msk)


def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, Hq, K, half,
                 s_qn, s_qh, s_kn, s_kh, s_cn, s_sn,
                 BLOCK_HQ: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    cm = j < half
    c = tl.load(cos_ptr + row * s_cn + j, mask=cm, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + row * s_sn + j, mask=cm, other=0.0).to(tl.float32)
    _rope_heads(q_ptr, qo_ptr, row, c, s, Hq, half, s_qn, s_qh, BLOCK_HQ, BLOCK_HALF)
    _rope_heads(k_ptr, ko_ptr, row, c, s, K, half, s_kn, s_kh, BLOCK_K, BLOCK_HALF)


_KERNELS = ("_rope_heads", "_rope_kernel")


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [N, Hq, D], k [N, K, D] (any strides), cos/sin [N, D/2] -> rotated (q, k), new contiguous tensors.

    No host reads: capturable in a CUDA graph."""
    jit_module(globals(), _KERNELS)
    N, Hq, D = q.shape
    K = k.shape[1]
    if D % 2 or k.shape[0] != N or k.shape[2] != D or cos.shape != (N, D // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    qo = torch.empty(N, Hq, D, dtype=q.dtype, device=q.device)
    ko = torch.empty(N, K, D, dtype=k.dtype, device=k.device)
    if N:
        launch(_rope_kernel, (N,), q, k, cos, sin, qo, ko, Hq, K, D // 2,
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
               BLOCK_HQ=next_pow2(Hq), BLOCK_K=next_pow2(K), BLOCK_HALF=next_pow2(D // 2))
    return qo, ko


__all__ = ["rope_reference", "rope_triton"]
