"""The MoE's combine: each token's k pair rows summed (absent experts skipped), plus the residual stream,
plus the next RMSNorm of that sum; as a launch of its own, or as the tail of the W2 launch.

`_combine_row` is one token's combine (kernels.moe's module docstring, step 5). `_combine_kernel` runs
it for a step's rows. Up to TAIL_MAX_ROWS rows (and where kernels.moe_gate.fused_rows allows) each W2
kernel (kernels.moe, .moe_gemv, .moe_rs) ends instead with `_combine_tail`: every W2 program, spare
tiles included, takes a ticket from an acq_rel atomic counter (kernels._triton.tickets) once its rows
are stored, and the launch's last program combines every token, reading the pair rows the others wrote
past its L1 (.cg), then resets the counter for the next launch or graph replay. At batch 1 on an H200
the combine was a launch of 3.1 us a layer (BENCHMARKS.md "GPU"); the tail is one program's pass over
k + 1 rows per token, a few L2 round trips each, one token after another: past a couple of tokens the
combine's own launch, a program per token, is the shorter. The sums are the same ops in the same order
either way, so the two forms agree bit for bit. Where the MMA W2 splits K, y holds a slab per split and
both forms sum the slabs too, in split order.
"""

from ._triton import tl
from .pdl import enter as _pdl_enter

TAIL_MAX_ROWS = 2
# columns a combine row takes at a time (_combine_row; a normed row's sum of squares adds up in this order).
# 1024 at gpt-oss's 2880 columns: 3 chunks, each pass a few L2 round trips for the tail's one program on the
# step's critical path, at 48-52 registers for the gemv W2 (512: 6 chunks at 40; a whole row: 168)
CHUNK = 1024


def row_chunks(H: int) -> int:
    """CHUNK-column chunks of a normed row (its next power of 2): the G that holds it in one pass."""
    bh = 1 << (H - 1).bit_length()
    return bh // min(CHUNK, bh)


def _combine_row(y_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, m, c0, c1, n_rows, H, s_res, eps,
                 TOP_K: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, L2_ONLY: tl.constexpr,
                 SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, G: tl.constexpr = 1, HOLD: tl.constexpr = False):
    """Token m over columns [c0, c1) (all of H with NORM), G chunks of BLOCK_C a pass: a W2 kernel's tail
    holds a whole row only where the tuner chose it (it took the tuned 120b gemv W2 from 56 registers a
    thread to 168; kernels.moe's launcher says when that matters). HOLD, the launcher's promise that one
    pass covers the row: the norm is taken from registers, one round of loads, not a second pass over
    the stored row (a constexpr: the branch alone cost the gemv W2 8 registers). The squares add up
    chunk by chunk either way, so every G gives the same bits. L2_ONLY: y was written by other programs
    of this launch. SPLIT: y holds that many slabs of n_rows * TOP_K pair rows (W2 split over K), summed
    in order."""
    sq = tl.zeros((BLOCK_C,), tl.float32)
    lane = tl.arange(0, G)[:, None]
    chunk_cols = lane * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    for c in range(c0, c1, G * BLOCK_C):
        cols = c + chunk_cols
        acc = tl.zeros((G, BLOCK_C), tl.float32)
        for sp in range(0, SPLIT):  # a loop, not unrolled: SPLIT x TOP_K rows in flight at once would spill
            for s in tl.static_range(TOP_K):
                # rows of absent experts were never written: an empty column range skips them
                lim = tl.where(tl.load(valid_ptr + m * TOP_K + s) != 0, c1, 0)
                row = y_ptr + ((sp * n_rows + m) * TOP_K + s) * H + cols
                if L2_ONLY:
                    acc += tl.load(row, mask=cols < lim, other=0.0, cache_modifier=".cg").to(tl.float32)
                else:
                    acc += tl.load(row, mask=cols < lim, other=0.0).to(tl.float32)
        out = acc.to(out_ptr.dtype.element_ty)
        if HAS_RES:  # round the MoE output first, as the unfused `x + moe(h)` does
            out = (tl.load(res_ptr + m * s_res + cols, mask=cols < c1, other=0.0).to(tl.float32)
                   + out.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + m * H + cols, out, mask=cols < c1)
        if NORM:  # of the stored, rounded sum (0 past c1)
            xf = out.to(tl.float32)
            for g in tl.static_range(G):  # chunk by chunk: a row picked out by a sum with zeros is exact
                x = tl.sum(tl.where(lane == g, xf, 0.0), axis=0)
                sq = tl.fma(x, x, sq)
            if HOLD:
                inv = tl.rsqrt(tl.sum(sq, 0) / H + eps)
                w = tl.load(nw_ptr + cols, mask=cols < c1, other=0.0).to(tl.float32)
                tl.store(h_ptr + m * H + cols, (w * (xf * inv)).to(h_ptr.dtype.element_ty), mask=cols < c1)
    if NORM:
        if not HOLD:
            inv = tl.rsqrt(tl.sum(sq, 0) / H + eps)
            tl.debug_barrier()  # the row's stores, before this program's threads read them back
            for c in range(c0, c1, G * BLOCK_C):
                cols = c + chunk_cols
                xf = tl.load(out_ptr + m * H + cols, mask=cols < c1, other=0.0).to(tl.float32)
                w = tl.load(nw_ptr + cols, mask=cols < c1, other=0.0).to(tl.float32)
                tl.store(h_ptr + m * H + cols, (w * (xf * inv)).to(h_ptr.dtype.element_ty), mask=cols < c1)


def _combine_kernel(y_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, n_rows, H, s_res, eps, TOP_K: tl.constexpr,
                    HAS_RES: tl.constexpr, NORM: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT: tl.constexpr,
                    BLOCK_C: tl.constexpr, G: tl.constexpr = 1, HOLD: tl.constexpr = False,
                    PDL: tl.constexpr = False):
    """Program (token, BLOCK_H columns); with NORM one program holds all of H."""
    _pdl_enter(PDL)
    c0 = tl.program_id(1) * BLOCK_H
    _combine_row(y_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, tl.program_id(0).to(tl.int64), c0,
                 tl.minimum(c0 + BLOCK_H, H), n_rows, H, s_res, eps, TOP_K, HAS_RES, NORM, False, SPLIT, BLOCK_C, G,
                 HOLD)


def _combine_tail(cnt_ptr, y_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, n_rows, H, s_res, eps,
                  TOP_K: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, BLOCK_C: tl.constexpr,
                  SPLIT: tl.constexpr, G: tl.constexpr, HOLD: tl.constexpr):
    """This W2 program's ticket; the launch's last program combines all n_rows tokens (module docstring),
    G chunks of BLOCK_C columns a pass (HOLD: as _combine_row's)."""
    tl.debug_barrier()  # every thread's rows stored before the ticket releases them
    total = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == total - 1:
        for m in range(0, n_rows):
            _combine_row(y_ptr, valid_ptr, res_ptr, out_ptr, nw_ptr, h_ptr, m, 0, H, n_rows, H, s_res, eps, TOP_K,
                         HAS_RES, NORM, True, SPLIT, BLOCK_C, G, HOLD)
        tl.atomic_xchg(cnt_ptr, 0)


_KERNELS = ("_pdl_enter", "_combine_row", "_combine_kernel", "_combine_tail")
_NO_SPECIALIZE = {"_combine_kernel": ("n_rows",)}  # kernels.moe, which launches it, merges this in
