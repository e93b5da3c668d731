"""The MoE's expert matmuls for decode-sized steps: one (token, expert) pair per tile, no tensor cores.

At a handful of tokens per step each expert sees about one row, so a 16-row
MMA tile is 15/16 padding and the step is a stream of weight bytes; what it
costs is the instructions spent turning each E2M1 nibble into a number. On an
H200, tl.dot_scaled (kernels.moe) measured ~14 instructions per weight value
and ~15% of copy bandwidth at batch 1 (BENCHMARKS.md "GPU"). Here:

- a nibble becomes an fp16 bit pattern (magnitude bits to the exponent/mantissa,
  sign bit to the top: 5 integer ops) that equals the E2M1 value times 2**-14
  exactly, subnormals included (the conversion to fp32 keeps fp16 subnormals);
- each thread owns whole 16-byte scale blocks, so the 32 products of a block
  are summed unscaled in registers and the block's E8M0 scale multiplies that
  sum once (the 2**14 once per output);
- tiles are single pairs (align with BLOCK_M=1): a program is (pair, block of
  output rows), so even one token fills the GPU with programs.

Selected by a config with GEMV (kernels.tuned; bench.moe_variants compares it
with the MMA path); the reference is kernels.moe.moe_reference, and
tests/kernels/test_moe.py compares the two under the interpreter.
"""

from ._triton import tl

def _e2m1_x16k(c):
    """E2M1 codes (int32, 0..15) -> fp32 value * 2**-14."""
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


def _block_dot(w_ptrs, wmask, x_ev, x_od, s_ptrs, smask):
    """Sum over the loaded [R, NB, 16] bytes of (even, odd) nibble * (x_ev, x_od), per 16-byte block,
    times each block's scale -> [R, NB] (still * 2**-14)."""
    b = tl.load(w_ptrs, mask=wmask, other=0).to(tl.int32)
    part = tl.sum(_e2m1_x16k(b & 15) * x_ev + _e2m1_x16k(b >> 4) * x_od, axis=2)
    s = tl.load(s_ptrs, mask=smask, other=0).to(tl.int32)
    return part * (s << 23).to(tl.float32, bitcast=True)  # 2**(s-127); s == 0 reads as 0, not 2**-127


def _x_pairs(row_ptr, blk, K, NB: tl.constexpr):
    """A token's activations over scale blocks `blk` as (even k, odd k) [1, NB, 16] fp32."""
    off = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    xv = tl.load(row_ptr + off, mask=(off < K), other=0.0).to(tl.float32)
    ev, od = tl.split(tl.reshape(xv, (NB, 16, 2)))
    return ev[None, :, :], od[None, :, :]


def _w1_gemv_kernel(x_ptr, wb_ptr, ws_ptr, b_ptr, act_ptr, sorted_ptr, tile_e_ptr, n_pairs, H, I, stride_x,
                    TOP_K: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr):
    """act[t, j] = swiglu(x[tok] @ W1[e, 2j]^T + b, x[tok] @ W1[e, 2j+1]^T + b) for BLOCK_N columns j."""
    t = tl.program_id(0)
    e = tl.load(tile_e_ptr + t).to(tl.int64)
    pair = tl.load(sorted_ptr + t)
    if (e < 0) | (pair >= n_pairs):
        return
    R: tl.constexpr = 2 * BLOCK_N  # W1's gate and linear rows interleave: rows 2j, 2j+1
    NB: tl.constexpr = BLOCK_KB // 16
    r = tl.program_id(1) * R + tl.arange(0, R)
    rmask = r < 2 * I
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_x
    w_rows = wb_ptr + (e * (2 * I) + r.to(tl.int64))[:, None, None] * (H // 2)
    s_rows = ws_ptr + (e * (2 * I) + r.to(tl.int64))[:, None] * (H // 32)
    acc = tl.zeros((R, NB), tl.float32)
    for kb0 in range(0, H // 2, BLOCK_KB):
        blk = kb0 // 16 + tl.arange(0, NB)
        bmask = blk < H // 32
        x_ev, x_od = _x_pairs(x_row, blk, H, NB)
        off = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
        acc += _block_dot(w_rows + off[None, :, :], rmask[:, None, None] & bmask[None, :, None], x_ev, x_od,
                          s_rows + blk[None, :], rmask[:, None] & bmask[None, :])
    y = tl.sum(acc, axis=1) * 16384.0 + tl.load(b_ptr + e * 2 * I + r, mask=rmask, other=0.0).to(tl.float32)
    gate, lin = tl.split(tl.reshape(y, (BLOCK_N, 2)))
    gate = tl.minimum(gate, LIMIT)
    lin = tl.minimum(tl.maximum(lin, -LIMIT), LIMIT)
    h = gate * tl.sigmoid(ALPHA * gate) * (lin + 1.0)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(act_ptr + t.to(tl.int64) * I + j, h.to(act_ptr.dtype.element_ty), mask=j < I)


def _w2_gemv_kernel(act_ptr, wb_ptr, ws_ptr, b_ptr, rw_ptr, y_ptr, sorted_ptr, tile_e_ptr, n_pairs, H, I,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr):
    """y[pair, n] = (act[t] @ W2[e, n]^T + b2[e, n]) * the pair's router weight, for BLOCK_N rows n."""
    t = tl.program_id(0)
    e = tl.load(tile_e_ptr + t).to(tl.int64)
    pair = tl.load(sorted_ptr + t)
    if (e < 0) | (pair >= n_pairs):
        return
    NB: tl.constexpr = BLOCK_KB // 16
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < H
    a_row = act_ptr + t.to(tl.int64) * I
    w_rows = wb_ptr + (e * H + n.to(tl.int64))[:, None, None] * (I // 2)
    s_rows = ws_ptr + (e * H + n.to(tl.int64))[:, None] * (I // 32)
    acc = tl.zeros((BLOCK_N, NB), tl.float32)
    for kb0 in range(0, I // 2, BLOCK_KB):
        blk = kb0 // 16 + tl.arange(0, NB)
        bmask = blk < I // 32
        a_ev, a_od = _x_pairs(a_row, blk, I, NB)
        off = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
        acc += _block_dot(w_rows + off[None, :, :], nmask[:, None, None] & bmask[None, :, None], a_ev, a_od,
                          s_rows + blk[None, :], nmask[:, None] & bmask[None, :])
    y = tl.sum(acc, axis=1) * 16384.0 + tl.load(b_ptr + e * H + n, mask=nmask, other=0.0).to(tl.float32)
    y = y * tl.load(rw_ptr + pair)
    tl.store(y_ptr + pair.to(tl.int64) * H + n, y.to(y_ptr.dtype.element_ty), mask=nmask)


_KERNELS = ("_e2m1_x16k", "_block_dot", "_x_pairs", "_w1_gemv_kernel", "_w2_gemv_kernel")
_NO_SPECIALIZE = {"_w1_gemv_kernel": ("n_pairs",), "_w2_gemv_kernel": ("n_pairs",)}
