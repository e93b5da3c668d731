"""gpt-oss MoE over MXFP4 experts: route, align, two grouped matmuls, combine.

1. `route`: top-k of the router logits, softmax over the k picked (as MoE.route).
2. `align` (kernels.moe_gate, and there for decode steps the whole gate in one launch: the block's
   add and MLP norm, the router, routing and align; `moe_block_mxfp4`): (token, slot) pairs sorted by
   local expert, each expert's run padded
   to a multiple of BLOCK_M, and tile -> expert. The tile count has a static
   bound (pairs/BLOCK_M + experts hit), so nothing here reads a value back to
   the host and a decode step stays capturable in a CUDA graph.
3. `_w1_kernel`: per (tile, column block) gathers the tile's token rows of x,
   multiplies by W1[e]^T decoded from MXFP4 in registers, adds b1 and applies
   the clamped SwiGLU to each (gate 2j, linear 2j+1) row pair of W1, writing
   activation column j. W1 is read once per tile, never dequantised to memory (but under DQ, below).
   On a GPU with 16-bit activations the tiles go to tl.dot_scaled as stored
   (E2M1 bytes, E8M0 scales; 2x the kernels' own decode on an H200, see
   BENCHMARKS.md "GPU"); the own decode (`_mx_tile`) is the fp32 path. A config
   with GEMV runs both matmuls as kernels.moe_gemv's single-pair tiles instead (16-bit activations); one
   with DQ runs these tiles over weights decoded once a step to bf16 (kernels.moe_dq; prefill-sized steps).
4. `_w2_kernel`: activations @ W2[e]^T + b2, times the pair's router weight.
5. `_combine_kernel`: sums each token's k pair rows (absent experts skipped), and adds the
   residual stream when given (the block's `x + moe(h)`, same rounding, one launch fewer); with
   `norm` it also writes the next RMSNorm of that sum (the next block's attention norm, or the
   final one), as kernels.rmsnorm computes it: one launch fewer per layer again.

Which path and tiles a step takes (measured configs, defaults, forced paths) is kernels.moe_configs.

Layouts are the checkpoint's: w1_blocks [E, 2I, H/32, 16], w1_scales [E, 2I, H/32],
w2_blocks [E, H, I/32, 16], w2_scales [E, H, I/32], b1 [E, 2I], b2 [E, H], where
E counts this rank's experts and `global_to_local` (-1 = not here) maps router ids.
"""

import torch
import torch.nn.functional as F

from models import mxfp4
from models.layers import swiglu

from . import moe_combine as combine_kernels
from . import moe_dq as dq_kernels
from . import moe_gemv as gemv_kernels
from . import moe_rs as rs_kernels
from .moe_configs import Plan, k_split, launch_args, step_plan
from .moe_gate import GATE_MAX_ROWS, X16_IN_ALIGN, align, align_triton, fused_rows, gate_triton
from ._triton import interpreting, jit_module, launch, tickets, tl, triton
from .pdl import PREFETCH_PTX  # noqa: F401 (read as a global by _l2_prefetch where kernels.aot compiles it)
from .pdl import enter as _pdl_enter
from .pdl import l2_prefetch as _l2_prefetch  # noqa: F401 (a global of _prefetch_rows, re-jitted here)


def route(logits: torch.Tensor, top_k: int, dtype: torch.dtype | None = None):
    """Same ops as models.layers.MoE.route after its linear layer."""
    top, idx = torch.topk(logits, top_k, dim=-1)
    return idx, torch.softmax(top.float(), dim=-1).to(dtype or logits.dtype)


def moe_reference(x, idx, weights, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                  global_to_local=None, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """MoE.compute's arithmetic (same op order), as a function of the packed weights.

    Kept separate from the module so MoE.compute may call the dispatcher,
    which calls this on CPU, without recursing."""
    top_k = idx.shape[1]
    local = (global_to_local[idx] if global_to_local is not None else idx).flatten()
    keep = (local >= 0).nonzero().squeeze(1)
    tok, lid = keep // top_k, local[keep]
    rows = x[tok]
    y = torch.empty_like(rows)
    for j in torch.unique(lid).tolist():
        sel = (lid == j).nonzero().squeeze(1)
        w1 = mxfp4.decode(w1_blocks[j], w1_scales[j], x.dtype)
        w2 = mxfp4.decode(w2_blocks[j], w2_scales[j], x.dtype)
        h = swiglu(F.linear(rows[sel], w1, b1[j]), limit, alpha)
        y[sel] = F.linear(h, w2, b2[j])
    return torch.zeros_like(x).index_add_(0, tok, y * weights.flatten()[keep, None])


# ---------------------------------------------------------------- Triton kernels

def _dot(a, w, acc, DOT_BF16: tl.constexpr):
    # decoded FP4 x power-of-two scales are exact in bf16, so bf16 tensor cores lose nothing on w (fp16
    # activations do lose 3 bits, as tl.dot_scaled's do). The interpreter runs this branch too, its bf16
    # dot being the GPU's (kernels._interp); only the callers' _settle (inline PTX) is compiled-only
    if DOT_BF16:
        return tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16), acc)
    return tl.dot(a, w, acc, input_precision="ieee")


def _mx_tile(wb_ptr, ws_ptr, rows, rmask, kbyte, kmask, ROW_BYTES):
    """Transposed weight tile [HALF_K, BN] of rows `rows` as (even-k values, odd-k values)."""
    msk = kmask[:, None] & rmask[None, :]
    b = tl.load(wb_ptr + rows[None, :] * ROW_BYTES + kbyte[:, None], mask=msk, other=0).to(tl.int32)
    s = tl.load(ws_ptr + rows[None, :] * (ROW_BYTES // 16) + (kbyte // 16)[:, None], mask=msk, other=0)
    scale = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2**(s-127)
    return _fp4(b & 15, scale), _fp4(b >> 4, scale)


def _mx_scales(ws_ptr, rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    """E8M0 scales [BN, BLOCK_K/32] of rows `rows` from k0 (past K: masked, 2**0)."""
    kblk = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    return tl.load(ws_ptr + rows[:, None] * (K // 32) + kblk[None, :],
                   mask=rmask[:, None] & (kblk < K // 32)[None, :], other=127)


def _mx_dot(a_ptrs, amask, wb_ptr, s, rows, rmask, k0, K, acc, BLOCK_K: tl.constexpr):
    """acc + a[:, k0:k0+BLOCK_K] @ W[rows, k0:k0+BLOCK_K]^T through tl.dot_scaled: the packed E2M1
    bytes [BLOCK_K/2, BN] and their scales s (_mx_scales) go in as stored; Triton upcasts in registers.
    The callers load s one step ahead: the bytes and activations are pipelined by Triton (async
    copies), the scales are not, and a plain load each step stalled every step on its latency."""
    kbyte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    w = tl.load(wb_ptr + rows[None, :] * (K // 2) + kbyte[:, None],
                mask=(kbyte < K // 2)[:, None] & rmask[None, :], other=0)
    a = tl.load(a_ptrs, mask=amask, other=0.0).to(tl.bfloat16)
    return tl.dot_scaled(a, None, "bf16", w, s, "e2m1", acc)


def _dq_dot(a, w_ptrs, wmask, acc, DOT_BF16: tl.constexpr):
    """acc + a @ w, w [BLOCK_K, BN] a tile of the bf16 scratch kernels.moe_dq decoded (exact in bf16)."""
    w = tl.load(w_ptrs, mask=wmask, other=0.0)
    if DOT_BF16:
        return tl.dot(a.to(tl.bfloat16), w, acc)
    return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")


def _split_sums(acc_g, acc_l, part_ptr, tk_ptr, rows, j, I, SPLIT_K: tl.constexpr):
    """W1 split over K (grid axis 2): store this split's partial sums [rows, (gate, linear), j] in slab s of
    part_ptr; the tile's last split to finish (an acq_rel ticket, kernels._triton.tickets) gets their sums
    in split order (the same bits whichever came last) and True, the others zeros and False."""
    base = part_ptr + rows[:, None] * (2 * I) + j[None, :]
    slab = (tl.num_programs(0) * acc_g.shape[0]).to(tl.int64) * (2 * I)
    jm = (j < I)[None, :]
    tl.store(base + tl.program_id(2) * slab, acc_g, mask=jm)
    tl.store(base + tl.program_id(2) * slab + I, acc_l, mask=jm)
    tl.debug_barrier()  # every thread's partials stored before the ticket releases them
    cnt = tk_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    last = tl.atomic_add(cnt, 1, sem="acq_rel") == SPLIT_K - 1
    g = tl.zeros(acc_g.shape, tl.float32)
    lin = tl.zeros(acc_l.shape, tl.float32)
    if last:
        for sp in tl.static_range(SPLIT_K):  # .cg: the other splits' stores are in L2, not in this SM's L1
            g += tl.load(base + sp * slab, mask=jm, other=0.0, cache_modifier=".cg")
            lin += tl.load(base + sp * slab + I, mask=jm, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(cnt, 0)
    return g, lin, last


def _swiglu_store(acc_g, acc_l, b_ptr, e, I, gate_rows, jvalid, act_ptr, rows, rvalid, j, LIMIT: tl.constexpr,
                  ALPHA: tl.constexpr):
    gate = acc_g + tl.load(b_ptr + e * 2 * I + gate_rows, mask=jvalid, other=0.0).to(tl.float32)[None, :]
    lin = acc_l + tl.load(b_ptr + e * 2 * I + gate_rows + 1, mask=jvalid, other=0.0).to(tl.float32)[None, :]
    gate = tl.minimum(gate, LIMIT)
    lin = tl.minimum(tl.maximum(lin, -LIMIT), LIMIT)
    h = gate * tl.sigmoid(ALPHA * gate) * (lin + 1.0)
    out = act_ptr + rows[:, None] * I + j[None, :]
    tl.store(out, h.to(act_ptr.dtype.element_ty), mask=rvalid[:, None] & jvalid[None, :])


def _w1_kernel(x_ptr, wb_ptr, ws_ptr, b_ptr, act_ptr, sorted_ptr, tile_e_ptr, n_pairs, H, I, stride_x,
               part_ptr, tk_ptr, K_SPLIT,
               TOP_K: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_BF16: tl.constexpr, SCALED: tl.constexpr,
               SPLIT_K: tl.constexpr, L2PF: tl.constexpr = False, PTX: tl.constexpr = False,
               DQ: tl.constexpr = False, PDL: tl.constexpr = False):
    """SPLIT_K > 1: program (tile, j block, s) sums K[s * K_SPLIT:][:K_SPLIT] (a whole number of K steps,
    the last shorter or empty), the tile's last split finishes (_split_sums): more programs for a
    decode step's few tiles. L2PF (on a GPU, PTX): the program's rows bulk-prefetched first.
    DQ: wb_ptr is W1 decoded to bf16 [E, 2I, H] (kernels.moe_dq), ws_ptr unused."""
    _pdl_enter(PDL)
    t = tl.program_id(0)
    e = tl.load(tile_e_ptr + t).to(tl.int64)
    if e < 0:
        return
    if L2PF:
        r0 = e * (2 * I) + tl.program_id(1) * 2 * BLOCK_N
        _prefetch_rows(wb_ptr, ws_ptr, tile_e_ptr, t, e, r0, tl.minimum(r0 + 2 * BLOCK_N, (e + 1) * (2 * I)), H, PTX)
    rows, pair, rvalid = _tile_rows(sorted_ptr, n_pairs, BLOCK_M)
    tok = (pair // TOP_K).to(tl.int64)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    jvalid = j < I
    gate_rows = (2 * j).to(tl.int64)
    wb = wb_ptr + e * (2 * I) * (H // 2)
    ws = ws_ptr + e * (2 * I) * (H // 32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_l = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_lo = tl.program_id(2) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, H)
    if DQ:
        wq = wb_ptr + e * (2 * I) * H
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < H
            a = tl.load(x_ptr + tok[:, None] * stride_x + k[None, :], mask=rvalid[:, None] & kmask[None, :],
                        other=0.0)
            wmask = kmask[:, None] & jvalid[None, :]
            acc_g = _dq_dot(a, wq + gate_rows[None, :] * H + k[:, None], wmask, acc_g, DOT_BF16)
            acc_l = _dq_dot(a, wq + (gate_rows + 1)[None, :] * H + k[:, None], wmask, acc_l, DOT_BF16)
            if DOT_BF16 and PTX:
                acc_g, acc_l = _settle(acc_g), _settle(acc_l)
    elif SCALED:
        sg = _mx_scales(ws, gate_rows, jvalid, k_lo, H, BLOCK_K)
        sl = _mx_scales(ws, gate_rows + 1, jvalid, k_lo, H, BLOCK_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            sg_next = _mx_scales(ws, gate_rows, jvalid, k0 + BLOCK_K, H, BLOCK_K)
            sl_next = _mx_scales(ws, gate_rows + 1, jvalid, k0 + BLOCK_K, H, BLOCK_K)
            k = k0 + tl.arange(0, BLOCK_K)
            a_ptrs = x_ptr + tok[:, None] * stride_x + k[None, :]
            amask = rvalid[:, None] & (k < H)[None, :]
            acc_g = _mx_dot(a_ptrs, amask, wb, sg, gate_rows, jvalid, k0, H, acc_g, BLOCK_K)
            acc_l = _mx_dot(a_ptrs, amask, wb, sl, gate_rows + 1, jvalid, k0, H, acc_l, BLOCK_K)
            if DOT_BF16 and PTX:  # the step's MMAs finish in the step (moe_rs._settle: else ptxas serializes them)
                acc_g, acc_l = _settle(acc_g), _settle(acc_l)
            sg, sl = sg_next, sl_next
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kbyte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            kmask = kbyte < H // 2
            amask = rvalid[:, None] & kmask[None, :]
            a_ptr = x_ptr + tok[:, None] * stride_x + 2 * kbyte[None, :]
            a_ev = tl.load(a_ptr, mask=amask, other=0.0).to(tl.float32)   # low nibbles are even k
            a_od = tl.load(a_ptr + 1, mask=amask, other=0.0).to(tl.float32)
            g_lo, g_hi = _mx_tile(wb, ws, gate_rows, jvalid, kbyte, kmask, H // 2)
            acc_g = _dot(a_od, g_hi, _dot(a_ev, g_lo, acc_g, DOT_BF16), DOT_BF16)
            l_lo, l_hi = _mx_tile(wb, ws, gate_rows + 1, jvalid, kbyte, kmask, H // 2)
            acc_l = _dot(a_od, l_hi, _dot(a_ev, l_lo, acc_l, DOT_BF16), DOT_BF16)
    if SPLIT_K > 1:
        acc_g, acc_l, last = _split_sums(acc_g, acc_l, part_ptr, tk_ptr, rows, j, I, SPLIT_K)
        if last:
            _swiglu_store(acc_g, acc_l, b_ptr, e, I, gate_rows, jvalid, act_ptr, rows, rvalid, j, LIMIT, ALPHA)
    else:
        _swiglu_store(acc_g, acc_l, b_ptr, e, I, gate_rows, jvalid, act_ptr, rows, rvalid, j, LIMIT, ALPHA)


def _w2_kernel(act_ptr, wb_ptr, ws_ptr, b_ptr, rw_ptr, y_ptr, sorted_ptr, tile_e_ptr, n_pairs, H, I,
               cnt_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, n_rows, s_res, eps, K_SPLIT,
               TOP_K: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, BLOCK_H: tl.constexpr,
               COMBINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_BF16: tl.constexpr, SCALED: tl.constexpr, SPLIT_K: tl.constexpr, L2PF: tl.constexpr = False,
               PTX: tl.constexpr = False, DQ: tl.constexpr = False, PDL: tl.constexpr = False,
               TAIL_G: tl.constexpr = 1, TAIL_HOLD: tl.constexpr = False):
    """SPLIT_K > 1: program (tile, n block, s) sums K[s * K_SPLIT:][:K_SPLIT] into slab s of y (fp32; the bias
    in slab 0), and the combine sums the slabs: no launch or ticket of its own. L2PF: as _w1_kernel's.
    TAIL_G, TAIL_HOLD: with COMBINE, the combine tail's chunks a pass and whether they hold the row
    (kernels.moe_combine._combine_row's G and HOLD).
    DQ: wb_ptr is W2 decoded to bf16 [E, H, I] (kernels.moe_dq), ws_ptr unused."""
    _pdl_enter(PDL)
    t = tl.program_id(0)
    e = tl.load(tile_e_ptr + t).to(tl.int64)
    if e < 0:
        if COMBINE:  # a spare tile takes its ticket too: the launch's last program combines
            _combine_tail(cnt_ptr, y_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, n_rows, H, s_res, eps, TOP_K,
                          HAS_RES, NORM, BLOCK_H, SPLIT_K, TAIL_G, TAIL_HOLD)
        return
    if L2PF:
        n0 = e * H + tl.program_id(1) * BLOCK_N
        _prefetch_rows(wb_ptr, ws_ptr, tile_e_ptr, t, e, n0, tl.minimum(n0 + BLOCK_N, (e + 1) * H), I, PTX)
    rows, pair, rvalid = _tile_rows(sorted_ptr, n_pairs, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nvalid = n < H
    wb = wb_ptr + e * H * (I // 2)
    ws = ws_ptr + e * H * (I // 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_lo = tl.program_id(2) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, I)
    if DQ:
        wq = wb_ptr + e * H * I
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < I
            a = tl.load(act_ptr + rows[:, None] * I + k[None, :], mask=rvalid[:, None] & kmask[None, :], other=0.0)
            acc = _dq_dot(a, wq + n.to(tl.int64)[None, :] * I + k[:, None], kmask[:, None] & nvalid[None, :], acc,
                          DOT_BF16)
            if DOT_BF16 and PTX:
                acc = _settle(acc)
    elif SCALED:
        s = _mx_scales(ws, n.to(tl.int64), nvalid, k_lo, I, BLOCK_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            s_next = _mx_scales(ws, n.to(tl.int64), nvalid, k0 + BLOCK_K, I, BLOCK_K)
            k = k0 + tl.arange(0, BLOCK_K)
            acc = _mx_dot(act_ptr + rows[:, None] * I + k[None, :], rvalid[:, None] & (k < I)[None, :],
                          wb, s, n.to(tl.int64), nvalid, k0, I, acc, BLOCK_K)
            if DOT_BF16 and PTX:
                acc = _settle(acc)
            s = s_next
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kbyte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            kmask = kbyte < I // 2
            amask = rvalid[:, None] & kmask[None, :]
            a_ptr = act_ptr + rows[:, None] * I + 2 * kbyte[None, :]
            a_ev = tl.load(a_ptr, mask=amask, other=0.0).to(tl.float32)
            a_od = tl.load(a_ptr + 1, mask=amask, other=0.0).to(tl.float32)
            w_lo, w_hi = _mx_tile(wb, ws, n.to(tl.int64), nvalid, kbyte, kmask, I // 2)
            acc = _dot(a_od, w_hi, _dot(a_ev, w_lo, acc, DOT_BF16), DOT_BF16)
    b_lim = tl.where(tl.program_id(2) == 0, H, 0)  # the bias joins one slab
    acc += tl.load(b_ptr + e * H + n, mask=n < b_lim, other=0.0).to(tl.float32)[None, :]
    rw = tl.load(rw_ptr + pair, mask=rvalid, other=0.0)
    acc = acc * rw[:, None]
    out = y_ptr + (tl.program_id(2) * n_pairs + pair).to(tl.int64)[:, None] * H + n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rvalid[:, None] & nvalid[None, :])
    if COMBINE:
        _combine_tail(cnt_ptr, y_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, n_rows, H, s_res, eps, TOP_K,
                      HAS_RES, NORM, BLOCK_H, SPLIT_K, TAIL_G, TAIL_HOLD)


# shared with kernels.moe_rs, jitted again into this module's globals (where its kernels look)
_tile_rows = getattr(rs_kernels._tile_rows, "fn", rs_kernels._tile_rows)
_combine_row, _combine_tail, _combine_kernel = (getattr(f, "fn", f) for f in (
    combine_kernels._combine_row, combine_kernels._combine_tail, combine_kernels._combine_kernel))
_settle = getattr(rs_kernels._settle, "fn", rs_kernels._settle)
_fp4 = getattr(dq_kernels._fp4, "fn", dq_kernels._fp4)
_prefetch_rows = getattr(gemv_kernels._prefetch_rows, "fn", gemv_kernels._prefetch_rows)
_KERNELS = ("_pdl_enter", "_l2_prefetch", "_prefetch_rows", "_tile_rows", "_settle", "_fp4", "_dot", "_mx_tile",
            "_mx_scales", "_mx_dot", "_dq_dot", "_split_sums", "_swiglu_store", "_w1_kernel", "_w2_kernel",
            "_combine_row", "_combine_tail", "_combine_kernel")
_NO_SPECIALIZE = {"_w1_kernel": ("n_pairs",), "_w2_kernel": ("n_pairs", "n_rows", "s_res"),
                  **combine_kernels._NO_SPECIALIZE}


def _jit_all() -> None:
    jit_module(globals(), _KERNELS)  # and, through jit_module, the modules its aliased helpers come from
    jit_module(vars(gemv_kernels), gemv_kernels._KERNELS)
    jit_module(vars(rs_kernels), rs_kernels._KERNELS)
    jit_module(vars(dq_kernels), dq_kernels._KERNELS)


def moe_mxfp4(x: torch.Tensor, routing, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, *,
              top_k: int = 4, global_to_local: torch.Tensor | None = None, limit: float = 7.0,
              alpha: float = 1.702, residual: torch.Tensor | None = None,
              norm: tuple[torch.Tensor, float] | None = None, scaled: bool | None = None):
    """x [N, H]; routing = router logits [N, E_global] or (idx [N, k], weights [N, k]) -> [N, H] in x.dtype;
    residual [N, H]: returns residual + the MoE output instead; norm (weight [H], eps), with a residual:
    returns (that sum s, rmsnorm(s)), the pair kernels.rmsnorm would give for the next norm.
    scaled: the expert matmuls through tl.dot_scaled (default: on a GPU with 16-bit activations)
    rather than the kernels' own E2M1 decode; the latter stays as the fp32 path and for comparison."""
    if norm is not None and residual is None:
        raise ValueError("norm is fused after the residual add: pass residual too")
    idx, weights = route(routing, top_k, x.dtype) if isinstance(routing, torch.Tensor) else routing
    N = x.shape[0]
    E, I = w1_blocks.shape[0], w1_blocks.shape[1] // 2
    k = idx.shape[1]
    if N == 0:
        out = torch.zeros_like(x) if residual is None else residual.clone()
        return out if norm is None else (out, torch.empty_like(out))
    _jit_all()
    plan = step_plan(x, N, E, I, k, scaled)
    x = x.contiguous()
    in_align = plan.gemv and N <= X16_IN_ALIGN  # the align program also makes the gemv tiles' activations
    x16 = torch.empty_like(x, dtype=torch.float16) if in_align else None
    aligned = align_triton(idx, global_to_local, E, plan.block_m, *((x, x16) if in_align else ()))
    return _experts(x, x16 if in_align else None, weights.reshape(-1).float().contiguous(), aligned, plan, k,
                    w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, limit, alpha, residual, norm)


def moe_block_mxfp4(o: torch.Tensor, residual: torch.Tensor, mlp_norm: tuple[torch.Tensor, float], router_w,
                    router_b, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, *, top_k: int = 4,
                    global_to_local: torch.Tensor | None = None, load: torch.Tensor | None = None,
                    token_mask: torch.Tensor | None = None, drop_masked: bool = False, limit: float = 7.0,
                    alpha: float = 1.702, norm: tuple[torch.Tensor, float] | None = None):
    """A block's second half from the attention output o [N, H] (N <= GATE_MAX_ROWS) and the stream
    `residual`: x = o + residual, h = rmsnorm(x) (mlp_norm: weight, eps), routed by router_w/router_b
    (load, token_mask, drop_masked as kernels.route), then the experts -> x + moe(h), or with `norm`
    (x + moe(h), its rmsnorm). The add, norm, router, routing and align are one launch (kernels.moe_gate)."""
    N = o.shape[0]
    E, I = w1_blocks.shape[0], w1_blocks.shape[1] // 2
    _jit_all()
    plan = step_plan(o, N, E, I, top_k, None)
    g = gate_triton(o, residual, mlp_norm[0], mlp_norm[1], router_w, router_b, top_k, E, plan.block_m,
                    global_to_local, load, token_mask, drop_masked, x16=plan.gemv and N <= X16_IN_ALIGN)
    return _experts(g.h, g.x16, g.weights, g.aligned, plan, top_k, w1_blocks, w1_scales, b1, w2_blocks, w2_scales,
                    b2, limit, alpha, g.x, norm)


def _experts(x, x16, rw, aligned, plan: Plan, k: int, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
             limit, alpha, residual, norm):
    """W1, W2 and the combine over aligned pairs; rw [N*k] fp32 router weights; x16: the gemv tiles' input
    where the align (or the gate) program made it, else None (a launch of _x16_kernel makes it here)."""
    N, H = x.shape
    I = w1_blocks.shape[1] // 2
    interp = interpreting()
    sorted_ids, tile_expert, valid = aligned
    bm, gemv, rs = plan.block_m, plan.gemv, plan.rs
    if gemv and x16 is None:
        x16 = torch.empty_like(x, dtype=torch.float16)
        launch(gemv_kernels._x16_kernel, (N, triton.cdiv(H, 1024)), x, x16, H, x.stride(0), BLOCK=1024)
    T = tile_expert.numel()
    act = torch.empty(T * bm, I, dtype=torch.float16 if gemv else torch.bfloat16 if rs else x.dtype,
                      device=x.device)
    # the MMA tiles may split K (kernels.tune's SPLIT_K): W1's last split finishes, W2's slabs sum in the combine
    s1, s2 = ((1, 1) if gemv or rs else (plan.cfg1.get("SPLIT_K", 1), plan.cfg2.get("SPLIT_K", 1)))
    # the gemv tiles and W2's slabs hand the combine fp32 rows (a few per step): a token's sum rounds once
    y = torch.empty(s2 * N * k, H, dtype=torch.float32 if gemv or s2 > 1 else x.dtype, device=x.device)
    meta, opts = launch_args(plan.cfg1)
    grid1 = (T, triton.cdiv(I, meta["BLOCK_N"]))
    lut = (gemv_kernels.lut(x.device),) if gemv else ()  # the gemv tiles' table words (an argument of theirs only)
    if rs:
        xp = torch.empty(N, H, dtype=torch.bfloat16, device=x.device)
        launch(rs_kernels._xperm_kernel, (N, triton.cdiv(H, 1024)), x, xp, H, x.stride(0), BLOCK=1024)
        launch(rs_kernels._w1_rs_kernel, grid1, xp, w1_blocks, w1_scales, b1, act, sorted_ids, tile_expert,
               N * k, H, I, TOP_K=k, LIMIT=float(limit), ALPHA=float(alpha), PTX=not interp, **meta, **opts)
    elif gemv:
        launch(gemv_kernels._w1_gemv_kernel, grid1, x16, w1_blocks, w1_scales, b1, act, sorted_ids, tile_expert,
               *lut, N * k, H, I, TOP_K=k, LIMIT=float(limit), ALPHA=float(alpha), PTX=not interp, **meta, **opts)
    else:
        part = torch.empty(s1, T * bm, 2 * I, dtype=torch.float32, device=x.device) if s1 > 1 else rw
        # DQ: W1 decoded once for the step into a bf16 scratch, which W2's decode reuses after W1 ran
        w1b, w1s = (dq_kernels.dequant(w1_blocks, w1_scales),) * 2 if plan.dq else (w1_blocks, w1_scales)
        launch(_w1_kernel, (*grid1, s1), x, w1b, w1s, b1, act, sorted_ids, tile_expert, N * k, H, I,
               x.stride(0), part, tickets(x.device, T * grid1[1] if s1 > 1 else 1), k_split(H, s1, meta["BLOCK_K"]),
               TOP_K=k, LIMIT=float(limit), ALPHA=float(alpha), DOT_BF16=plan.dot_bf16, SCALED=plan.scaled,
               SPLIT_K=s1, PTX=not interp, DQ=plan.dq, **meta, **opts)
        if plan.dq:
            w2_blocks = w2_scales = dq_kernels.dequant(w2_blocks, w2_scales, out=w1b)
    out = torch.empty_like(x)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    res = residual if residual is None or residual.stride(-1) == 1 else residual.contiguous()
    normed = torch.empty_like(x) if norm is not None else out
    # batch 1 or 2: the combine is the W2 launch's tail (kernels.moe_combine)
    tail = N <= combine_kernels.TAIL_MAX_ROWS and fused_rows(N)
    # a combine program takes a whole row with the norm, else 1024 columns; its squares add up CHUNK columns at a
    # time. Its own launch holds the row in one pass (G chunks); the tail, one of W2's programs, takes the chunks
    # one at a time (it must not inflate W2's registers) but where W2's config says otherwise at one token
    # (TAIL_G, kernels.tune): a held row took the tuned 120b gemv W2 from 56 registers to 168 (kernels.aot), 3
    # programs an SM, which holds batch 1's 360 but would split batch 2's 720 into two waves
    bh = triton.next_power_of_2(H) if norm is not None else min(1024, triton.next_power_of_2(H))
    chunk = min(combine_kernels.CHUNK, bh)
    whole = bh // chunk  # the chunks G that hold the row (with the norm: combine_kernels.row_chunks(H))
    tail_g = min(triton.next_power_of_2(plan.cfg2.get("TAIL_G", 1)), whole) if N == 1 else 1
    combine = (valid, x if res is None else res, out, norm[0] if norm is not None else out, normed, N,
               x.stride(0) if res is None else res.stride(0), float(norm[1]) if norm is not None else 0.0)
    flags = dict(TOP_K=k, HAS_RES=res is not None, NORM=norm is not None)
    # without the tail W2 ignores the combine's arguments: fixed stand-ins, so they add no compilations
    w2_flags = (dict(flags, BLOCK_H=chunk, TAIL_G=tail_g, TAIL_HOLD=tail_g == whole) if tail
                else dict(TOP_K=1, HAS_RES=False, NORM=False, BLOCK_H=16, TAIL_G=1, TAIL_HOLD=False))
    w2_combine = combine if tail else (valid, y, y, y, y, N, 0, 0.0)
    w2 = gemv_kernels._w2_gemv_kernel if gemv else rs_kernels._w2_rs_kernel if rs else _w2_kernel
    meta, opts = launch_args(plan.cfg2)
    own = dict(PTX=not interp, **({} if gemv or rs else dict(
        DOT_BF16=plan.dot_bf16, SCALED=plan.scaled, SPLIT_K=s2, K_SPLIT=k_split(I, s2, meta["BLOCK_K"]), DQ=plan.dq)))
    launch(w2, (T, triton.cdiv(H, meta["BLOCK_N"]), s2), act, w2_blocks, w2_scales, b2, rw, y, sorted_ids,
           tile_expert, *lut, N * k, H, I, tickets(x.device, 1), *w2_combine, COMBINE=tail, **w2_flags, **own,
           **meta, **opts)
    if not tail:
        opts = dict(num_warps=8) if norm is not None and H >= 2048 and not interp else {}
        launch(_combine_kernel, (N, triton.cdiv(H, bh)), y, *combine[:6], H, *combine[6:], **flags, BLOCK_H=bh,
               SPLIT=s2, BLOCK_C=chunk if norm is not None else bh, G=whole if norm is not None else 1,
               HOLD=norm is not None, **opts)
    return out if norm is None else (out, normed)


__all__ = ["GATE_MAX_ROWS", "align", "align_triton", "moe_block_mxfp4", "moe_mxfp4", "moe_reference", "route"]
