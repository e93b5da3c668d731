"""kernels.moe_gemv's PTX E2M1 decode, run instruction by instruction on a Python model of the PTX
it uses (mov, and, shl, shr, lop3, prmt with its sign-replicate mode) over every byte value in every
lane: the tables, selectors and lane order that the CPU suite cannot execute. The operand order is
tl.inline_asm_elementwise's documented one (each output's pack of 4 registers in turn, then the inputs;
a packed uint8 register holds element 0 in its low byte); kernels.check's "moe gemv" cases run the
real thing on a GPU."""

import re

import pytest
import torch

from kernels.moe_gemv import _E2M1_PTX_TEXT

M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    src = (b << 32) | a
    out = 0
    for lane in range(4):
        sel = (c >> (4 * lane)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:  # sign-replicate: the selected byte's msb, in all 8 bits
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * lane)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def run_ptx(text: str, word: int) -> list[int]:
    regs = {"$8": word}
    val = lambda t: int(t, 0) if t[0].isdigit() else regs[t]  # noqa: E731
    for ins in re.findall(r"([a-z0-9.]+)\s+([^;]+);", text.split("\n", 2)[2]):
        op, args = ins[0], [a.strip() for a in ins[1].split(",")]
        d, src = args[0], [val(a) for a in args[1:]]
        if op == "mov.b32":
            r = src[0]
        elif op == "and.b32":
            r = src[0] & src[1]
        elif op == "shl.b32":
            r = (src[0] << src[1]) & M32
        elif op == "shr.u32":
            r = src[0] >> src[1]
        elif op == "prmt.b32":
            r = _prmt(*src)
        elif op == "lop3.b32":
            r = _lop3(*src)
        else:
            raise AssertionError(f"no model of {op}")
        regs[d] = r
    return [regs[f"${i}"] for i in range(8)]


def test_lop3_model_matches_its_definition():
    assert _lop3(0xF0F0F0F0, 0xCCCCCCCC, 0xAAAAAAAA, 0xF8) == 0xF0F0F0F0 | (0xCCCCCCCC & 0xAAAAAAAA)


@pytest.mark.parametrize("lane", range(4))
def test_every_byte_in_every_lane_decodes_exactly(lane):
    """$0-$3 = even-k values (low nibbles) of bytes 0-3, $4-$7 = odd-k values, as fp32 bits."""
    values = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    want = lambda c: (-1 if c & 8 else 1) * values[c & 7]  # noqa: E731
    g = torch.Generator().manual_seed(lane)
    for byte in range(256):
        others = torch.randint(0, 256, (4,), generator=g).tolist()
        others[lane] = byte
        word = sum(v << (8 * i) for i, v in enumerate(others))
        outs = run_ptx(_E2M1_PTX_TEXT, word)
        got = torch.tensor(outs, dtype=torch.int64).to(torch.int32).view(torch.float32).tolist()
        for i, v in enumerate(others):
            assert got[i] == want(v & 15) and got[4 + i] == want(v >> 4), (hex(word), i, got)
