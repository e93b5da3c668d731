"""kernels.moe_rs's decode PTX (_DEC_PTX_TEXT: 4 weight bytes and the multipliers 2**(s - 1 - XC) the kernel
makes per row and block -> bf16x2 operand registers of the low and high nibbles) run on the instruction model
of test_moe_gemv_ptx: the bit placement, selectors, lop3 tables, scale clamp and element order the CPU suite
cannot execute. Operand order is tl.inline_asm_elementwise's (the outputs' registers, then the inputs'); with
pack=4 a 16-bit operand of 4 elements is 2 registers, elements (0, 1) then (2, 3), the lower element in the
low half. kernels.check's "moe rs" cases run the real thing on a GPU."""

import itertools
import random

import pytest

from kernels.moe_rs import _DEC_PTX_TEXT, _XC, S_MAX, multiplier_bits
from tests.kernels.test_moe_gemv_ptx import E2M1, _bf, run_ptx


def _value(code: int, s: int) -> float:
    return (-1.0 if code & 8 else 1.0) * E2M1[code & 7] * 2.0 ** (min(s, S_MAX) - 127 - _XC)


def decode(bytes4: list[int], scales4: list[int]) -> tuple[list[float], list[float]]:
    """-> (low-nibble values, high-nibble values) of elements 0..3, from the modelled registers."""
    w = sum(b << (8 * i) for i, b in enumerate(bytes4))
    m = [multiplier_bits(s) for s in scales4]
    regs = run_ptx(_DEC_PTX_TEXT, {}, {"$4": w, "$5": m[0] | m[1] << 16, "$6": m[2] | m[3] << 16})
    halves = lambda a, b: [_bf(regs[a]), _bf(regs[a] >> 16), _bf(regs[b]), _bf(regs[b] >> 16)]  # noqa: E731
    return halves("$0", "$1"), halves("$2", "$3")


@pytest.mark.parametrize("s", [60, 100, 119, 127, 150, S_MAX, 230])
def test_every_code_at_every_nibble_is_exact(s):
    """Each of the 16 codes as the low and the high nibble of each of the 4 bytes; scales beside a
    subnormal result (60), typical (100-150), the largest exact one and a clamped one (230)."""
    for pos, code, other in itertools.product(range(4), range(16), (0, 0x5A)):
        for high in (False, True):
            b = [other] * 4
            b[pos] = (code << 4) | (other & 15) if high else (other & 0xF0) | code
            lo, hi = decode(b, [s] * 4)
            for i in range(4):
                assert lo[i] == _value(b[i] & 15, s), (pos, code, high, i)
                assert hi[i] == _value(b[i] >> 4, s), (pos, code, high, i)


def test_each_element_takes_its_own_scale():
    """Each element meets its own multiplier (in the kernel, elements 0, 1 and 2, 3 are two rows'):
    distinct scales per element land on the right values."""
    rng = random.Random(0)
    for _ in range(200):
        b = [rng.randrange(256) for _ in range(4)]
        sc = [rng.randrange(90, 160) for _ in range(4)]
        lo, hi = decode(b, sc)
        assert lo == [_value(b[i] & 15, sc[i]) for i in range(4)]
        assert hi == [_value(b[i] >> 4, sc[i]) for i in range(4)]
