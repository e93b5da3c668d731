"""The MoE's front half, before the expert matmuls: align, and for decode steps the whole gate in one launch.

`align` (torch) and `align_triton` sort a step's (token, expert) pairs into
tiles of one expert each (kernels.moe's module docstring, step 2).

`gate_triton`, for steps of up to GATE_MAX_ROWS tokens, is everything between
the attention's output projection and the first expert matmul:

    x' = o + x              (the residual add; the stream the MoE adds to)
    h  = rmsnorm(x')        (the MLP norm)
    logits = h @ Wr^T + br  (the router)
    idx, weights = top-k, softmax over the k picked  (+ the expert-load count)
    sorted_ids, tile_expert, valid = align(idx)      (+ the gemv tiles' fp16 h)

At batch 1 on an H200 these were five launches (the norm, cuBLAS's split-K
router and its reduction, routing, align: ~15 us a layer, 0.54 ms of a
5.3 ms gpt-oss-120b step, BENCHMARKS.md "GPU"), each far shorter than its
start-up. Here a program per (token, EB experts) recomputes the token's norm
(a few KB, from L2) and its EB router logits, so the router's weights stream
through E/EB programs; a token's last program to finish (a ticket from its atomic
counter) routes it, and the last token routed (a ticket from a launch-wide
counter) aligns the pairs. Each reads what the others wrote past its L1 (.cg
loads; the writers' barrier and acq_rel ticket order them) and resets its
counter, so the next launch or a CUDA-graph replay finds it at 0
(`_triton.tickets`: zeroed once, never per launch, which would be a launch of
its own). The interpreter runs programs one after another, so there each
token's last program in grid order routes it.

That launch took 14.5 us a layer at batch 1 on an H200 (session 27), for
~1.5 MB of reads: a chain of dependent round trips, not bandwidth. So the
chain is shorter now: where a row fits one pass (gpt-oss' 2,880 features in
4,096 lanes) every load is issued at once, the router's rows first, where the
two passes of 1,024 features took six dependent loads; a single token aligns
without the launch-wide ticket; and the align of the few pairs (`_align_few`)
is compares in registers, where `_align_pairs`' histogram, cursors and atomics
took two more round trips. Unmeasured on a GPU yet: kernels.tune's "gate"
family sweeps EB x BLOCK_H x warps, session 27's layout among them.

The numbers are the unfused path's: the add and the norm round as
kernels.rmsnorm does, the logits are fp32 sums rounded to the activations'
dtype (as a cuBLAS bf16 GEMM's), routed as kernels.route; only the sum of
squares is taken in chunks, which may move a normalised value by one ulp.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import moe_gemv as gemv_kernels
from . import route as route_kernels
from . import tuned
from ._triton import jit_module, launch, next_pow2, tickets, tl
from .pdl import enter as _pdl_enter

GATE_MAX_ROWS = 16  # past this the norm recomputed per program and the one-program align outgrow the launches saved


def fused_rows(n: int) -> bool:
    """Whether a step of n rows takes the few-row fusions: this gate, and the MoE's combine as the W2
    launch's tail (kernels.moe_combine). Up to GATE_MAX_ROWS rows; GPTOSS_GATE_MAX_ROWS lowers the
    bound (0 turns both off, for A/B runs)."""
    limit = os.environ.get("GPTOSS_GATE_MAX_ROWS", "").strip()
    try:
        limit = min(int(limit), GATE_MAX_ROWS) if limit else GATE_MAX_ROWS
    except ValueError:
        raise ValueError(f"GPTOSS_GATE_MAX_ROWS={limit!r}: give a row count (0 turns the fused gate off)") from None
    return 0 < n <= limit
X16_IN_ALIGN = 16  # up to this many rows the align program converts them; more take _x16_kernel's grid
_X16_SCALE = gemv_kernels.X16_SCALE  # jitted code reads its own module's constexpr globals


def align(idx: torch.Tensor, global_to_local, n_local: int, block_m: int):
    """-> sorted_ids [T*BM] (pair id, or P for padding), tile_expert [T] (-1 = spare), valid [P]."""
    flat = idx.reshape(-1)
    P, dev = flat.numel(), flat.device
    loc = global_to_local[flat] if global_to_local is not None else flat
    valid = loc >= 0
    key = torch.where(valid, loc, torch.full_like(loc, n_local))  # absent pairs sort last
    order = torch.argsort(key, stable=True)
    # scatter_add, not bincount: bincount reads its max back to the host
    counts = torch.zeros(n_local + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:n_local]
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    skey = key[order]
    ek = skey.clamp(max=n_local - 1)
    rank = torch.arange(P, device=dev) - (torch.cumsum(counts, 0) - counts)[ek]
    max_tiles = -(-P // block_m) + min(n_local, P)
    dest = torch.where(skey < n_local, (tile_end - tiles)[ek] * block_m + rank,
                       torch.full_like(rank, max_tiles * block_m))
    sorted_ids = torch.full((max_tiles * block_m + 1,), P, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))  # absent pairs all land in the dropped last slot
    te = torch.searchsorted(tile_end, torch.arange(max_tiles, device=dev), right=True)
    tile_expert = torch.where(te < n_local, te, torch.full_like(te, -1)).to(torch.int32)
    return sorted_ids[:-1], tile_expert, valid


def gate_reference(o, residual, norm_w, eps: float, router_w, router_b, top_k: int, load=None, token_mask=None,
                   drop_masked: bool = False):
    """The unfused ops -> (x' = o + residual, h = rmsnorm(x'), idx [N, k], weights [N, k])."""
    from .rmsnorm import rmsnorm_reference
    h, x = rmsnorm_reference(o, norm_w, eps, residual)
    idx, w = route_kernels.route_reference(F.linear(h, router_w, router_b), top_k, load, token_mask, drop_masked)
    return x, h, idx, w


# ---------------------------------------------------------------- Triton kernels

def _local_keys(idx_ptr, g2l_ptr, p, pm, HAS_MAP: tl.constexpr, L2_ONLY: tl.constexpr):
    """Local expert of pairs p (-1: absent from this rank, or past the last pair). L2_ONLY: other programs of
    this launch wrote the ids (_gate_kernel): read past this SM's L1."""
    if L2_ONLY:
        loc = tl.load(idx_ptr + p, mask=pm, other=0, cache_modifier=".cg").to(tl.int32)
    else:
        loc = tl.load(idx_ptr + p, mask=pm, other=0).to(tl.int32)
    if HAS_MAP:
        loc = tl.load(g2l_ptr + loc, mask=pm, other=-1).to(tl.int32)
    return tl.where(pm & (loc >= 0), loc, -1)


def _align_pairs(idx_ptr, g2l_ptr, sorted_ptr, tile_e_ptr, valid_ptr, cursor_ptr, n_pairs, n_local, max_tiles,
                 HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
                 TILES: tl.constexpr):
    """`align` in one program: a counting sort of the pairs by local expert.

    Pass 1 counts each expert's pairs (a histogram of a CHUNK of keys at a time)
    and writes `valid`; the tile layout is the cumsum of the padded tile counts;
    the tiles' experts and padding slots are written next; pass 2 walks the
    chunks again and takes each pair's slot from a per-expert cursor (cursor_ptr,
    E_PAD int32 of scratch set to each expert's first slot) by atomic add. A
    chunk is thousands of pairs (a decode step's in one), where a one-hot
    [pairs, experts] per chunk held 16-64 and made the program a long serial
    chain (31.5 us at 256 pairs on an H200). On a GPU the pairs of one expert
    take its slots in any order, which changes nothing downstream (each slot's
    rows are computed on their own; the combine reads by pair); the
    interpreter's atomics run in lane order, so there the sort is stable and
    equals `align`. Every slot of sorted_ids is written exactly once, so the
    two writers need no ordering between them."""
    cols = tl.arange(0, E_PAD)
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros((E_PAD,), tl.int32)
    for c0 in range(0, n_pairs, CHUNK):
        p = c0 + lanes
        pm = p < n_pairs
        key = _local_keys(idx_ptr, g2l_ptr, p, pm, HAS_MAP, False)
        tl.store(valid_ptr + p, (key >= 0).to(tl.int8), mask=pm)
        counts += tl.histogram(key, E_PAD, mask=key >= 0)
    tile_start = _write_tiles(tile_e_ptr, sorted_ptr, counts, n_pairs, n_local, max_tiles, BLOCK_M, E_PAD, TILES)
    tl.store(cursor_ptr + cols, tile_start * BLOCK_M)
    tl.debug_barrier()  # the cursors' stores, seen by every thread's atomics
    # pass 2: scatter
    for c0 in range(0, n_pairs, CHUNK):
        p = c0 + lanes
        pm = p < n_pairs
        key = _local_keys(idx_ptr, g2l_ptr, p, pm, HAS_MAP, False)
        dest = tl.atomic_add(cursor_ptr + tl.maximum(key, 0), 1, mask=key >= 0, sem="relaxed")
        tl.store(sorted_ptr + dest, p, mask=key >= 0)


def _write_tiles(tile_e_ptr, sorted_ptr, counts, n_pairs, n_local, max_tiles, BLOCK_M: tl.constexpr,
                 E_PAD: tl.constexpr, TILES: tl.constexpr):
    """From each expert's pair count: each tile's expert (-1 past the last) and n_pairs in every slot no pair
    will take -> each expert's first tile."""
    cols = tl.arange(0, E_PAD)
    real_e = cols < n_local
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    tile_start = tile_end - tiles
    # tile -> expert (searchsorted right of tile_end), and P in every slot no pair will take
    rows = tl.arange(0, BLOCK_M)
    for t0 in range(0, max_tiles, TILES):
        t = t0 + tl.arange(0, TILES)
        tm = t < max_tiles
        te = tl.sum((real_e[None, :] & (tile_end[None, :] <= t[:, None])).to(tl.int32), axis=1)
        spare = te >= n_local
        tl.store(tile_e_ptr + t, tl.where(spare, -1, te), mask=tm)
        hit = (te[:, None] == cols[None, :]).to(tl.int32)
        cnt = tl.sum(hit * counts[None, :], axis=1)
        first = tl.sum(hit * tile_start[None, :], axis=1)
        used = tl.where(spare, 0, tl.minimum(tl.maximum(cnt - (t - first) * BLOCK_M, 0), BLOCK_M))
        pad = (rows[None, :] >= used[:, None]) & tm[:, None]
        tl.store(sorted_ptr + t[:, None] * BLOCK_M + rows[None, :],
                 tl.full((TILES, BLOCK_M), 0, tl.int32) + n_pairs, mask=pad)
    return tile_start


def _align_few(idx_ptr, g2l_ptr, sorted_ptr, tile_e_ptr, valid_ptr, n_pairs, n_local, max_tiles,
               HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, P_PAD: tl.constexpr,
               TILES: tl.constexpr):
    """`align` of up to P_PAD pairs (the gate's few), in registers: the keys loaded once, the counts and each
    pair's rank among its expert's earlier pairs by [P_PAD, E_PAD] and [P_PAD, P_PAD] compares. No
    histogram, cursors or atomics (_align_pairs' two chunk passes and their atomic round trip, for a
    decode step's 4-64 pairs), and the stable order: the same slots as `align` on a GPU too."""
    p = tl.arange(0, P_PAD)
    pm = p < n_pairs
    key = _local_keys(idx_ptr, g2l_ptr, p, pm, HAS_MAP, True)
    tl.store(valid_ptr + p, (key >= 0).to(tl.int8), mask=pm)
    hit = key[:, None] == tl.arange(0, E_PAD)[None, :]  # key -1 (absent) matches no expert
    counts = tl.sum(hit.to(tl.int32), axis=0)
    tile_start = _write_tiles(tile_e_ptr, sorted_ptr, counts, n_pairs, n_local, max_tiles, BLOCK_M, E_PAD, TILES)
    q = tl.arange(0, P_PAD)
    rank = tl.sum(((key[:, None] == key[None, :]) & (q[None, :] < p[:, None])).to(tl.int32), axis=1)
    first = tl.sum(tl.where(hit, tile_start[None, :], 0), axis=1)
    tl.store(sorted_ptr + first * BLOCK_M + rank, p, mask=key >= 0)


def _align_kernel(idx_ptr, g2l_ptr, sorted_ptr, tile_e_ptr, valid_ptr, cursor_ptr, n_pairs, n_local, max_tiles,
                  x_ptr, x16_ptr, n_rows, H, stride_x,
                  HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
                  TILES: tl.constexpr, X16: tl.constexpr, PDL: tl.constexpr = False):
    """_align_pairs as a launch. X16: also writes x16 = fp16(x * 2**-XS), the activations kernels.moe_gemv's
    W1 reads (a decode step's few rows: one launch fewer than kernels.moe_gemv._x16_kernel)."""
    _pdl_enter(PDL)
    if X16:
        xs = tl.arange(0, 1024)
        for f0 in range(0, n_rows * H, 1024):
            f = f0 + xs
            r = f // H
            v = tl.load(x_ptr + r.to(tl.int64) * stride_x + (f - r * H), mask=f < n_rows * H, other=0.0)
            tl.store(x16_ptr + f, (v.to(tl.float32) * _X16_SCALE).to(tl.float16), mask=f < n_rows * H)
    _align_pairs(idx_ptr, g2l_ptr, sorted_ptr, tile_e_ptr, valid_ptr, cursor_ptr, n_pairs, n_local, max_tiles,
                 HAS_MAP, BLOCK_M, E_PAD, CHUNK, TILES)


def _gate_kernel(o_ptr, r_ptr, nw_ptr, rw_ptr, rb_ptr, x_ptr, h_ptr, x16_ptr, logit_ptr, count_ptr,
                 idx_ptr, wt_ptr, load_ptr, mask_ptr, g2l_ptr, sorted_ptr, tile_e_ptr, valid_ptr,
                 N, H, E, n_local, max_tiles, s_o, s_r, eps,
                 TOP_K: tl.constexpr, K_PAD: tl.constexpr, EB: tl.constexpr, BLOCK_H: tl.constexpr,
                 ONE_PASS: tl.constexpr, BLOCK_E: tl.constexpr, HAS_LOAD: tl.constexpr, HAS_MASK: tl.constexpr,
                 DROP_MASKED: tl.constexpr, X16: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr,
                 E_PAD: tl.constexpr, P_PAD: tl.constexpr, TILES: tl.constexpr, PDL: tl.constexpr = False):
    """Program (token, g): the token's add and norm, router logits of experts [g*EB, (g+1)*EB); the token's
    last program routes it, the last token routed aligns the pairs (module docstring). ONE_PASS (BLOCK_H >=
    H): every load at once, the router rows first (the DRAM stream, under the stream's L2 reads); else the
    sum of squares, then the norm and the dot, BLOCK_H features at a time."""
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    c = tl.arange(0, BLOCK_H)
    dt = x_ptr.dtype.element_ty
    e = g * EB + tl.arange(0, EB)
    em = e < E
    h_out = tl.where(g == 0, H, 0)  # one program per token writes its rows: the others' masks are empty
    if ONE_PASS:
        cm = c < H
        wr = tl.load(rw_ptr + e.to(tl.int64)[:, None] * H + c[None, :], mask=em[:, None] & cm[None, :], other=0.0)
        v = (tl.load(o_ptr + row * s_o + c, mask=cm, other=0.0).to(tl.float32)
             + tl.load(r_ptr + row * s_r + c, mask=cm, other=0.0).to(tl.float32)).to(dt)
        w = tl.load(nw_ptr + c, mask=cm, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(v.to(tl.float32) * v.to(tl.float32), 0) / H + eps)
        xn = (w * (v.to(tl.float32) * inv)).to(dt)
        _gate_rows(x_ptr, h_ptr, x16_ptr, row, H, c, h_out, v, xn, X16)
        logit = tl.sum(wr.to(tl.float32) * xn.to(tl.float32)[None, :], 1)
    else:
        ss = tl.zeros((BLOCK_H,), tl.float32)
        for h0 in range(0, H, BLOCK_H):  # pass 1: the sum of squares of the rounded stream
            cm = h0 + c < H
            v = (tl.load(o_ptr + row * s_o + h0 + c, mask=cm, other=0.0).to(tl.float32)
                 + tl.load(r_ptr + row * s_r + h0 + c, mask=cm, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
            ss += v * v
        inv = tl.rsqrt(tl.sum(ss, 0) / H + eps)
        acc = tl.zeros((EB, BLOCK_H), tl.float32)
        for h0 in range(0, H, BLOCK_H):  # pass 2: normalise (again, from L1) and dot with the router rows
            cc = h0 + c
            cm = cc < H
            v = (tl.load(o_ptr + row * s_o + cc, mask=cm, other=0.0).to(tl.float32)
                 + tl.load(r_ptr + row * s_r + cc, mask=cm, other=0.0).to(tl.float32)).to(dt)
            w = tl.load(nw_ptr + cc, mask=cm, other=0.0).to(tl.float32)
            xn = (w * (v.to(tl.float32) * inv)).to(dt)
            _gate_rows(x_ptr, h_ptr, x16_ptr, row, H, cc, h_out, v, xn, X16)
            wr = tl.load(rw_ptr + e.to(tl.int64)[:, None] * H + cc[None, :], mask=em[:, None] & cm[None, :],
                         other=0.0)
            acc += wr.to(tl.float32) * xn.to(tl.float32)[None, :]
        logit = tl.sum(acc, 1)
    logit += tl.load(rb_ptr + e, mask=em, other=0.0).to(tl.float32)
    tl.store(logit_ptr + row * E + e, logit.to(logit_ptr.dtype.element_ty), mask=em)
    tl.debug_barrier()  # every thread's logits stored before the ticket releases them
    # the token's last program routes it (the tokens in parallel); the last token routed aligns every pair
    if tl.atomic_add(count_ptr + 1 + row, 1, sem="acq_rel") == tl.num_programs(1) - 1:
        _route_row(logit_ptr, idx_ptr, wt_ptr, load_ptr, mask_ptr, row, E, E, TOP_K, K_PAD, BLOCK_E, HAS_LOAD,
                   HAS_MASK, DROP_MASKED, True)
        tl.atomic_xchg(count_ptr + 1 + row, 0)
        tl.debug_barrier()  # the token's ids stored before the launch-wide ticket (or, one token, the align) reads them
        last = N == 1  # one token: its routing program aligns, no launch-wide ticket (an atomic's round trip) to take
        if N > 1:
            last = tl.atomic_add(count_ptr, 1, sem="acq_rel") == N - 1
        if last:
            _align_few(idx_ptr, g2l_ptr, sorted_ptr, tile_e_ptr, valid_ptr, N * TOP_K, n_local, max_tiles, HAS_MAP,
                       BLOCK_M, E_PAD, P_PAD, TILES)
            if N > 1:
                tl.atomic_xchg(count_ptr, 0)


def _gate_rows(x_ptr, h_ptr, x16_ptr, row, H, cc, h_out, v, xn, X16: tl.constexpr):
    """The token's stream, its norm and (X16) the gemv tiles' fp16 copy, features cc (h_out: H in the token's
    first program, 0 in the others)."""
    tl.store(x_ptr + row * H + cc, v, mask=cc < h_out)
    tl.store(h_ptr + row * H + cc, xn, mask=cc < h_out)
    if X16:
        tl.store(x16_ptr + row * H + cc, (xn.to(tl.float32) * _X16_SCALE).to(tl.float16), mask=cc < h_out)


# kernels.route's row, jitted again into this module's globals (where _gate_kernel looks)
_route_row = getattr(route_kernels._route_row, "fn", route_kernels._route_row)
_KERNELS = ("_pdl_enter", "_route_row", "_local_keys", "_write_tiles", "_align_pairs", "_align_few", "_align_kernel",
            "_gate_rows", "_gate_kernel")
_NO_SPECIALIZE = {"_align_kernel": ("n_pairs", "max_tiles", "n_rows"), "_gate_kernel": ("N", "max_tiles")}


def _tile_pass(n_local: int, block_m: int, num_warps: int) -> dict:
    """_write_tiles' [TILES, E_PAD] and [TILES, BLOCK_M] at ~16 int32 a thread."""
    budget = 16 * 32 * num_warps
    e_pad = max(16, next_pow2(n_local))
    return dict(E_PAD=e_pad, TILES=max(1, min(budget // e_pad, budget // block_m)))


def _align_config(P: int, n_local: int, block_m: int) -> dict:
    """~16 int32 per thread: a chunk of pairs, and the tile pass."""
    num_warps = 4 if P <= 2048 else 16
    # the chunk is the budget whatever P: a launch configuration per warp count, not per power of 2 of P
    return dict(_tile_pass(n_local, block_m, num_warps), CHUNK=16 * 32 * num_warps, num_warps=num_warps)


def _aligned_buffers(P: int, n_local: int, block_m: int, dev):
    max_tiles = -(-P // block_m) + min(n_local, P)
    return (torch.empty(max_tiles * block_m, dtype=torch.int32, device=dev),
            torch.empty(max_tiles, dtype=torch.int32, device=dev), torch.empty(P, dtype=torch.int8, device=dev))


def align_triton(idx: torch.Tensor, global_to_local, n_local: int, block_m: int,
                 x: torch.Tensor | None = None, x16: torch.Tensor | None = None):
    """`align` as one Triton launch (CUDA, or the interpreter): the same tile_expert and the same pairs in
    each expert's slots (on a GPU in any order within them), valid as int8 (what _combine_kernel reads).
    Static shapes, no host reads: graph-capturable. x [N, H], x16 [N, H] fp16: the same program also fills
    x16 with fp16(x * 2**-XS)."""
    jit_module(globals(), _KERNELS)
    flat = idx.reshape(-1)
    P, dev = flat.numel(), flat.device
    sorted_ids, tile_expert, valid = _aligned_buffers(P, n_local, block_m, dev)
    if P == 0:
        return sorted_ids, tile_expert, valid
    g2l = global_to_local if global_to_local is not None else flat
    conv = x is not None and x16 is not None
    cfg = _align_config(P, n_local, block_m)
    cursor = torch.empty(cfg["E_PAD"], dtype=torch.int32, device=dev)
    launch(_align_kernel, (1,), flat, g2l, sorted_ids, tile_expert, valid, cursor, P, n_local, tile_expert.numel(),
           x if conv else flat, x16 if conv else flat, x.shape[0] if conv else 0, x.shape[1] if conv else 0,
           x.stride(0) if conv else 0, HAS_MAP=global_to_local is not None, BLOCK_M=block_m, X16=conv, **cfg)
    return sorted_ids, tile_expert, valid


@dataclass
class Gate:
    """gate_triton's outputs: the new stream, its norm, the routing (weights fp32, flat per pair: what W2
    scales by) and the alignment; x16 the gemv tiles' fp16 activations (None unless asked for)."""
    x: torch.Tensor
    h: torch.Tensor
    idx: torch.Tensor
    weights: torch.Tensor
    aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    x16: torch.Tensor | None
    logits: torch.Tensor  # the router's [N, E], in the activations' dtype (what the routing read)


def tuning_shape(H: int, E: int, top_k: int, dtype) -> str:
    return tuned.shape_key(H=H, E=E, top_k=top_k, dtype=dtype)


def gate_config(H: int, E: int) -> dict:
    """The launch's default: the whole row in one pass where it fits 4,096 features (gpt-oss' 2,880), each
    program holding <= 8,192 router weights (EB experts: 64 programs a token at 128 experts); past that,
    1,024-feature passes at ~32 programs a token (the layout session 27 measured at 14.5 us a layer at
    batch 1). kernels.tune measures EB x BLOCK_H x warps (kernels/_tune_cases.gate_candidates)."""
    bh = next_pow2(H)
    if bh > 4096:
        return dict(EB=max(1, next_pow2(E) // 32), BLOCK_H=1024, num_warps=4)
    return dict(EB=max(1, min(next_pow2(E) // 32, 8192 // bh)), BLOCK_H=bh, num_warps=4)


def gate_triton(o: torch.Tensor, residual: torch.Tensor, norm_w: torch.Tensor, eps: float, router_w: torch.Tensor,
                router_b: torch.Tensor, top_k: int, n_local: int, block_m: int, global_to_local=None, load=None,
                token_mask=None, drop_masked: bool = False, x16: bool = False, config: dict | None = None) -> Gate:
    """o, residual [N, H] (N <= GATE_MAX_ROWS) -> Gate, in one launch (module docstring). Router ids map to
    local experts through global_to_local (None: they are local ids), as in align_triton. x16: also make
    the gemv tiles' activations. config: EB (experts a program, a power of 2), BLOCK_H (features a pass),
    num_warps; default: this device's measured one (kernels.tuned "gate"), else gate_config."""
    jit_module(globals(), _KERNELS)
    N, H = o.shape
    E = router_w.shape[0]
    if not 0 < N <= GATE_MAX_ROWS:
        raise ValueError(f"gate_triton takes 1..{GATE_MAX_ROWS} rows, got {N}")
    if residual.shape != o.shape or router_w.shape != (E, H) or router_b.shape != (E,):
        raise ValueError(f"gate: o {tuple(o.shape)}, residual {tuple(residual.shape)}, router "
                         f"{tuple(router_w.shape)} + {tuple(router_b.shape)} do not fit")
    if load is not None and load.dtype != torch.long:
        raise ValueError(f"load must be int64, got {load.dtype}")
    cfg = dict(config or tuned.lookup("gate", tuning_shape(H, E, top_k, o.dtype), N, o.device) or gate_config(H, E))
    eb, bh, warps = cfg["EB"], cfg["BLOCK_H"], cfg.get("num_warps", 4)
    if eb < 1 or eb & (eb - 1) or bh < 16 or bh & (bh - 1):
        raise ValueError(f"gate config {cfg}: EB and BLOCK_H must be powers of 2 (BLOCK_H >= 16)")
    o, residual = (t if t.stride(-1) == 1 else t.contiguous() for t in (o, residual))
    router_w = router_w.contiguous()
    dev, P = o.device, N * top_k
    x, h = torch.empty(N, H, dtype=o.dtype, device=dev), torch.empty(N, H, dtype=o.dtype, device=dev)
    x16_t = torch.empty(N, H, dtype=torch.float16, device=dev) if x16 else None
    logits = torch.empty(N, E, dtype=o.dtype, device=dev)
    idx = torch.empty(N, top_k, dtype=torch.int32, device=dev)
    weights = torch.empty(P, dtype=torch.float32, device=dev)
    aligned = _aligned_buffers(P, n_local, block_m, dev)
    # _align_few's compares, [P_PAD, E_PAD] and [P_PAD, P_PAD], at one P_PAD for every row count (the row
    # count does not recompile)
    launch(_gate_kernel, (N, -(-E // eb)), o, residual, norm_w, router_w, router_b, x, h,
           x16_t if x16 else x, logits, tickets(dev, N + 1), idx, weights, load if load is not None else idx,
           token_mask if token_mask is not None else idx, global_to_local if global_to_local is not None else idx,
           *aligned, N, H, E, n_local, aligned[1].numel(), o.stride(0), residual.stride(0), float(eps),
           TOP_K=top_k, K_PAD=next_pow2(top_k), EB=eb, BLOCK_H=bh, ONE_PASS=bh >= H, BLOCK_E=max(16, next_pow2(E)),
           HAS_LOAD=load is not None, HAS_MASK=token_mask is not None,
           DROP_MASKED=drop_masked and token_mask is not None, X16=x16, HAS_MAP=global_to_local is not None,
           BLOCK_M=block_m, P_PAD=max(16, next_pow2(GATE_MAX_ROWS * top_k)), num_warps=warps,
           **_tile_pass(n_local, block_m, warps))
    return Gate(x, h, idx, weights, aligned, x16_t, logits)


__all__ = ["GATE_MAX_ROWS", "Gate", "X16_IN_ALIGN", "align", "align_triton", "fused_rows", "gate_config",
           "gate_reference", "gate_triton", "tuning_shape"]
