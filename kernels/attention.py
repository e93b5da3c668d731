"""Paged attention with per-head sinks and sliding windows (decode, prefill, chunked prefill).

One kernel serves every step shape PagedMetadata.attend accepts: sequence b has
q_len = query_start[b+1] - query_start[b] new tokens at positions
context_len - q_len .. context_len - 1, and reads keys 0..context_len-1 (or
the window) from the paged cache through its block-table row, the new tokens'
keys included (attend writes them before attending).

A program owns one (sequence, KV head, query tile): its rows are BLOCK_M // G
query tokens x the G query heads sharing that KV head, so K/V are read once
per tile for the whole GQA group and a decode token still fills a 16-row dot.
Keys are gathered token by token through the block table, so any block size
works, and blocks wholly outside the window are never visited (freed window
blocks are NULL in the table and must not be read).

Softmax state starts at the sink (m = sink, l = 1, acc = 0): the sink joins
the normaliser exactly once and a row never holds -inf, so fully masked key
blocks need no special case. With NUM_SPLITS > 1 (long decode, few programs)
each split handles a slice of the keys, only split 0 carries the sink, and
the tile's last split to finish (a ticket from an acq_rel atomic counter,
`_triton.tickets`) merges the partial (m, l, acc) in split order: one launch,
where a merge kernel of its own took ~1.4 us a layer plus a launch gap (the
batch-1 profile's attention time beyond _attn_kernel, H200, BENCHMARKS.md).
"""

import torch

from models.attention import as_bytes, attention_with_sinks

from . import rope as rope_kernels
from . import tuned
from ._triton import interpreting, jit_module, launch, next_pow2, on_gpu, tickets, tl, triton
from .pdl import enter as _pdl_enter

LOG2E = 1.4426950408889634


def paged_attention_reference(q, k_cache, v_cache, block_table, query_start, context_lens, sinks,
                              window, scale) -> torch.Tensor:
    """PagedMetadata.attend's result (minus its cache write) through the model's attention_with_sinks.

    One sequence at a time over all its blocks, the window applied by the mask
    (NULL entries are read and masked, so the pool must hold finite values, as
    the engine's zeroed NULL block does). It leans on no PagedMetadata
    internals and never calls attend(), so attend may call the dispatcher,
    whose CPU path lands here, without recursing."""
    out = torch.empty_like(q)
    bs = k_cache.shape[1]
    qs, ctx = query_start.tolist(), context_lens.tolist()
    for b in range(len(ctx)):
        q0, q1, n = qs[b], qs[b + 1], ctx[b]
        if q1 == q0:
            continue
        phys = block_table[b, :-(-n // bs)]
        kk, vv = (as_bytes(c)[phys].view(c.dtype).flatten(0, 1)[:n].to(q.dtype) for c in (k_cache, v_cache))
        kpos = torch.arange(n, device=q.device)
        qpos = kpos[n - (q1 - q0):]
        mask = kpos[None, :] <= qpos[:, None]
        if window is not None:
            mask &= qpos[:, None] - kpos[None, :] < window
        out[q0:q1] = attention_with_sinks(q[None, q0:q1], kk[None], vv[None], sinks, mask[None], scale)[0]
    return out


def _attn_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, qs_ptr, ctx_ptr, sink_ptr, o_ptr, po_ptr, pm_ptr, pl_ptr, cnt_ptr,
                 kn_ptr, vn_ptr, cos_ptr, sin_ptr, slot_ptr,
                 qk_scale, window, n_tokens, Hq, D,
                 s_qn, s_qh, s_kb, s_ks, s_kh, s_bt, s_kn, s_knh, s_vn, s_vnh, s_cn, s_sn,
                 G: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr,
                 DOT_BF16: tl.constexpr, ROPE: tl.constexpr = False, PDL: tl.constexpr = False):
    """ROPE (a decode step: one token a sequence): q, and the step's k and v (kn, vn [N, K, D]), come as the
    qkv projection left them; q is rotated here, and the split whose keys hold the new one rotates that
    key and stores it and its value at the token's cache slot before reading keys: kernels.rope's launch,
    folded in (the same ops, so the same bits)."""
    _pdl_enter(PDL)
    b = tl.program_id(0)
    kh = tl.program_id(1)
    qt = tl.program_id(2) // NUM_SPLITS
    sp = tl.program_id(2) % NUM_SPLITS
    QT: tl.constexpr = BLOCK_M // G  # query tokens per tile
    q0 = tl.load(qs_ptr + b)
    qlen = tl.load(qs_ptr + b + 1) - q0
    ctx = tl.load(ctx_ptr + b)
    if qt * QT >= qlen:
        return
    r = tl.arange(0, BLOCK_M)
    i = qt * QT + r // G
    rvalid = (r < QT * G) & (i < qlen)
    head = kh * G + r % G
    qpos = ctx - qlen + i
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    tok = (q0 + i).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * s_qn + head[:, None] * s_qh + d[None, :],
                mask=rvalid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if ROPE:  # rotate-half: column d pairs with d -/+ D/2, at frequency d mod D/2
        half = D // 2
        lower = d < half
        pd = tl.where(lower, d + half, d - half)
        jd = tl.where(lower, d, d - half)
        sgn = tl.where(lower, -1.0, 1.0)
        qm = rvalid[:, None] & dmask[None, :]
        qp = tl.load(q_ptr + tok[:, None] * s_qn + head[:, None] * s_qh + pd[None, :], mask=qm, other=0.0)
        c = tl.load(cos_ptr + tok[:, None] * s_cn + jd[None, :], mask=qm, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + tok[:, None] * s_sn + jd[None, :], mask=qm, other=0.0).to(tl.float32)
        q = _rot(q, qp.to(tl.float32), c, sn, sgn[None, :], q_ptr.dtype.element_ty)

    first = ctx - qlen + qt * QT
    hi = tl.minimum(first + QT, ctx)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first - window + 1, 0)
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
    start = lo + sp * per_split
    end = tl.minimum(hi, start + per_split)
    if ROPE:
        if (start <= ctx - 1) & (ctx - 1 < end):  # this split reads the new key: it stores it first
            t0 = q0.to(tl.int64)
            slot = tl.load(slot_ptr + t0).to(tl.int64)
            kr = tl.load(kn_ptr + t0 * s_kn + kh * s_knh + d, mask=dmask, other=0.0).to(tl.float32)
            krp = tl.load(kn_ptr + t0 * s_kn + kh * s_knh + pd, mask=dmask, other=0.0).to(tl.float32)
            c1 = tl.load(cos_ptr + t0 * s_cn + jd, mask=dmask, other=0.0).to(tl.float32)
            s1 = tl.load(sin_ptr + t0 * s_sn + jd, mask=dmask, other=0.0).to(tl.float32)
            at = (slot // PAGE) * s_kb + (slot % PAGE) * s_ks + kh * s_kh + d
            tl.store(k_ptr + at, _to_cache(_rot(kr, krp, c1, s1, sgn, kn_ptr.dtype.element_ty), k_ptr), mask=dmask)
            vr = tl.load(vn_ptr + t0 * s_vn + kh * s_vnh + d, mask=dmask, other=0.0).to(tl.float32)
            tl.store(v_ptr + at, _to_cache(vr, v_ptr), mask=dmask)
        tl.debug_barrier()  # the stores above, before any of this program's threads reads the key back

    sink = tl.load(sink_ptr + head, mask=rvalid, other=0.0).to(tl.float32) * 1.4426950408889634
    m = tl.where(sp == 0, sink, -1.0e30)
    l_i = tl.where(sp == 0, 1.0, 0.0) + tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    row = bt_ptr + b.to(tl.int64) * s_bt
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        kval = kpos < end
        page = tl.load(row + kpos // PAGE, mask=kval, other=0).to(tl.int64)
        base = page * s_kb + (kpos % PAGE) * s_ks + kh * s_kh
        kvmask = kval[None, :] & dmask[:, None]
        kt = _from_cache(tl.load(k_ptr + base[None, :] + d[:, None], mask=kvmask, other=0.0))  # [D, N]
        if DOT_BF16:
            s = tl.dot(q.to(tl.bfloat16), kt.to(tl.bfloat16))
        else:
            s = tl.dot(q, kt, input_precision="ieee")
        see = kval[None, :] & (kpos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            see = see & (qpos[:, None] - kpos[None, :] < window)
        s = tl.where(see, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = _from_cache(tl.load(v_ptr + base[:, None] + d[None, :], mask=kval[:, None] & dmask[None, :],
                                 other=0.0))  # [N, D]
        if DOT_BF16:
            acc = tl.dot(p.to(tl.bfloat16), vt.to(tl.bfloat16), acc * alpha[:, None])
        else:
            acc = tl.dot(p, vt, acc * alpha[:, None], input_precision="ieee")
        m = m_new

    omask = rvalid[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(o_ptr + tok[:, None] * (Hq * D) + head[:, None] * D + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=omask)
    else:  # partials [splits, N, Hq, (D)], unnormalised; the tile's last split to finish merges them
        prow = tok * Hq + head
        n_rows = n_tokens * Hq
        tl.store(po_ptr + (sp * n_rows + prow)[:, None] * D + d[None, :], acc, mask=omask)
        tl.store(pm_ptr + sp * n_rows + prow, m, mask=rvalid)
        tl.store(pl_ptr + sp * n_rows + prow, l_i, mask=rvalid)
        tl.debug_barrier()  # every thread's partials stored before the ticket releases them
        cnt = cnt_ptr + (b * tl.num_programs(1) + kh) * (tl.num_programs(2) // NUM_SPLITS) + qt
        if tl.atomic_add(cnt, 1, sem="acq_rel") == NUM_SPLITS - 1:
            _merge_rows(po_ptr, pm_ptr, pl_ptr, o_ptr, prow, rvalid, d, dmask, n_rows, D, NUM_SPLITS)
            tl.atomic_xchg(cnt, 0)


def _merge_rows(po_ptr, pm_ptr, pl_ptr, o_ptr, prow, rvalid, d, dmask, n_rows, D, NUM_SPLITS: tl.constexpr):
    """o[prow] = the splits' partials merged in split order (the same bits whichever split finished last),
    read past this SM's L1 (.cg): the other splits' programs wrote them."""
    m = tl.full(prow.shape, -1.0e30, tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(pm_ptr + s * n_rows + prow, mask=rvalid, other=-1.0e30, cache_modifier=".cg"))
    l_tot = tl.zeros(prow.shape, tl.float32)
    out = tl.zeros((prow.shape[0], d.shape[0]), tl.float32)
    omask = rvalid[:, None] & dmask[None, :]
    for s in tl.static_range(NUM_SPLITS):
        w = tl.exp2(tl.load(pm_ptr + s * n_rows + prow, mask=rvalid, other=-1.0e30, cache_modifier=".cg") - m)
        l_tot += tl.load(pl_ptr + s * n_rows + prow, mask=rvalid, other=0.0, cache_modifier=".cg") * w
        out += tl.load(po_ptr + (s * n_rows + prow)[:, None] * D + d[None, :], mask=omask, other=0.0,
                       cache_modifier=".cg") * w[:, None]
    out = out / tl.where(rvalid, l_tot, 1.0)[:, None]
    tl.store(o_ptr + prow[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty), mask=omask)


# kernels.rope's rotation and cache conversions, jitted again into this module's globals (where its kernels look)
_rot, _e4m3, _to_cache, _from_cache = (getattr(f, "fn", f) for f in (
    rope_kernels._rot, rope_kernels._e4m3, rope_kernels._to_cache, rope_kernels._from_cache))
_KERNELS = ("_pdl_enter", "_rot", "_e4m3", "_to_cache", "_from_cache", "_attn_kernel", "_merge_rows")
_NO_SPECIALIZE = {"_attn_kernel": ("n_tokens", "s_bt")}


def _default_config(max_query_len: int, B: int, K: int, G: int, gpu: bool, interp: bool) -> dict:
    tokens_per_tile = 1 if max_query_len == 1 else (16 if interp else 128) // G
    block_m = max(16, next_pow2(G * max(tokens_per_tile, 1)))
    cfg = dict(BLOCK_M=block_m, BLOCK_N=16 if interp else 64,
               NUM_SPLITS=1 if (max_query_len > 1 or not gpu) else max(1, min(8, 256 // (B * K))))
    if not interp:
        # a 128-row prefill tile keeps q, s, p and acc [128, 64] in registers: 4 warps need more than
        # 255 per thread and spill on sm_90 (python -m kernels.aot), 8 do not
        cfg.update(num_warps=8 if block_m >= 128 else 4, num_stages=2)
    return cfg


def tuning_shape(Hq: int, K: int, D: int, page: int, window: int | None, dtype) -> str:
    return tuned.shape_key(Hq=Hq, K=K, D=D, page=page, window=window, dtype=dtype)


def _config(q, page: int, K: int, B: int, N: int, max_query_len: int, window, interp: bool) -> dict:
    """The measured config for this device and shape (kernels.tuned), else the default.

    Decode (one token per sequence) is looked up by sequences, anything else by tokens."""
    Hq, D = q.shape[1], q.shape[2]
    decode = max_query_len == 1
    hit = tuned.lookup("attn_decode" if decode else "attn_prefill", tuning_shape(Hq, K, D, page, window, q.dtype),
                       B if decode else N, q.device)
    return hit if hit is not None else _default_config(max_query_len, B, K, Hq // K, on_gpu(q), interp)


def paged_attention(q, k_cache, v_cache, block_table, query_start, context_lens, sinks, window, scale,
                    max_query_len: int | None = None, num_splits: int | None = None, rope=None) -> torch.Tensor:
    """q [N, Hq, D]; k/v_cache [blocks, block_size, K, D] (q's dtype or float8_e4m3fn);
    block_table [B, max_blocks]; query_start [B+1]; context_lens [B]; sinks [Hq] -> [N, Hq, D] in q.dtype.

    max_query_len: longest q_len in the step (pass it to avoid a device->host
    read, e.g. 1 for decode under CUDA graphs). num_splits: key-range splits
    per program (None = heuristic: only decode with few programs splits).
    rope = (k, v, cos, sin, slots), decode only (max_query_len 1): q, k [N, K, D] not yet rotated and this
    step's v; the launch does kernels.rope.rope_into_cache_triton's work too (one launch fewer a layer).
    """
    N, Hq, D = q.shape
    _, page, K, _ = k_cache.shape
    B = context_lens.numel()
    out = torch.empty(N, Hq, D, dtype=q.dtype, device=q.device)
    if N == 0 or B == 0:
        return out
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError("k and v caches must have the same shape and strides")
    if Hq % K:
        raise ValueError(f"{Hq} query heads are not a multiple of {K} KV heads")
    jit_module(globals(), _KERNELS)
    G = Hq // K
    if max_query_len is None:
        max_query_len = int((query_start[1:] - query_start[:-1]).max())
    if rope is not None:
        kn, vn, cos, sin, slots = rope
        if max_query_len != 1 or kn.shape != (N, K, D) or vn.shape != kn.shape or cos.shape != (N, D // 2) \
                or sin.shape != cos.shape or not rope_kernels.check_cache_dtype(k_cache, kn) or D % 2:
            raise ValueError(f"paged_attention rope: decode steps only (max_query_len {max_query_len}); k "
                             f"{tuple(kn.shape)} {kn.dtype}, v {tuple(vn.shape)}, cos {tuple(cos.shape)}, sin "
                             f"{tuple(sin.shape)} for q {tuple(q.shape)}, a {k_cache.dtype} cache")
        kn, vn, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (kn, vn, cos, sin))
        rope_args = (kn, vn, cos, sin, slots)
        rope_strides = (kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), cos.stride(0), sin.stride(0))
    else:
        rope_args, rope_strides = (q, q, q, q, query_start), (0,) * 6  # unused
    interp = interpreting()
    cfg = _config(q, page, K, B, N, max_query_len, window, interp)
    if num_splits is not None:
        cfg["NUM_SPLITS"] = num_splits
    block_m, num_splits = cfg["BLOCK_M"], cfg["NUM_SPLITS"]
    qt = triton.cdiv(max_query_len, block_m // G)
    dot_bf16 = q.dtype in (torch.bfloat16, torch.float16)
    if num_splits > 1:
        po = torch.empty(num_splits, N, Hq, D, dtype=torch.float32, device=q.device)
        pm = torch.empty(num_splits, N, Hq, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        cnt = tickets(q.device, B * K * qt)
    else:
        po, pm, pl, cnt = out, out, out, out  # unused
    q = q.contiguous() if q.stride(-1) != 1 else q
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    query_start, context_lens, sinks = query_start.contiguous(), context_lens.contiguous(), sinks.contiguous()
    opts = {k: v for k, v in cfg.items() if k.startswith("num_")}
    launch(_attn_kernel, (B, K, qt * num_splits),
           q, as_bytes(k_cache), as_bytes(v_cache), block_table, query_start,
           context_lens, sinks, out, po, pm, pl, cnt, *rope_args,
           float(scale) * LOG2E, int(window or 0), N, Hq, D,
           q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
           *rope_strides,
           G=G, PAGE=page, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=max(16, next_pow2(D)),
           HAS_WINDOW=window is not None, NUM_SPLITS=num_splits, DOT_BF16=dot_bf16, ROPE=rope is not None, **opts)
    return out


__all__ = ["paged_attention", "paged_attention_reference"]
