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

`rope_into_cache` is the paged step's form: the rotated k and the step's v go
straight to their cache slots (what PagedMetadata.attend would write next), so
one launch replaces the rotation and the two cache writes of every layer.

An fp8 cache (EngineConfig.kv_cache_dtype "fp8") reaches the kernels as its
uint8 view: `_to_cache` rounds to e4m3 in integer arithmetic (`_e4m3`), not
by a float8 cast, because Triton's interpreter rounds float8 casts wrongly
(125.5 -> 64: a mantissa carry lost) and the CPU tests must see the GPU's bits.
"""

import torch

from models.attention import as_bytes, store_rows

from ._triton import jit_module, launch, next_pow2, tl
from .pdl import enter as _pdl_enter


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)), op for op (tests check it bit for bit).

    Not the module's method itself, so Rotary.apply may call the dispatcher without recursing."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope_into_cache_reference(q, k, v, cos, sin, k_cache, v_cache, slots):
    """Rotate q and k, write k and v into the flat cache slots (as PagedMetadata.attend does);
    returns the rotated q."""
    q, k = rope_reference(q, k, cos, sin)
    store_rows(k_cache, slots, k)
    store_rows(v_cache, slots, v)
    return q


def check_cache_dtype(cache: torch.Tensor, k: torch.Tensor) -> bool:
    """A cache the fused writes can fill from k: k's own dtype (the rotation rounds in k's dtype), or fp8."""
    return cache.dtype in (k.dtype, torch.float8_e4m3fn)


def _rotate(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


def _rot(x, xp, c, s, sgn, dt: tl.constexpr):
    """One rotated half (fp32 in, fp32 out): x * c + sgn * partner * s (sgn -1 for the first half, +1 for the
    second), each product and the sum rounded to dt as the torch ops in dt do. kernels.attention's decode
    rotates with it too, so both give the same bits."""
    xc = (x * c).to(dt).to(tl.float32)
    ps = (xp * s).to(dt).to(tl.float32)
    return (xc + sgn * ps).to(dt).to(tl.float32)


def _e4m3(x):
    """fp32 -> float8 e4m3fn bits (uint8), as torch's cast of x clamped to +-448: round to nearest even,
    subnormals (below 2^-6) in steps of 2^-9, the sign kept (-0 too), NaN -> 0x7f with the sign."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 31) << 7
    a = tl.minimum(tl.abs(x), 448.0)  # models.attention.FP8_MAX
    ab = a.to(tl.uint32, bitcast=True)
    # a normal: fp32's exponent and top 3 mantissa bits, rounded to nearest even, rebiased 127 -> 7
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - (120 << 3)
    y = a * 512.0  # a subnormal's code is y rounded to an integer (exact: a power-of-two scaling)
    fl = y.to(tl.int32)
    fr = y - fl.to(tl.float32)
    sub = fl + ((fr > 0.5) | ((fr == 0.5) & ((fl & 1) == 1))).to(tl.int32)
    code = tl.where(a >= 0.015625, normal.to(tl.int32), sub)
    code = tl.where(x != x, 0x7F, code)
    return (code.to(tl.uint32) | sign).to(tl.uint8)


def _to_cache(x, ptr):
    """x (fp32) as a cache behind ptr stores it: e4m3 bits into an fp8 pool's uint8 view, else a cast."""
    if ptr.dtype.element_ty == tl.uint8:
        return _e4m3(x)
    return x.to(ptr.dtype.element_ty)


def _from_cache(raw):
    """A cache load as fp32 (an fp8 pool's bytes through the hardware's e4m3 conversion)."""
    if raw.dtype == tl.uint8:
        raw = raw.to(tl.float8e4nv, bitcast=True)
    return raw.to(tl.float32)


def _rope_heads(x_ptr, o_ptr, row, orow, c, s, heads, half, s_xn, s_xh,
                BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    msk = (h < heads) & (j < half)
    xa = x_ptr + row * s_xn + h * s_xh + j
    a = tl.load(xa, mask=msk, other=0.0).to(tl.float32)
    b = tl.load(xa + half, mask=msk, other=0.0).to(tl.float32)
    dt = x_ptr.dtype.element_ty  # the rotation rounds as torch's ops in the model's dtype, then the store's own
    oa = o_ptr + orow * heads * (2 * half) + h * (2 * half) + j
    tl.store(oa, _to_cache(_rot(a, b, c, s, -1.0, dt), o_ptr), mask=msk)
    tl.store(oa + half, _to_cache(_rot(b, a, c, s, 1.0, dt), o_ptr), mask=msk)


def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, v_ptr, vo_ptr, slot_ptr, Hq, K, half,
                 s_qn, s_qh, s_kn, s_kh, s_cn, s_sn, s_vn, s_vh,
                 TO_CACHE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    cm = j < half
    c = tl.load(cos_ptr + row * s_cn + j, mask=cm, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + row * s_sn + j, mask=cm, other=0.0).to(tl.float32)
    _rope_heads(q_ptr, qo_ptr, row, row, c, s, Hq, half, s_qn, s_qh, BLOCK_HQ, BLOCK_HALF)
    if TO_CACHE:  # k and v rows go to the token's cache slot ([slots, K, D] contiguous)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        _rope_heads(k_ptr, ko_ptr, row, slot, c, s, K, half, s_kn, s_kh, BLOCK_K, BLOCK_HALF)
        h = tl.arange(0, BLOCK_K)[:, None]
        d = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        msk = (h < K) & (d < 2 * half)
        val = tl.load(v_ptr + row * s_vn + h * s_vh + d, mask=msk, other=0.0).to(tl.float32)
        tl.store(vo_ptr + slot * K * (2 * half) + h * (2 * half) + d, _to_cache(val, vo_ptr), mask=msk)
    else:
        _rope_heads(k_ptr, ko_ptr, row, row, c, s, K, half, s_kn, s_kh, BLOCK_K, BLOCK_HALF)


_KERNELS = ("_pdl_enter", "_rot", "_e4m3", "_to_cache", "_rope_heads", "_rope_kernel")


def _checked(q, k, cos, sin):
    N, Hq, D = q.shape
    if D % 2 or k.shape[0] != N or k.shape[2] != D or cos.shape != (N, D // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)}")
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))


def rope_into_cache_triton(q, k, v, cos, sin, k_cache, v_cache, slots):
    """As rope_into_cache_reference, in one launch (no host reads: capturable in a CUDA graph)."""
    jit_module(globals(), _KERNELS)
    q, k, cos, sin = _checked(q, k, cos, sin)
    v = v if v.stride(-1) == 1 else v.contiguous()
    N, Hq, D = q.shape
    K = k.shape[1]
    if k_cache.shape[2:] != (K, D) or v_cache.shape != k_cache.shape or v.shape != k.shape \
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or not check_cache_dtype(k_cache, k) \
            or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"rope_into_cache: k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)}, caches "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}, {tuple(v_cache.shape)} (contiguous "
                         "[blocks, block_size, K, D] in k's dtype or float8_e4m3fn)")
    qo = torch.empty(N, Hq, D, dtype=q.dtype, device=q.device)
    if N:
        # an fp8 pool reaches the kernel as its bytes (see the module's docstring)
        launch(_rope_kernel, (N,), q, k, cos, sin, qo, as_bytes(k_cache), v, as_bytes(v_cache), slots, Hq, K, D // 2,
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
               v.stride(0), v.stride(1), TO_CACHE=True,
               BLOCK_HQ=next_pow2(Hq), BLOCK_K=next_pow2(K), BLOCK_HALF=next_pow2(D // 2))
    return qo


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [N, Hq, D], k [N, K, D] (any strides), cos/sin [N, D/2] -> rotated (q, k), new contiguous tensors.

    No host reads: capturable in a CUDA graph."""
    jit_module(globals(), _KERNELS)
    q, k, cos, sin = _checked(q, k, cos, sin)
    N, Hq, D = q.shape
    K = k.shape[1]
    qo = torch.empty(N, Hq, D, dtype=q.dtype, device=q.device)
    ko = torch.empty(N, K, D, dtype=k.dtype, device=k.device)
    if N:
        launch(_rope_kernel, (N,), q, k, cos, sin, qo, ko, k, ko, cos, Hq, K, D // 2,
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0), 0, 0,
               TO_CACHE=False, BLOCK_HQ=next_pow2(Hq), BLOCK_K=next_pow2(K), BLOCK_HALF=next_pow2(D // 2))
    return qo, ko


__all__ = ["check_cache_dtype", "rope_into_cache_reference", "rope_into_cache_triton", "rope_reference",
           "rope_triton"]
