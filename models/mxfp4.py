"""MXFP4 (OCP microscaling FP4) decode, as gpt-oss stores its expert weights.

A block is 32 E2M1 values packed into 16 bytes, low nibble first, sharing one
E8M0 scale byte `s` that means 2**(s - 127).
"""

from __future__ import annotations

import torch

BLOCK = 32
# E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., G, 16] uint8 blocks + [..., G] uint8 scales -> [..., G*32] values.

    Exact for every finite result: FP4 values times powers of two are
    representable in fp32 and bf16 (same exponent range).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"mxfp4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"mxfp4 shapes disagree: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()  # [..., G, 32]
    vals = lut[codes]
    exps = scales.to(torch.int32) - 127
    out = torch.ldexp(vals, exps.unsqueeze(-1).to(torch.float32))
    return out.flatten(-2).to(dtype)


def encode(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest MXFP4 quantisation of [..., K] (K % 32 == 0).

    Used to write pre-quantized checkpoints from float weights; the scale is the
    smallest power of two that fits the block's max magnitude into 6.0.
    """
    if values.shape[-1] % BLOCK:
        raise ValueError(f"last dim {values.shape[-1]} is not a multiple of {BLOCK}")
    v = values.float().reshape(*values.shape[:-1], -1, BLOCK)
    amax = v.abs().amax(-1).clamp_min(2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = v / torch.ldexp(torch.ones_like(exp), exp).unsqueeze(-1)
    mags = torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=v.device)
    code = (scaled.abs().unsqueeze(-1) - mags).abs().argmin(-1)
    code = code | ((scaled < 0).long() << 3)
    code = code.to(torch.uint8).reshape(*code.shape[:-1], BLOCK // 2, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    return blocks, (exp + 127).to(torch.uint8)
