"""The MoE's expert matmuls for decode-sized steps: one (token, expert) pair per tile, no tensor cores.

At a handful of tokens per step each expert sees about one row, so a 16-row
MMA tile is 15/16 padding and the step is a stream of weight bytes; what it
costs is the instructions spent per weight byte. On an H200, tl.dot_scaled
(kernels.moe) measured ~14 instructions per weight value and ~15% of copy
bandwidth at batch 1 (BENCHMARKS.md "GPU"). Here a thread owns whole 16-byte
scale blocks (32 values of one row, one E8M0 scale), and on CUDA one PTX block
(_BLOCK_PTX) does all of a block's work in registers:

- it loads the 16 weight bytes (one vector load, streamed past L1), the
  token's 32 activations and the scale itself, so Triton never moves the
  operands between layouts (no shared-memory round trips in the loop);
- E2M1 -> fp16 is one byte-permute table lookup per 4 values (every E2M1
  magnitude is exact in an fp16 high byte, low byte zero), the signs spread by
  prmt's sign-replicate mode, the bytes paired into half2 by one more prmt;
- the products accumulate as half2 fused multiply-adds (two values an
  instruction) against fp16 activations, 16 per half, then widen to fp32 once
  and take the block's scale: ~17 instructions per 8 values, all told.

fp16 needs range: activations enter as fp16(x * 2**-XS) (made once per step by
kernels.moe's align program, or past a few rows by _x16_kernel; W1 hands W2 its
SwiGLU output so), which keeps a block's 16-term
half sums below fp16's max for |x| < 2**16, and the 2**XS comes back through the
scale's exponent. The products are exact and a block's sum rounds to fp16
(2**-11 relative), below the bf16 path's own rounding; the tiles serve 16-bit
activations (fp32 ones take kernels.moe's MMA path).

Under the interpreter (CPU tests) the same loads and sums run as Triton ops
(E2M1 through fp16 patterns); tests/kernels/test_moe_gemv_ptx.py runs the PTX
on a model of its instructions. Selected by a config with GEMV (kernels.tuned;
bench.moe_variants compares it with the MMA path).
"""

from . import moe_combine as combine_kernels
from ._triton import HAVE_TRITON, tl
from .pdl import PREFETCH_PTX  # noqa: F401 (read as a global by _l2_prefetch where kernels.aot compiles it)
from .pdl import enter as _pdl_enter
from .pdl import l2_prefetch as _l2_prefetch

# The E2M1 magnitudes 0, .5, 1 and 1.5 as fp16 high bytes: the first half of _BLOCK_PTX's lookup table (the
# other half, 2..6, is an immediate). A lookup takes one half in a register. As a constant, ptxas rematerialised
# that register before every lookup (an IMAD a lookup: 16 of the 202 instructions of the tuned 120b loop under
# Triton 3.6). Read from memory (lut(), a copy a row: ptxas cannot tell the loads give one value), it stays in a
# register.
E2M1_F16_LO = 0x3E3C3800
LUT_WORDS = 256  # a copy for each of a tile's rows (W1: 2 BLOCK_N <= 256)
_LUT_WORDS = tl.constexpr(LUT_WORDS) if HAVE_TRITON else LUT_WORDS
_luts: dict = {}
_XS = 7  # activations are stored as fp16(x * 2**-XS): a block's half sums (16 x 6 x |x| 2**-XS) stay < 65504
XS = tl.constexpr(_XS) if HAVE_TRITON else _XS
X16_SCALE = tl.constexpr(2.0 ** -_XS) if HAVE_TRITON else 2.0 ** -_XS

# One word (8 E2M1 values, k = 8i..8i+7 of the block) against its 4 half2 activation pairs {W}, {X0}..{X3}:
# magnitudes' fp16 high bytes by table (t0: 0, .5, 1, 1.5; t1: 2, 3, 4, 6), each nibble's sign bit
# replicated into a byte (bytes of W<<4 hold the even k's signs, W's the odd k's), OR-ed into bit 7,
# then {0, h_k, 0, h_k+1} = half2 (k, k+1), fma'd into acc.
_WORD = """and.b32 m, {W}, 0x77777777; shr.u32 mb, m, 16; prmt.b32 h, t0, t1, m; prmt.b32 hb, t0, t1, mb;
shl.b32 sh, {W}, 4; prmt.b32 sa, sh, {W}, 0xD9C8; prmt.b32 sb, sh, {W}, 0xFBEA;
lop3.b32 h, h, sa, 0x80808080, 0xF8; lop3.b32 hb, hb, sb, 0x80808080, 0xF8;
prmt.b32 q, h, z, 0x1404; fma.rn.f16x2 acc, q, {X0}, acc; prmt.b32 q, h, z, 0x3424; fma.rn.f16x2 acc, q, {X1}, acc;
prmt.b32 q, hb, z, 0x1404; fma.rn.f16x2 acc, q, {X2}, acc; prmt.b32 q, hb, z, 0x3424; fma.rn.f16x2 acc, q, {X3}, acc;
"""
# $0-$3: a block's 16 weight bytes (streamed past L1), $4: its E8M0 scale byte; $5, $6: their addresses.
# A step of their own, so the loop can issue the next step's loads before this one's arithmetic.
_LOAD_PTX_TEXT = "ld.global.nc.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$5]; ld.global.nc.u8 $4, [$6];"
_LOAD_PTX = tl.constexpr(_LOAD_PTX_TEXT) if HAVE_TRITON else None
# $0 (f32) = sum over one 16-byte block ($1-$4) of E2M1 * x16, times 2**($5 - 127 + XS), $5 the block's
# E8M0 scale; $6: the address of its 32 fp16 activations (64 bytes, 64-bit); $7: E2M1_F16_LO.
_BLOCK_PTX_TEXT = ("""{
.reg .b32 x<16>, s, t0, t1, z, m, mb, h, hb, sh, sa, sb, q, acc;
.reg .b16 lo, hi;
.reg .f32 f0, f1;
ld.global.nc.v4.b32 {x0, x1, x2, x3}, [$6];
ld.global.nc.v4.b32 {x4, x5, x6, x7}, [$6+16];
ld.global.nc.v4.b32 {x8, x9, x10, x11}, [$6+32];
ld.global.nc.v4.b32 {x12, x13, x14, x15}, [$6+48];
mov.b32 t0, $7; mov.b32 t1, 0x46444240; mov.b32 z, 0; mov.b32 acc, 0;
""" + "".join(_WORD.format(W=f"${i + 1}", X0=f"x{4 * i}", X1=f"x{4 * i + 1}", X2=f"x{4 * i + 2}", X3=f"x{4 * i + 3}")
              for i in range(4)) + f"""mov.b32 {{lo, hi}}, acc;
cvt.f32.f16 f0, lo; cvt.f32.f16 f1, hi; add.f32 f0, f0, f1;
add.u32 s, $5, {_XS}; shl.b32 s, s, 23; mov.b32 f1, s; mul.f32 $0, f0, f1;
}}""")
_BLOCK_PTX = tl.constexpr(_BLOCK_PTX_TEXT) if HAVE_TRITON else None  # jitted code reads constexpr globals only


def _e2m1_x16k(c):
    """E2M1 codes (int32, 0..15) -> fp32 value * 2**-14 (an fp16 pattern: 5 integer ops and a convert)."""
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


def _load_blocks(w_ptr, s_ptr, PTX: tl.constexpr):
    """[R, NB] pointers to 16-byte weight blocks and their scales -> (4 int32 words, scale as int32)."""
    if PTX:
        return tl.inline_asm_elementwise(_LOAD_PTX, "=r,=r,=r,=r,=r,l,l", [w_ptr.to(tl.int64), s_ptr.to(tl.int64)],
                                         dtype=(tl.int32,) * 5, is_pure=True, pack=1)
    wp = w_ptr.to(tl.pointer_type(tl.int32))
    return tl.load(wp), tl.load(wp + 1), tl.load(wp + 2), tl.load(wp + 3), tl.load(s_ptr).to(tl.int32)


def _word_dot(w, x_ptr, i: tl.constexpr):
    """Word i of a block (k = 8i..8i+7, low nibble first) against its fp16 activations, in fp32 * 2**-14."""
    n = tl.arange(0, 8)[None, None, :]
    c = (w[:, :, None] >> (4 * n)) & 15
    return tl.sum(_e2m1_x16k(c) * tl.load(x_ptr[:, :, None] + 8 * i + n).to(tl.float32), axis=2)


def _block_sums(w0, w1, w2, w3, s, x_ptr, t0, PTX: tl.constexpr):
    """A block's words and scale ([R, NB] each) and [R, NB] pointers to its 32 fp16 activations -> its sum
    of E2M1 * x16 times 2**(scale - 127 + XS) (fp32; scale 0 reads as 2**-127). t0: E2M1_F16_LO, as read."""
    if PTX:
        return tl.inline_asm_elementwise(_BLOCK_PTX, "=r,r,r,r,r,r,l,r", [w0, w1, w2, w3, s, x_ptr.to(tl.int64), t0],
                                         dtype=tl.float32, is_pure=True, pack=1)
    part = _word_dot(w0, x_ptr, 0) + _word_dot(w1, x_ptr, 1) + _word_dot(w2, x_ptr, 2) + _word_dot(w3, x_ptr, 3)
    return part * ((s + (14 + XS)) << 23).to(tl.float32, bitcast=True)


def _rows_dot(x_row, w_rows, s_rows, K, lut_ptr, ROWS: tl.constexpr, BLOCK_KB: tl.constexpr, PTX: tl.constexpr):
    """W[rows] @ x over K -> [ROWS] fp32 (x * 2**XS undone): w_rows / s_rows [ROWS] point at each row's
    bytes and scales (every row a real one), x_row at the token's K fp16 activations, lut_ptr at lut()'s
    word. Each step's weights are loaded a step ahead, and the last step is peeled off the loop: a load ahead
    of it would be spare blocks only (at 1 KB steps, as many loads again as a 1,440-byte row's 90 blocks). The
    last step's own spare blocks reread a real one, summed as 0."""
    NB: tl.constexpr = BLOCK_KB // 16
    n_blk = K // 32
    last = (n_blk - 1) // NB * NB  # the last step's first block
    acc = tl.zeros((ROWS, NB), tl.float32)
    zero = tl.zeros((ROWS, NB), tl.int32)
    # a word a row (not one scalar load: ptxas keeps a uniform value in a uniform register, and copies it out
    # before every lookup as it does a constant)
    tl.static_assert(ROWS <= _LUT_WORDS)
    t0 = zero + tl.load(lut_ptr + tl.arange(0, ROWS))[:, None]
    blk = tl.minimum(tl.arange(0, NB), n_blk - 1)
    w0, w1, w2, w3, s = _load_blocks(w_rows[:, None] + blk[None, :] * 16, s_rows[:, None] + blk[None, :], PTX)
    for b0 in range(0, last, NB):  # the steps before the last: every block a real one
        nxt = tl.minimum(b0 + NB + tl.arange(0, NB), n_blk - 1)
        n0, n1, n2, n3, ns = _load_blocks(w_rows[:, None] + nxt[None, :] * 16, s_rows[:, None] + nxt[None, :], PTX)
        acc += _block_sums(w0, w1, w2, w3, s, x_row + (zero + blk[None, :] * 32), t0, PTX)
        w0, w1, w2, w3, s, blk = n0, n1, n2, n3, ns, nxt
    live = (last + tl.arange(0, NB)) < n_blk
    acc += tl.where(live[None, :], _block_sums(w0, w1, w2, w3, s, x_row + (zero + blk[None, :] * 32), t0, PTX), 0.0)
    return tl.sum(acc, axis=1)


def lut(device):
    """LUT_WORDS copies of E2M1_F16_LO, int32 on device (made once, by a fill kernel): the gemv tiles'
    lut_ptr. Not first made inside a CUDA-graph capture, where the fill would only run at replay; the
    capturers run each step eagerly first (kernels.cuda_graphs, kernels.tune), which makes it."""
    import torch
    device = torch.device(device)
    t = _luts.get(device)
    if t is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("kernels.moe_gemv.lut: first made during a CUDA-graph capture; run the step once "
                               "before capturing it")
        t = _luts[device] = torch.full((LUT_WORDS,), E2M1_F16_LO, dtype=torch.int32, device=device)
    return t


def _prefetch_rows(wb_ptr, ws_ptr, tile_e_ptr, t, e, r_lo, r_hi, K, PTX: tl.constexpr):
    """Bulk-prefetch MXFP4 rows [r_lo, r_hi) (int64) of a K-wide expert matrix into L2: K/2 bytes a row, then
    its K/32 scales (kernels.pdl.l2_prefetch). Asked by expert e's first tile t only: tiles run sorted by
    expert, and its other tiles read the same rows. The single-pair, MMA and rs tiles all use it (L2PF)."""
    first = (t == 0) | (tl.load(tile_e_ptr + tl.maximum(t - 1, 0)) != e)
    r_hi = tl.where(first, r_hi, r_lo)
    wb, ws = wb_ptr.to(tl.int64), ws_ptr.to(tl.int64)
    _l2_prefetch(wb + r_lo * (K // 2), wb + r_hi * (K // 2), 32, PTX)
    _l2_prefetch(ws + r_lo * (K // 32), ws + r_hi * (K // 32), 4, PTX)


def _x16_kernel(x_ptr, out_ptr, H, stride_x, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """out[n] = fp16(x[n] * 2**-XS): the W1 tiles' activations, where the align program does not make them."""
    _pdl_enter(PDL)
    n = tl.program_id(0)
    h = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + n.to(tl.int64) * stride_x + h, mask=h < H, other=0.0).to(tl.float32)
    tl.store(out_ptr + n.to(tl.int64) * H + h, (v * X16_SCALE).to(tl.float16), mask=h < H)


def _w1_gemv_kernel(x_ptr, wb_ptr, ws_ptr, b_ptr, act_ptr, sorted_ptr, tile_e_ptr, lut_ptr, n_pairs, H, I,
                    TOP_K: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, PTX: tl.constexpr, L2PF: tl.constexpr = False,
                    PDL: tl.constexpr = False):
    """act[t, j] = fp16(swiglu(x[tok] @ W1[e, 2j]^T + b, x[tok] @ W1[e, 2j+1]^T + b) * 2**-XS) for BLOCK_N
    columns j; x: _x16_kernel's [N, H]. L2PF: the program's rows bulk-prefetched first (_prefetch_rows)."""
    _pdl_enter(PDL)
    t = tl.program_id(0)
    e = tl.load(tile_e_ptr + t).to(tl.int64)
    pair = tl.load(sorted_ptr + t)
    if (e < 0) | (pair >= n_pairs):
        return
    R: tl.constexpr = 2 * BLOCK_N  # W1's gate and linear rows interleave: rows 2j, 2j+1
    if L2PF:
        r0 = tl.program_id(1) * R
        _prefetch_rows(wb_ptr, ws_ptr, tile_e_ptr, t, e, e * (2 * I) + r0, e * (2 * I) + tl.minimum(r0 + R, 2 * I),
                       H, PTX)
    r = tl.program_id(1) * R + tl.arange(0, R)
    row = e * (2 * I) + tl.minimum(r, 2 * I - 1).to(tl.int64)
    y = _rows_dot(x_ptr + (pair // TOP_K).to(tl.int64) * H, wb_ptr + row * (H // 2), ws_ptr + row * (H // 32),
                  H, lut_ptr, R, BLOCK_KB, PTX)
    y += tl.load(b_ptr + row).to(tl.float32)
    gate, lin = tl.split(tl.reshape(y, (BLOCK_N, 2)))
    gate = tl.minimum(gate, LIMIT)
    lin = tl.minimum(tl.maximum(lin, -LIMIT), LIMIT)
    h = gate * tl.sigmoid(ALPHA * gate) * (lin + 1.0)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(act_ptr + t.to(tl.int64) * I + j, (h * X16_SCALE).to(tl.float16), mask=j < I)


def _w2_gemv_kernel(act_ptr, wb_ptr, ws_ptr, b_ptr, rw_ptr, y_ptr, sorted_ptr, tile_e_ptr, lut_ptr, n_pairs, H, I,
                    cnt_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, n_rows, s_res, eps,
                    TOP_K: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, BLOCK_H: tl.constexpr,
                    COMBINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
                    PTX: tl.constexpr, L2PF: tl.constexpr = False, PDL: tl.constexpr = False,
                    TAIL_G: tl.constexpr = 1, TAIL_HOLD: tl.constexpr = False):
    """y[pair, n] = (act[t] @ W2[e, n]^T + b2[e, n]) * the pair's router weight, for BLOCK_N rows n.
    TAIL_G, TAIL_HOLD: as kernels.moe._w2_kernel's."""
    _pdl_enter(PDL)
    t = tl.program_id(0)
    e = tl.load(tile_e_ptr + t).to(tl.int64)
    pair = tl.load(sorted_ptr + t)
    if (e < 0) | (pair >= n_pairs):
        if COMBINE:  # a spare tile takes its ticket too: the launch's last program combines
            _combine_tail(cnt_ptr, y_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, n_rows, H, s_res, eps, TOP_K,
                          HAS_RES, NORM, BLOCK_H, 1, TAIL_G, TAIL_HOLD)
        return
    if L2PF:
        n0 = tl.program_id(1) * BLOCK_N
        _prefetch_rows(wb_ptr, ws_ptr, tile_e_ptr, t, e, e * H + n0, e * H + tl.minimum(n0 + BLOCK_N, H), I, PTX)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = e * H + tl.minimum(n, H - 1).to(tl.int64)
    y = _rows_dot(act_ptr + t.to(tl.int64) * I, wb_ptr + row * (I // 2), ws_ptr + row * (I // 32), I, lut_ptr,
                  BLOCK_N, BLOCK_KB, PTX)
    y += tl.load(b_ptr + row).to(tl.float32)
    y = y * tl.load(rw_ptr + pair)
    tl.store(y_ptr + pair.to(tl.int64) * H + n, y.to(y_ptr.dtype.element_ty), mask=n < H)
    if COMBINE:
        _combine_tail(cnt_ptr, y_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, n_rows, H, s_res, eps, TOP_K,
                      HAS_RES, NORM, BLOCK_H, 1, TAIL_G, TAIL_HOLD)


# kernels.moe_combine's tail, jitted again into this module's globals (where its kernels look)
_combine_row, _combine_tail = (getattr(f, "fn", f) for f in (combine_kernels._combine_row,
                                                          combine_kernels._combine_tail))
_KERNELS = ("_pdl_enter", "_l2_prefetch", "_prefetch_rows", "_combine_row", "_combine_tail", "_e2m1_x16k",
            "_load_blocks", "_word_dot", "_block_sums", "_rows_dot", "_x16_kernel", "_w1_gemv_kernel",
            "_w2_gemv_kernel")
_NO_SPECIALIZE = {"_w1_gemv_kernel": ("n_pairs",), "_w2_gemv_kernel": ("n_pairs", "n_rows", "s_res")}
