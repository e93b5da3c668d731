"""The MoE's expert matmuls for steps of many tokens: MXFP4 weights as the tensor cores' register operand.

Past a few tokens per expert the expert matmuls are tensor-core work, and on an
H200 what bounded them was the upcast: tl.dot_scaled spent ~14 instructions per
weight value turning E2M1 into the bf16 MMA operand (BENCHMARKS.md "GPU"; 27%
of copy bandwidth at batch 64). Here the product is transposed, out^T = W @ x^T:
the weights are the MMA's A operand, which Hopper's wgmma (and mma.sync) read
from registers, so Triton loads the bytes straight into the operand's register
layout (LDSM from the pipelined shared-memory copy) and the decode is one PTX
statement on each thread's own registers (_DEC_PTX, 4 bytes a call):

- E2M1 -> bf16 by bit placement: a nibble's sign to bit 15 and its 3 magnitude
  bits to bits 8..6 make the bf16 of E2M1 * 2**-126 exactly (code 1, 0.5,
  becomes the subnormal 2**-127), two shifts and a lop3 per two values;
- one bf16x2 multiply by 2**(s - 1 - XC) (made once per row and block) takes
  the block's E8M0 scale s and undoes the bias, so each value costs ~2.25
  instructions, not ~14.

Two bookkeeping choices make that possible without converting layouts:
- a byte holds two values (low nibble k even, high nibble k odd), so a
  16-byte block decodes to 16 low-nibble columns (the even k's) and 16 high
  ones (the odd k's), joined into one K=32 operand; two blocks join into one
  K=64 MMA when a K step holds an even number of them (fewer MMAs, and one
  wait a pair). Within a block the bytes are taken in the order (ACT_ORDER)
  that puts a thread's 4 operand bytes side by side in shared memory, so one
  LDSM lane holds them. The joins cost nothing: the halves differ in one
  register bit of the operand layout;
- the activations enter permuted to match (the even-k half of each 32-block,
  then the odd-k half, both in that byte order) and times 2**XC, which keeps
  2**(s - 1 - XC) a normal bf16 for every realistic scale (s <= 192 is exact;
  larger scales clamp, and blocks under 2**-62 lose precision, far outside
  any trained model's weights). _xperm_kernel makes W1's input so, and W1
  writes its SwiGLU output so for W2.

Each K step ends with _settle, which waits for the step's MMAs: without it
Triton 3.6 leaves the last one in flight across the loop's back edge and ptxas
serializes every wgmma of the kernel (kernels.aot reports it).

Under the interpreter (CPU tests) the same loads, orders and bf16 dots run with
the decode in Triton ops; tests/kernels/test_moe_rs_ptx.py runs the PTX on
a model of its instructions. Selected by a config with RS (kernels.tuned,
kernels.moe_configs.rs_configs).
"""

from . import moe_combine as combine_kernels
from . import moe_gemv as gemv_kernels
from ._triton import HAVE_TRITON, tl
from .pdl import PREFETCH_PTX  # noqa: F401 (read as a global by _l2_prefetch where kernels.aot compiles it)
from .pdl import enter as _pdl_enter
from .pdl import l2_prefetch as _l2_prefetch

_XC = 64  # activations enter as bf16(x * 2**XC)
XC_SCALE = tl.constexpr(2.0 ** _XC) if HAVE_TRITON else 2.0 ** _XC
S_MAX = 192  # larger E8M0 scales clamp here: 2**(S_MAX - 1 - XC) is the largest multiplier bf16 holds (2**127)
# jitted code reads constexpr globals only
_S_MAX = tl.constexpr(S_MAX) if HAVE_TRITON else S_MAX
_M_BIAS = tl.constexpr(126 - _XC) if HAVE_TRITON else 126 - _XC  # exponent field of 2**(s - 1 - XC), less s

# pack=4: $4 holds 4 weight bytes (elements 0..3), $5, $6 the bf16x2 multipliers of elements (0, 1), (2, 3)
# -> $0, $1: bf16x2 of the low nibbles of elements (0, 1), (2, 3); $2, $3: the high nibbles'. Bytes of
# elements 0, 1 go to bits 8-15 and 24-31 of u. A low nibble's magnitude (bits 8-10) shifts right 2 to bf16
# bits 6-8 and its sign (11) left 4 to bit 15, nothing else landing there: lop3 0xA8 = (a | b) & mask.
# A high nibble's magnitude (12-14) is masked, then shifted right 6; its sign is already at bit 15
# (lop3 0xF8 = a | (u & mask)).
_DEC_PTX_TEXT = """{
.reg .b32 u, a, b;
prmt.b32 u, $4, 0, 0x1404;
shr.u32 a, u, 2; shl.b32 b, u, 4; lop3.b32 $0, a, b, 0x81C081C0, 0xA8;
and.b32 a, u, 0x70007000; shr.u32 a, a, 6; lop3.b32 $2, a, u, 0x80008000, 0xF8;
prmt.b32 u, $4, 0, 0x3424;
shr.u32 a, u, 2; shl.b32 b, u, 4; lop3.b32 $1, a, b, 0x81C081C0, 0xA8;
and.b32 a, u, 0x70007000; shr.u32 a, a, 6; lop3.b32 $3, a, u, 0x80008000, 0xF8;
mul.rn.bf16x2 $0, $0, $5; mul.rn.bf16x2 $2, $2, $5;
mul.rn.bf16x2 $1, $1, $6; mul.rn.bf16x2 $3, $3, $6;
}"""
_DEC_PTX = tl.constexpr(_DEC_PTX_TEXT) if HAVE_TRITON else None


def act_order(k: int) -> int:
    """Where activation k lands in the permuted order (within its 32-block, plus the block's start):
    byte k // 2 = 4c + 2h + i is operand column 8h + 2c + i; odd k go to the block's second half."""
    byte = (k % 32) >> 1
    col = ((byte >> 1) & 1) * 8 + (byte >> 2) * 2 + (byte & 1)
    return k - k % 32 + col + 16 * (k & 1)


def _act_pos(k):
    """act_order in Triton ops."""
    byte = (k & 31) >> 1
    return k - (k & 31) + ((byte >> 1) & 1) * 8 + (byte >> 2) * 2 + (byte & 1) + 16 * (k & 1)


def _tile(wrow, srow, blk, PTX: tl.constexpr):
    """Rows' block `blk` ([R] pointers to their bytes and scales) -> (low-nibble values, high-nibble values),
    [R, 16] each, operand column c holding byte 4(c//2 % 4) + 2(c // 8) + c % 2 (see act_order), times 2**-XC."""
    R: tl.constexpr = wrow.shape[0]
    b = tl.load(wrow[:, None] + blk * 16 + tl.arange(0, 16)[None, :])
    b = tl.reshape(tl.permute(tl.reshape(b, (R, 4, 2, 2)), (0, 2, 1, 3)), (R, 16))
    # the block's multiplier 2**(s - 1 - XC) as bf16 bits, a normal number for every s
    mult = ((tl.minimum(tl.load(srow + blk).to(tl.int32), _S_MAX) + _M_BIAS) << 7).to(tl.int16)
    mult = tl.broadcast_to(mult.to(tl.bfloat16, bitcast=True)[:, None], (R, 16))
    if PTX:
        lo, hi = tl.inline_asm_elementwise(_DEC_PTX, "=r,=r,=r,=r,r,r,r", [b, mult],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        scale = mult.to(tl.float32)
        c = b.to(tl.int32)  # the products are exact, and so are their bf16 casts: the PTX's values
        lo, hi = (_e2m1(c & 15) * scale).to(tl.bfloat16), (_e2m1(c >> 4) * scale).to(tl.bfloat16)
    return lo, hi


def _e2m1(c):
    """E2M1 codes (int32) -> the PTX's E2M1 * 2**-126, placed in fp32 bits the same way (code 1 a
    subnormal)."""
    return (((c & 7) << 22) | ((c & 8) << 28)).to(tl.float32, bitcast=True)


def _cat_k(a, b):
    """[R, K] and [R, K] -> [R, 2K]: a's columns, then b's (conversion-free: the pair is a register bit)."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


def _block(wrow, srow, blk, PTX: tl.constexpr):
    """Block `blk` of the rows as one [R, 32] operand: the low nibbles' 16 columns, then the high ones'."""
    lo, hi = _tile(wrow, srow, blk, PTX)
    return _cat_k(lo, hi)


def _rows_mma(acc, wrow, srow, xrow, n_blk, NSUB: tl.constexpr, PTX: tl.constexpr):
    """acc^T += W[rows] @ x'^T over K: wrow/srow [R] point at each row's bytes and scales, xrow [M] at each
    token's permuted activations (n_blk 32-blocks; NSUB a step, dividing n_blk). BPD blocks an MMA: 2 when
    NSUB is even (fewer, longer MMAs and waits)."""
    BPD: tl.constexpr = 2 - NSUB % 2
    xcol = xrow[None, :] + tl.arange(0, 32 * BPD)[:, None]
    for kb in range(0, n_blk, NSUB):
        for sb in tl.static_range(0, NSUB, BPD):
            w = _block(wrow, srow, kb + sb, PTX)
            if BPD == 2:
                w = _cat_k(w, _block(wrow, srow, kb + sb + 1, PTX))
            acc = tl.dot(w, tl.load(xcol + (kb + sb) * 32), acc)  # bf16 x bf16 (interpreted too: kernels._interp)
        if PTX:  # the step's MMAs finish before the loop goes round: ptxas otherwise serializes every wgmma
            acc = _settle(acc)
    return acc


def _settle(acc):
    """acc through a register move, which makes Triton wait for the MMAs that wrote it here. Triton 3.6
    leaves a loop's last wgmma in flight across the back edge, and ptxas then serializes every wgmma of
    the kernel (C7515: "non wgmma instructions defining accumulator registers ... between start and end
    of the pipeline stage"), each waited for before the next issues; kernels.aot reports it."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [acc], dtype=tl.float32, is_pure=True, pack=1)


def _tile_rows(sorted_ptr, n_pairs, BLOCK_M: tl.constexpr):
    """A tile's slots of align's sorted pairs (int64), their pair ids, and which hold a pair (not padding)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pair = tl.load(sorted_ptr + rows)
    return rows, pair, pair < n_pairs


def _xperm_kernel(x_ptr, out_ptr, H, stride_x, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """out[n, act_order(k)] = bf16(x[n, k] * 2**XC): W1's activations."""
    _pdl_enter(PDL)
    n = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + n * stride_x + k, mask=k < H, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * H + _act_pos(k), (v * XC_SCALE).to(tl.bfloat16), mask=k < H)


def _w1_rs_kernel(x_ptr, wb_ptr, ws_ptr, b_ptr, act_ptr, sorted_ptr, tile_e_ptr, n_pairs, H, I,
                  TOP_K: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, NSUB: tl.constexpr, PTX: tl.constexpr, L2PF: tl.constexpr = False,
                  PDL: tl.constexpr = False):
    """act'[row, act_order(j)] = bf16(swiglu(x[tok] @ W1[e, 2j]^T + b, x[tok] @ W1[e, 2j+1]^T + b) * 2**XC)
    for BLOCK_N columns j and the tile's BLOCK_M rows; x: _xperm_kernel's [N, H]. L2PF: the program's rows
    bulk-prefetched into L2 first (kernels.moe_gemv._prefetch_rows)."""
    _pdl_enter(PDL)
    t = tl.program_id(0)
    e = tl.load(tile_e_ptr + t).to(tl.int64)
    if e < 0:
        return
    if L2PF:
        r0 = e * (2 * I) + tl.program_id(1) * 2 * BLOCK_N
        _prefetch_rows(wb_ptr, ws_ptr, tile_e_ptr, t, e, r0, tl.minimum(r0 + 2 * BLOCK_N, (e + 1) * (2 * I)), H, PTX)
    rows, pair, rvalid = _tile_rows(sorted_ptr, n_pairs, BLOCK_M)
    tok = (tl.minimum(pair, n_pairs - 1) // TOP_K).to(tl.int64)  # padding rows read a real token, never stored
    # the column block's gate and linear rows (2j, 2j+1) are 2 BLOCK_N consecutive rows of W1: one operand
    r = tl.minimum(tl.program_id(1) * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N), 2 * I - 1)
    r = e * (2 * I) + r.to(tl.int64)
    n_blk = H // 32
    acc = _rows_mma(tl.zeros((2 * BLOCK_N, BLOCK_M), tl.float32), wb_ptr + r * (H // 2), ws_ptr + r * n_blk,
                    x_ptr + tok * H, n_blk, NSUB, PTX)
    g, lin = tl.split(tl.permute(tl.reshape(acc, (BLOCK_N, 2, BLOCK_M)), (0, 2, 1)))
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    gate = e * (2 * I) + 2 * tl.minimum(j, I - 1).to(tl.int64)
    g += tl.load(b_ptr + gate).to(tl.float32)[:, None]
    lin += tl.load(b_ptr + gate + 1).to(tl.float32)[:, None]
    g = tl.minimum(g, LIMIT)
    lin = tl.minimum(tl.maximum(lin, -LIMIT), LIMIT)
    h = g * tl.sigmoid(ALPHA * g) * (lin + 1.0)
    out = act_ptr + rows[None, :] * I + _act_pos(j)[:, None]
    tl.store(out, (h * XC_SCALE).to(tl.bfloat16), mask=rvalid[None, :] & (j < I)[:, None])


def _w2_rs_kernel(act_ptr, wb_ptr, ws_ptr, b_ptr, rw_ptr, y_ptr, sorted_ptr, tile_e_ptr, n_pairs, H, I,
                  cnt_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, n_rows, s_res, eps,
                  TOP_K: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, BLOCK_H: tl.constexpr,
                  COMBINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSUB: tl.constexpr,
                  PTX: tl.constexpr, L2PF: tl.constexpr = False, PDL: tl.constexpr = False,
                  TAIL_G: tl.constexpr = 1, TAIL_HOLD: tl.constexpr = False):
    """y[pair, n] = (act[row] @ W2[e, n]^T + b2[e, n]) * the pair's router weight, for BLOCK_N rows n;
    act: _w1_rs_kernel's permuted, scaled rows. L2PF: as _w1_rs_kernel's. TAIL_G, TAIL_HOLD: as
    kernels.moe._w2_kernel's."""
    _pdl_enter(PDL)
    t = tl.program_id(0)
    e = tl.load(tile_e_ptr + t).to(tl.int64)
    if e < 0:
        if COMBINE:  # a spare tile takes its ticket too: the launch's last program combines
            _combine_tail(cnt_ptr, y_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, n_rows, H, s_res, eps, TOP_K,
                          HAS_RES, NORM, BLOCK_H, 1, TAIL_G, TAIL_HOLD)
        return
    if L2PF:
        n0 = e * H + tl.program_id(1) * BLOCK_N
        _prefetch_rows(wb_ptr, ws_ptr, tile_e_ptr, t, e, n0, tl.minimum(n0 + BLOCK_N, (e + 1) * H), I, PTX)
    rows, pair, rvalid = _tile_rows(sorted_ptr, n_pairs, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = e * H + tl.minimum(n, H - 1).to(tl.int64)
    n_blk = I // 32
    acc = _rows_mma(tl.zeros((BLOCK_N, BLOCK_M), tl.float32), wb_ptr + row * (I // 2), ws_ptr + row * n_blk,
                    act_ptr + rows * I, n_blk, NSUB, PTX)
    acc += tl.load(b_ptr + row).to(tl.float32)[:, None]
    acc = acc * tl.load(rw_ptr + pair, mask=rvalid, other=0.0)[None, :]
    out = y_ptr + pair.to(tl.int64)[None, :] * H + n[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rvalid[None, :] & (n < H)[:, None])
    if COMBINE:
        _combine_tail(cnt_ptr, y_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, n_rows, H, s_res, eps, TOP_K,
                      HAS_RES, NORM, BLOCK_H, 1, TAIL_G, TAIL_HOLD)


# kernels.moe_combine's tail and kernels.moe_gemv's prefetch, jitted again into this module's globals (where its
# kernels look)
_combine_row, _combine_tail = (getattr(f, "fn", f) for f in (combine_kernels._combine_row,
                                                          combine_kernels._combine_tail))
_prefetch_rows = getattr(gemv_kernels._prefetch_rows, "fn", gemv_kernels._prefetch_rows)
_KERNELS = ("_pdl_enter", "_l2_prefetch", "_prefetch_rows", "_combine_row", "_combine_tail", "_act_pos", "_tile",
            "_tile_rows", "_settle", "_e2m1", "_cat_k", "_block", "_rows_mma", "_xperm_kernel", "_w1_rs_kernel",
            "_w2_rs_kernel")
_NO_SPECIALIZE = {"_w1_rs_kernel": ("n_pairs",), "_w2_rs_kernel": ("n_pairs", "n_rows", "s_res")}


def multiplier_bits(s: int) -> int:
    """_tile's bf16 multiplier for E8M0 scale s, as bits (what the PTX's $5/$6 halves hold)."""
    return ((min(s, S_MAX) + 126 - _XC) << 7) & 0xFFFF
