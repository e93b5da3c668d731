"""The MoE's expert matmuls for decode-sized steps: one (token, expert) pair per tile, no tensor cores.

At a handful of tokens per step each expert sees about one row, so a 16-row
MMA tile is 15/16 padding and the step is a stream of weight bytes; what it
costs is the instructions spent turning each E2M1 nibble into a number. On an
H200, tl.dot_scaled (kernels.moe) measured ~14 instructions per weight value
and ~15% of copy bandwidth at batch 1 (BENCHMARKS.md "GPU"). Here:

- on CUDA, 8 nibbles (one 32-bit word) become fp32 through byte-permute table
  lookups in PTX (_E2M1_PTX, ~3 instructions a value; tests/kernels/test_moe_gemv_ptx.py
  runs it on a model of its instructions); under the interpreter a nibble becomes
  an fp16 bit pattern (5 integer ops) equal to the value times 2**-14 exactly,
  subnormals included (the conversion to fp32 keeps fp16 subnormals);
- each thread owns whole 16-byte scale blocks, so the 32 products of a block
  are summed unscaled in registers and the block's E8M0 scale multiplies that
  sum once (the 2**14 once per output);
- tiles are single pairs (align with BLOCK_M=1): a program is (pair, block of
  output rows), so even one token fills the GPU with programs;
- W1 writes its activations in fp32 (kernels.moe allocates them so), so W2's
  loop widens no bf16: fewer instructions, and one rounding fewer than the MMA path.

Selected by a config with GEMV (kernels.tuned; bench.moe_variants compares it
with the MMA path); the reference is kernels.moe.moe_reference, and
tests/kernels/test_moe.py compares the two under the interpreter.
"""

from ._triton import HAVE_TRITON, tl

# E2M1 -> fp32 for 8 values (one 32-bit word of 4 bytes) in PTX: byte-permute (prmt) lookups of the
# bf16 bytes of the 8 magnitudes, the sign bits spread to byte lanes by prmt's sign-replicate mode, the
# bytes paired into bf16x2 and widened: ~23 instructions per 8 values, where the arithmetic decode
# below costs ~8 per value. Outputs $0-$3: even k (low nibbles), $4-$7: odd k; input $8.
_E2M1_PTX_TEXT = """{
.reg .b32 th0, th1, tl0, tl1, m, mb, ha, la, hb, lb, x4, sa, sb, p0, p1, p2, p3;
mov.b32 th0, 0x3F3F3F00; mov.b32 th1, 0x40404040; mov.b32 tl0, 0xC0800000; mov.b32 tl1, 0xC0804000;
and.b32 m, $8, 0x77777777; shr.u32 mb, m, 16;
prmt.b32 ha, th0, th1, m; prmt.b32 la, tl0, tl1, m; prmt.b32 hb, th0, th1, mb; prmt.b32 lb, tl0, tl1, mb;
shl.b32 x4, $8, 4; prmt.b32 sa, x4, $8, 0xD9C8; prmt.b32 sb, x4, $8, 0xFBEA;
lop3.b32 ha, ha, sa, 0x80808080, 0xF8; lop3.b32 hb, hb, sb, 0x80808080, 0xF8;
prmt.b32 p0, la, ha, 0x5140; prmt.b32 p1, la, ha, 0x7362; prmt.b32 p2, lb, hb, 0x5140; prmt.b32 p3, lb, hb, 0x7362;
shl.b32 $0, p0, 16; shl.b32 $1, p1, 16; shl.b32 $2, p2, 16; shl.b32 $3, p3, 16;
and.b32 $4, p0, 0xFFFF0000; and.b32 $5, p1, 0xFFFF0000; and.b32 $6, p2, 0xFFFF0000; and.b32 $7, p3, 0xFFFF0000;
}"""
_E2M1_PTX = tl.constexpr(_E2M1_PTX_TEXT) if HAVE_TRITON else None  # jitted code reads constexpr globals only


def _e2m1_x16k(c):
    """E2M1 codes (int32, 0..15) -> fp32 value * 2**-14 (an fp16 pattern: 5 integer ops and a convert)."""
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


def _block_dot(w_ptrs, wmask, x_ev, x_od, s_ptrs, smask, PTX: tl.constexpr):
    """Sum over the loaded [R, NB, 16] bytes of (even, odd) nibble * (x_ev, x_od), per 16-byte block,
    times each block's scale -> [R, NB]. PTX: decoded by _E2M1_PTX (exact values); else by _e2m1_x16k
    (values * 2**-14, so the block scale carries the 2**14)."""
    b = tl.load(w_ptrs, mask=wmask, other=0)
    s = tl.load(s_ptrs, mask=smask, other=0).to(tl.int32)
    if PTX:
        ev, od = tl.inline_asm_elementwise(_E2M1_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
                                           dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        unit = s << 23
    else:
        bi = b.to(tl.int32)
        ev, od = _e2m1_x16k(bi & 15), _e2m1_x16k(bi >> 4)
        unit = (s + 14) << 23
    part = tl.sum(ev * x_ev + od * x_od, axis=2)
    return part * unit.to(tl.float32, bitcast=True)  # 2**(s-127) (* 2**14); s == 0 reads as 0, not 2**-127


def _x_pairs(row_ptr, blk, K, NB: tl.constexpr):
    """A token's activations over scale blocks `blk` as (even k, odd k) [1, NB, 16] fp32."""
    off = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    xv = tl.load(row_ptr + off, mask=(off < K), other=0.0).to(tl.float32)
    ev, od = tl.split(tl.reshape(xv, (NB, 16, 2)))
    return ev[None, :, :], od[None, :, :]


def _rows_dot(x_row, w_rows, s_rows, rmask, K, ROWS: tl.constexpr, BLOCK_KB: tl.constexpr, PTX: tl.constexpr):
    """W[rows] @ x over K -> [ROWS] fp32: w_rows [ROWS, 1, 1] / s_rows [ROWS, 1] point at each row's bytes
    and scales, x_row at the token's K activations."""
    NB: tl.constexpr = BLOCK_KB // 16
    acc = tl.zeros((ROWS, NB), tl.float32)
    for kb0 in range(0, K // 2, BLOCK_KB):
        blk = kb0 // 16 + tl.arange(0, NB)
        bmask = blk < K // 32
        x_ev, x_od = _x_pairs(x_row, blk, K, NB)
        off = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
        acc += _block_dot(w_rows + off[None, :, :], rmask[:, None, None] & bmask[None, :, None], x_ev, x_od,
                          s_rows + blk[None, :], rmask[:, None] & bmask[None, :], PTX)
    return tl.sum(acc, axis=1)


def _w1_gemv_kernel(x_ptr, wb_ptr, ws_ptr, b_ptr, act_ptr, sorted_ptr, tile_e_ptr, n_pairs, H, I, stride_x,
                    TOP_K: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, PTX: tl.constexpr):
    """act[t, j] = swiglu(x[tok] @ W1[e, 2j]^T + b, x[tok] @ W1[e, 2j+1]^T + b) for BLOCK_N columns j."""
    t = tl.program_id(0)
    e = tl.load(tile_e_ptr + t).to(tl.int64)
    pair = tl.load(sorted_ptr + t)
    if (e < 0) | (pair >= n_pairs):
        return
    R: tl.constexpr = 2 * BLOCK_N  # W1's gate and linear rows interleave: rows 2j, 2j+1
    r = tl.program_id(1) * R + tl.arange(0, R)
    rmask = r < 2 * I
    row = e * (2 * I) + r.to(tl.int64)
    y = _rows_dot(x_ptr + (pair // TOP_K).to(tl.int64) * stride_x, wb_ptr + row[:, None, None] * (H // 2),
                  ws_ptr + row[:, None] * (H // 32), rmask, H, R, BLOCK_KB, PTX)
    y += tl.load(b_ptr + e * 2 * I + r, mask=rmask, other=0.0).to(tl.float32)
    gate, lin = tl.split(tl.reshape(y, (BLOCK_N, 2)))
    gate = tl.minimum(gate, LIMIT)
    lin = tl.minimum(tl.maximum(lin, -LIMIT), LIMIT)
    h = gate * tl.sigmoid(ALPHA * gate) * (lin + 1.0)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(act_ptr + t.to(tl.int64) * I + j, h.to(act_ptr.dtype.element_ty), mask=j < I)


def _w2_gemv_kernel(act_ptr, wb_ptr, ws_ptr, b_ptr, rw_ptr, y_ptr, sorted_ptr, tile_e_ptr, n_pairs, H, I,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, PTX: tl.constexpr):
    """y[pair, n] = (act[t] @ W2[e, n]^T + b2[e, n]) * the pair's router weight, for BLOCK_N rows n."""
    t = tl.program_id(0)
    e = tl.load(tile_e_ptr + t).to(tl.int64)
    pair = tl.load(sorted_ptr + t)
    if (e < 0) | (pair >= n_pairs):
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < H
    row = e * H + n.to(tl.int64)
    y = _rows_dot(act_ptr + t.to(tl.int64) * I, wb_ptr + row[:, None, None] * (I // 2),
                  ws_ptr + row[:, None] * (I // 32), nmask, I, BLOCK_N, BLOCK_KB, PTX)
    y += tl.load(b_ptr + e * H + n, mask=nmask, other=0.0).to(tl.float32)
    y = y * tl.load(rw_ptr + pair)
    tl.store(y_ptr + pair.to(tl.int64) * H + n, y.to(y_ptr.dtype.element_ty), mask=nmask)


_KERNELS = ("_e2m1_x16k", "_block_dot", "_x_pairs", "_rows_dot", "_w1_gemv_kernel", "_w2_gemv_kernel")
_NO_SPECIALIZE = {"_w1_gemv_kernel": ("n_pairs",), "_w2_gemv_kernel": ("n_pairs",)}
