"""kernels.moe_gemv's PTX (_LOAD_PTX: a block's weight words and scale; _BLOCK_PTX: activations' loads,
E2M1 -> fp16 by table, half2 fma, scale), run instruction by instruction on a Python model of the PTX
they use, over memory the test lays out: the tables, selectors, lane order, operand order and rounding
that the CPU suite cannot execute. Operand order is tl.inline_asm_elementwise's documented one (the
outputs, then the inputs). fma.rn.f16x2 is modelled as one rounding of the
exact a*b+c per half (float64 holds it exactly); kernels.check's "moe gemv" cases run the real thing
on a GPU."""

import re
import struct

import numpy as np
import pytest

from kernels.moe_gemv import _BLOCK_PTX_TEXT, _LOAD_PTX_TEXT, _XS, E2M1_F16_LO, LUT_WORDS, lut

M32 = 0xFFFFFFFF
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


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


def _h(bits: int) -> float:
    return float(np.array([bits & 0xFFFF], np.uint16).view(np.float16)[0])


def _hbits(v: float) -> int:
    return int(np.array([v], np.float64).astype(np.float16).view(np.uint16)[0])


def _f(bits: int) -> np.float32:
    return np.array([bits], np.uint32).view(np.float32)[0]


def _fbits(v) -> int:
    return int(np.array([v], np.float32).view(np.uint32)[0])


def _bf(bits: int) -> float:
    """bf16 bits (low 16) -> value (subnormals kept)."""
    return float(np.array([(bits & 0xFFFF) << 16], np.uint32).view(np.float32)[0])


def _bf16_bits(v: float) -> int:
    """Round to nearest even bf16 (v exact in fp32: a product of two bf16 values is)."""
    b = int(np.array([v], np.float32).view(np.uint32)[0])
    assert float(np.array([b], np.uint32).view(np.float32)[0]) == v, "not exact in fp32"
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


def _fma_h2(a: int, b: int, c: int) -> int:
    halves = [_hbits(_h(a >> s) * _h(b >> s) + _h(c >> s)) for s in (0, 16)]
    return halves[0] | (halves[1] << 16)


def run_ptx(text: str, mem: dict[int, int], operands: dict[str, int]) -> dict[str, int]:
    """Runs the block; mem: byte address -> byte; operands: {"$5": address, ...}. -> the registers."""
    regs = dict(operands)

    def val(t):
        return int(t, 0) if t[0].isdigit() else regs[t]

    def addr(t):
        base, _, off = t.strip("[]").partition("+")
        return regs[base] + (int(off) if off else 0)

    def word(a):
        return sum(mem[a + i] << (8 * i) for i in range(4))

    body = text.strip().removeprefix("{").removesuffix("}")
    for ins in re.findall(r"([A-Za-z0-9.:_]+)\s+([^;]+);", body):
        op, rest = ins
        if op == ".reg":
            continue
        args = [a.strip() for a in re.split(r",(?![^{]*})", rest)]
        d = args[0]
        if op.startswith("ld.global"):
            a = addr(args[1])
            if op.endswith(".v4.b32"):
                for i, r in enumerate(d.strip("{}").split(",")):
                    regs[r.strip()] = word(a + 4 * i)
            elif op.endswith(".u8"):
                regs[d] = mem[a]
            else:
                raise AssertionError(f"no model of {op}")
            continue
        if op == "mov.b32" and d.startswith("{"):  # unpack into two b16
            lo, hi = (r.strip() for r in d.strip("{}").split(","))
            regs[lo], regs[hi] = regs[args[1]] & 0xFFFF, regs[args[1]] >> 16
            continue
        src = [val(a) for a in args[1:]]
        if op == "mov.b32":
            r = src[0]
        elif op == "and.b32":
            r = src[0] & src[1]
        elif op == "shl.b32":
            r = (src[0] << src[1]) & M32
        elif op == "shr.u32":
            r = src[0] >> src[1]
        elif op == "add.u32":
            r = (src[0] + src[1]) & M32
        elif op == "prmt.b32":
            r = _prmt(*src)
        elif op == "lop3.b32":
            r = _lop3(*src)
        elif op == "min.u16x2":
            r = sum(min((src[0] >> s) & 0xFFFF, (src[1] >> s) & 0xFFFF) << s for s in (0, 16))
        elif op == "mad.lo.u32":
            r = (src[0] * src[1] + src[2]) & M32
        elif op == "mul.rn.bf16x2":
            r = sum(_bf16_bits(_bf(src[0] >> s) * _bf(src[1] >> s)) << s for s in (0, 16))
        elif op == "fma.rn.f16x2":
            r = _fma_h2(*src)
        elif op == "cvt.f32.f16":
            r = _fbits(np.float32(_h(src[0])))
        elif op == "add.f32":
            r = _fbits(_f(src[0]) + _f(src[1]))
        elif op == "mul.f32":
            r = _fbits(_f(src[0]) * _f(src[1]))
        else:
            raise AssertionError(f"no model of {op}")
        regs[d] = r
    return regs


W_AT, X_AT, S_AT = 0x1000, 0x2000, 0x3000


def block(wbytes: list[int], x16: np.ndarray, scale: int) -> float:
    """The modelled $0 for one block: 16 weight bytes, 32 fp16 activations, an E8M0 scale."""
    mem = {W_AT + i: b for i, b in enumerate(wbytes)}
    mem.update({X_AT + i: b for i, b in enumerate(x16.astype(np.float16).tobytes())})
    mem[S_AT] = scale
    loaded = run_ptx(_LOAD_PTX_TEXT, mem, {"$5": W_AT, "$6": S_AT})
    ins = {f"${i + 1}": loaded[f"${i}"] for i in range(5)}
    return float(_f(run_ptx(_BLOCK_PTX_TEXT, mem, {**ins, "$6": X_AT, "$7": E2M1_F16_LO})["$0"]))


def values(wbytes: list[int]) -> list[float]:
    """E2M1 values in k order: byte j's low nibble is k = 2j, its high nibble k = 2j+1."""
    out = []
    for b in wbytes:
        for c in (b & 15, b >> 4):
            out.append((-1 if c & 8 else 1) * E2M1[c & 7])
    return out


def test_models_match_their_definitions():
    assert _lop3(0xF0F0F0F0, 0xCCCCCCCC, 0xAAAAAAAA, 0xF8) == 0xF0F0F0F0 | (0xCCCCCCCC & 0xAAAAAAAA)
    one, two = _hbits(1.0), _hbits(2.0)
    assert _fma_h2(one | two << 16, two | two << 16, one | one << 16) == _hbits(3.0) | _hbits(5.0) << 16
    assert struct.unpack("<f", struct.pack("<I", _fbits(np.float32(1.5))))[0] == 1.5


@pytest.mark.parametrize("k", range(32))
def test_every_code_at_every_k_is_exact(k):
    """One activation set (x16 = 1), the others 0, every byte value around it: $0 is exactly that
    k's E2M1 value times 2**(scale - 127 + XS), so each table byte, selector, sign and lane lands."""
    rng = np.random.default_rng(k)
    x16 = np.zeros(32)
    x16[k] = 1.0
    for code in range(16):
        wbytes = rng.integers(0, 256, 16).tolist()
        j = k // 2
        wbytes[j] = (wbytes[j] & 0xF0) | code if k % 2 == 0 else (wbytes[j] & 0x0F) | (code << 4)
        want = (-1 if code & 8 else 1) * E2M1[code & 7] * 2.0 ** (120 - 127 + _XS)
        assert block(wbytes, x16, 120) == want, (k, code, wbytes)


@pytest.mark.parametrize("seed", range(6))
def test_random_blocks_sum_within_fp16_rounding(seed):
    """Random bytes, activations (as fp16(x * 2**-XS), up to |x| ~ 1e4) and scales: $0 within the
    rounding of 16 fp16 partial sums of the exact block dot product."""
    rng = np.random.default_rng(100 + seed)
    for _ in range(8):
        wbytes = rng.integers(0, 256, 16).tolist()
        x = rng.standard_normal(32) * 10.0 ** rng.uniform(-2, 4)
        x16 = (x * 2.0 ** -_XS).astype(np.float16)
        scale = int(rng.integers(110, 135))
        v = np.array(values(wbytes))
        terms = v * x16.astype(np.float64)
        want = terms.sum() * 2.0 ** (scale - 127 + _XS)
        bound = 16 * 2.0 ** -11 * np.abs(terms).sum() * 2.0 ** (scale - 127 + _XS) + 1e-30
        got = block(wbytes, x16, scale)
        assert abs(got - want) <= bound, (got, want, bound)


def test_lut_holds_the_tables_low_half():
    """The word the gemv tiles read ($7, from kernels.moe_gemv.lut): E2M1 magnitudes 0, .5, 1, 1.5 as fp16
    high bytes, byte k the magnitude of code k; a copy for every row a tile may hold, made once a device."""
    highs = np.array([0.0, 0.5, 1.0, 1.5], dtype=np.float16).view(np.uint16) >> 8
    assert E2M1_F16_LO == sum(int(b) << (8 * k) for k, b in enumerate(highs))
    t = lut("cpu")
    assert t.dtype.itemsize == 4 and t.numel() == LUT_WORDS >= 2 * 128  # W1's rows at the sweep's BLOCK_N 128
    assert bool((t == E2M1_F16_LO).all()) and lut("cpu") is t
