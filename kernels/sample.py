"""Fused temperature sampling: one pass over each row of logits draws exactly from softmax(x / T).

Gumbel-max: argmax_i (x_i / T + G_i) with G_i = -log(-log U_i) is an exact draw from softmax(x / T),
so the row is read once, with no softmax, no normalisation and no noise tensor in memory. The torch
path of engine.sampler needs ~10 passes over [B, 201k] fp32 for the same draw, and one launch per
seeded row for its noise.

U_i is Philox 4x32-10 (Triton's tl.rand) keyed by the row's 64-bit key and counted by vocabulary
index: a row's draw depends on its key alone. engine.sampler_state.SamplerState derives a seeded
sequence's key from (seed, draw number), so its stream does not depend on the batch it is in.
`philox_uniform` is the same generator in torch, `sample_reference` the same draw (up to the last
bit of the scores: a GPU may fuse x * inv_t - g into one FMA, so a near tie may go either way).
NaN logits are never drawn.

Philox and two logs per element make this compute-bound for a single SM, so a row is split over
programs (enough to fill the GPU at small batches); each writes its first maximum, and the
splits' first maximum, in index order, is the row's.
"""

import torch

from ._triton import interpreting, jit_module, launch, tl
from .pdl import enter as _pdl_enter

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of a constant and uint32 values held in int64."""
    lo16, hi16 = a & 0xFFFF, a >> 16
    t, u = b * lo16, b * hi16  # each < 2**48: exact in int64
    hi = (u + (t >> 16)) >> 16
    lo = ((u << 16) + t) & _M32  # wraps past 2**63; the low 32 bits stay right
    return hi, lo


def philox_uniform(keys: torch.Tensor, n: int) -> torch.Tensor:
    """[B] int64 keys -> [B, n] float32 in [0, 1): tl.rand(key, arange(n)) for each key, bit for bit."""
    k = keys.to(torch.int64)
    k0 = (k & _M32)[:, None]
    k1 = ((k >> 32) & _M32)[:, None]  # arithmetic shift, masked: the key's high word as uint32
    c0 = torch.arange(n, dtype=torch.int64, device=keys.device).expand(len(keys), n)
    c1 = c2 = c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # the int32 bit pattern
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def sample_reference(x: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """x [B, V] logits (masked entries -inf), inv_temperature [B], keys [B] int64 -> [B] token ids."""
    u = philox_uniform(keys, x.shape[1]).to(x.device)
    s = x.float() * inv_temperature.float()[:, None] - torch.log(-torch.log(u))
    return s.nan_to_num(nan=float("-inf")).argmax(-1)


def _sample_kernel(x_ptr, s_row, inv_t_ptr, key_ptr, best_ptr, arg_ptr, V, CHUNK,
                   BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    inv_t = tl.load(inv_t_ptr + row)
    key = tl.load(key_ptr + row)
    lo = split * CHUNK
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK], dtype=tl.int32) + lo  # a row with no finite score: its first index, as torch
    for start in range(lo, lo + CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = (offs < V) & (offs < lo + CHUNK)
        x = tl.load(x_ptr + row * s_row + offs, mask=m, other=float("-inf")).to(tl.float32)
        s = x * inv_t - tl.log(-tl.log(tl.rand(key, offs)))
        better = m & (s > best)  # strict: each lane keeps its first maximum; NaN never wins
        best = tl.where(better, s, best)
        arg = tl.where(better, offs, arg)
    top = tl.max(best, 0)
    n = tl.num_programs(1)
    tl.store(best_ptr + row * n + split, top)
    tl.store(arg_ptr + row * n + split, tl.min(tl.where(best == top, arg, V), 0).to(tl.int64))


_KERNELS = ("_pdl_enter", "_sample_kernel")


def _splits(B: int, V: int, block: int, device) -> int:
    """Programs per row: about two per SM over the batch, none of them empty."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(-(-2 * sms // B), -(-V // block)))


def sample_triton(x: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """As sample_reference: [B, splits] programs write each split's best (score, first index), and
    torch picks the first split holding the row's maximum (torch.max returns the first index)."""
    jit_module(globals(), _KERNELS)
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, V = x.shape
    if not B:
        return torch.empty(0, dtype=torch.long, device=x.device)
    block = 512 if interpreting() else 1024
    splits = _splits(B, V, block, x.device)
    chunk = -(-(-(-V // splits)) // block) * block  # whole blocks; the last split may be shorter
    splits = -(-V // chunk)
    best = torch.empty(B, splits, dtype=torch.float32, device=x.device)
    arg = torch.empty(B, splits, dtype=torch.long, device=x.device)
    opts = {} if interpreting() else dict(num_warps=4)
    launch(_sample_kernel, (B, splits), x, x.stride(0), inv_temperature.to(torch.float32).contiguous(),
           keys.to(torch.int64).contiguous(), best, arg, V, chunk, BLOCK=block, **opts)
    if splits == 1:
        return arg.view(B)
    return arg.gather(1, best.argmax(1, keepdim=True)).view(B)


__all__ = ["philox_uniform", "sample_reference", "sample_triton"]
