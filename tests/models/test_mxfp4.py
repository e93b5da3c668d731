import itertools

import pytest
import torch

from models import mxfp4


def scalar_decode(byte: int, scale: int) -> tuple[float, float]:
    """Decode one byte (two E2M1 values, low nibble first) bit by bit."""
    def e2m1(n: int) -> float:
        sign = -1.0 if n & 0b1000 else 1.0
        exp, man = (n >> 1) & 0b11, n & 1
        mag = man * 0.5 if exp == 0 else (1 + man * 0.5) * 2.0 ** (exp - 1)
        return sign * mag
    f = 2.0 ** (scale - 127)
    return e2m1(byte & 0xF) * f, e2m1(byte >> 4) * f


@pytest.mark.parametrize("scale", [0, 1, 100, 119, 120, 126, 127, 128, 135, 200, 254])
def test_decode_matches_scalar_reference_for_every_byte(scale):
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 16)  # 16 blocks cover all 256 bytes
    scales = torch.full((16,), scale, dtype=torch.uint8)
    got = mxfp4.decode(blocks, scales).reshape(16, 16, 2)
    for b in range(256):
        # the reference in float64, rounded to fp32 (2**128 overflows to inf there too)
        lo, hi = (torch.tensor(x, dtype=torch.float64).float() for x in scalar_decode(b, scale))
        assert torch.equal(got[b // 16, b % 16, 0], lo), (b, scale)
        assert torch.equal(got[b // 16, b % 16, 1], hi), (b, scale)


def test_decode_batched_shapes_and_bf16_exact():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (3, 5, 4), dtype=torch.uint8, generator=g)
    f32 = mxfp4.decode(blocks, scales)
    assert f32.shape == (3, 5, 128)
    assert torch.equal(mxfp4.decode(blocks, scales, torch.bfloat16).float(), f32)
    # each row is the concatenation of its blocks
    lo, hi = scalar_decode(int(blocks[2, 4, 3, 7]), int(scales[2, 4, 3]))
    assert f32[2, 4, 3 * 32 + 14].item() == lo and f32[2, 4, 3 * 32 + 15].item() == hi


def test_encode_roundtrip_is_exact_on_representable_values():
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (7, 8, 16), dtype=torch.uint8, generator=g)
    # max magnitude 6 in every block makes the encoder pick the same scale
    blocks[..., 0] = 0x77
    scales = torch.randint(115, 135, (7, 8), dtype=torch.uint8, generator=g)
    vals = mxfp4.decode(blocks, scales)
    b2, s2 = mxfp4.encode(vals)
    assert torch.equal(mxfp4.decode(b2, s2), vals)


def test_bad_inputs():
    with pytest.raises(TypeError):
        mxfp4.decode(torch.zeros(2, 16), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shapes disagree"):
        mxfp4.decode(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))
