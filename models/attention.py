"""Attention with per-head sinks, and the metadata that says which keys a query sees.

The model hands each layer's q/k/v to `meta.attend(...)`; the metadata object
decides where keys come from:

* `DenseMetadata`: several sequences flattened into one batch, no cache
  (the parity path, and prefill without a cache).
* `PagedMetadata`: the engine's paged KV cache. New keys/values are written
  to their slots, then each sequence attends over its block table. Prefill
  chunks and decode tokens of different sequences mix freely in one call.

Both reduce to `attention_with_sinks`, the torch reference that fast kernels
are tested against. Where kernels.dispatch picks Triton (CUDA by default),
`PagedMetadata.attend` hands the step to the paged-attention kernel instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import dispatch  # imports no kernel module until a kernel is called: no cycle

NULL_BLOCK = 0  # block 0 of every pool stays zero: padding and freed window blocks point here

# EngineConfig.kv_cache_dtype: "auto" stores K/V in the model's dtype; "fp8" in float8 e4m3 (OCP "fn": no
# infinities, largest 448) with no scale, half the bytes of bf16. That doubles the tokens a GPU holds and
# halves what a decode step reads from the cache; the model computes in its own dtype and rounds k and v to
# e4m3 only as they are stored (round to nearest even, beyond +-448 saturated), so scores and outputs
# carry e4m3's 2^-4 relative rounding of every cached value (tests/models/test_forward_paged.py: a paged
# forward on an fp8 pool is the full forward over e4m3-rounded k and v).
KV_CACHE_DTYPES = ("auto", "fp8")
FP8_MAX = 448.0


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: one of {', '.join(KV_CACHE_DTYPES)}")
    return torch.float8_e4m3fn if kv_cache_dtype == "fp8" else model_dtype


def to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the cache stores it (the Triton writes give the same bits: kernels.rope._to_cache)."""
    if dtype == torch.float8_e4m3fn:
        x = x.float().clamp(-FP8_MAX, FP8_MAX)  # NaN stays NaN
    return x.to(dtype)


def as_bytes(cache: torch.Tensor) -> torch.Tensor:
    """An fp8 pool as its bytes (uint8, the same storage), any other as it is."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def store_rows(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """cache ([blocks, block size, K, D]) at flat `slots` <- x [len(slots), K, D] as the cache stores it.

    An fp8 pool is indexed through its bytes: float8 indexing kernels are missing on some devices and torch
    versions (pytorch/pytorch#133605, #169656); uint8's exist everywhere and move the same bits."""
    as_bytes(cache.view(-1, *cache.shape[2:]))[slots] = as_bytes(to_cache(x, cache.dtype))


def gather_rows(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The pool's [*, D] rows `rows`, in the pool's dtype (through the bytes, as store_rows)."""
    return as_bytes(cache).view(-1, cache.shape[-1]).index_select(0, rows).view(cache.dtype)


def attention_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                         mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B,Q,Hq,D], k/v [B,L,K,D], sinks [Hq], mask [B,Q,L] (True = attend) -> [B,Q,Hq,D].

    Softmax runs over the scores plus one sink logit per head whose
    probability is dropped; computed in fp32 whatever the input dtype.
    A NaN score of a masked key is not ignored (cached k holds none unless the model made NaNs).
    """
    B, Q, Hq, D = q.shape
    K = k.shape[2]
    G = Hq // K
    qg = q.float().view(B, Q, K, G, D)
    s = torch.einsum("bqkgd,blkd->bkgql", qg, k.float()).mul_(scale)
    # the sink joins the normalisation as one more logit per head, then is dropped
    sink = sinks.float().view(1, K, G, 1, 1)
    bias = torch.zeros(mask.shape, dtype=s.dtype, device=s.device).masked_fill_(~mask, float("-inf"))
    m = torch.maximum(s.add(bias[:, None, None]).amax(dim=-1, keepdim=True), sink)  # max over kept keys
    # Masked keys weigh exp(-inf) = 0, but on CPU exp of -inf (or of anything below about -87)
    # takes a slow path, ~15-100x. So exp runs on the raw scores and masked keys are zeroed
    # after: kept keys have s - m <= 0 already, the clamp only stops a masked one overflowing.
    p = s.sub_(m).clamp_(max=0).exp_().mul_(mask[:, None, None])
    p.div_(p.sum(dim=-1, keepdim=True) + torch.exp(sink - m))
    o = torch.einsum("bkgql,blkd->bqkgd", p, v.float())
    return o.reshape(B, Q, Hq, D).to(q.dtype)


def _window_mask(qpos: torch.Tensor, kpos: torch.Tensor, kvalid: torch.Tensor, window: int | None) -> torch.Tensor:
    """qpos [B,Q], kpos [B,L], kvalid [B,L] -> [B,Q,L] causal (+ sliding window) mask."""
    m = (kpos[:, None, :] <= qpos[:, :, None]) & kvalid[:, None, :]
    if window is not None:
        m &= (qpos[:, :, None] - kpos[:, None, :]) < window
    return m


class _Varlen:
    """Index maps between flat [N, ...] tokens and padded [B, Qmax, ...]."""

    def __init__(self, query_start: torch.Tensor):
        qs = query_start.to(torch.long)
        lens = qs[1:] - qs[:-1]
        self.B = lens.numel()
        self.qmax = int(lens.max()) if self.B else 0
        ar = torch.arange(self.qmax, device=qs.device)
        self.valid = ar[None, :] < lens[:, None]                      # [B, Qmax]
        self.index = (qs[:-1, None] + ar[None, :]).clamp(max=max(int(qs[-1]) - 1, 0))
        self.lens = lens

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.index]

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.valid]


@dataclass
class DenseMetadata:
    """Flattened sequences with no cache: token i of sequence b sits at position i."""
    query_start: torch.Tensor  # [B+1] cumulative token counts
    _vl: _Varlen = field(init=False, repr=False)

    def __post_init__(self):
        self._vl = _Varlen(self.query_start)

    @classmethod
    def single(cls, n: int, device=None) -> "DenseMetadata":
        return cls(torch.tensor([0, n], device=device))

    def attend(self, layer: int, q, k, v, sinks, window: int | None, scale: float) -> torch.Tensor:
        vl = self._vl
        pos = torch.arange(vl.qmax, device=q.device).expand(vl.B, -1)
        mask = _window_mask(pos, pos, vl.valid, window)
        out = attention_with_sinks(vl.pad(q), vl.pad(k), vl.pad(v), sinks, mask, scale)
        return vl.unpad(out)


@dataclass
class KVCache:
    """Per-layer paged K/V pools: k[layer], v[layer] are [num_blocks, block_size, K, D].

    Layers of one group (e.g. all sliding-window layers) share block tables,
    so their pools have the same number of blocks; groups may differ in size.
    """
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(cls, num_layers: int, blocks_per_layer: list[int], block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device="cpu") -> "KVCache":
        # an fp8 pool is zeroed as bytes (e4m3's 0x00 is +0), for the reason store_rows gives
        raw = torch.uint8 if dtype == torch.float8_e4m3fn else dtype

        def pools() -> list[torch.Tensor]:
            return [torch.zeros((blocks_per_layer[i], block_size, kv_heads, head_dim), dtype=raw,
                                device=device).view(dtype) for i in range(num_layers)]
        return cls(pools(), pools(), block_size)


@dataclass
class _Part:
    """Sequences attended together: all decodes in one part, each prefill chunk in its own,
    so one-token queries are never padded to a long chunk."""
    seqs: torch.Tensor
    rows: torch.Tensor
    vl: _Varlen
    plans: dict = field(default_factory=dict)


@dataclass
class PagedMetadata:
    """One engine step over the paged cache.

    query_start [B+1]: new tokens of sequence b are flat rows qs[b]:qs[b+1].
    context_lens [B]: tokens of b in the cache after this step (cached + new),
    so the new tokens sit at positions context_len - q_len ... context_len - 1.
    block_tables[group] [B, max_blocks]: physical block of each logical block;
    entries for blocks a window no longer sees may be NULL_BLOCK.
    slot_mapping[group] [N]: flat slot (block * block_size + offset) per new token.
    layer_group[layer]: which group's tables a layer uses.
    max_query_len: longest q_len, when the caller knows it without a device read
    (the executor from its CPU tensors; 1 for a decode step captured in a CUDA graph).
    token_mask [N] bool: which rows are real tokens (None = all); a CUDA-graph
    step padded to its bucket counts only real rows in the MoE's expert load.
    static: the step is captured in a CUDA graph, so no layer may read a device
    value on the host (the expert-parallel MoE then combines by all-reduce).

    Nothing here reads device values on the host unless the torch path runs:
    its per-part plans are built on its first attend, so the Triton path
    (dispatch.use_triton) stays free of host syncs and capturable in a graph.
    """
    cache: KVCache
    query_start: torch.Tensor
    context_lens: torch.Tensor
    block_tables: dict[str, torch.Tensor]
    slot_mapping: dict[str, torch.Tensor]
    layer_group: list[str]
    max_query_len: int | None = None
    token_mask: torch.Tensor | None = None
    static: bool = False
    _parts_cache: list | None = field(default=None, init=False, repr=False)

    @property
    def _parts(self) -> list:
        if self._parts_cache is None:
            self._parts_cache = self._split_parts()
        return self._parts_cache

    def _split_parts(self) -> list:
        qs = self.query_start.to(torch.long)
        lens = qs[1:] - qs[:-1]
        dev = qs.device
        groups = []
        decode = (lens == 1).nonzero().squeeze(1)
        if decode.numel():
            groups.append(decode)
        groups += [b.view(1) for b in (lens > 1).nonzero().squeeze(1)]
        parts = []
        for seqs in groups:
            sl = lens[seqs]
            # a decode part has one row per sequence; a prefill part is one sequence's chunk
            rows = qs[seqs] if int(sl.max()) == 1 else torch.arange(int(qs[seqs[0]]), int(qs[seqs[0] + 1]),
                                                                   device=dev)
            sub_qs = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), sl.cumsum(0)])
            parts.append(_Part(seqs, rows, _Varlen(sub_qs)))
        return parts

    def _plan(self, part: _Part, group: str, window: int | None):
        """Cache rows to read per sequence and the mask; shared by all layers of a group.

        The rows index a pool viewed as [slots * kv_heads, head_dim] and come out ordered
        [sequence, kv head, key]: one index_select then gives k/v in the [B, K, L, D] memory
        layout that attention_with_sinks' einsums use, so they run without permuting copies."""
        key = (group, window)
        if key in part.plans:
            return part.plans[key]
        vl, bs = part.vl, self.cache.block_size
        ctx = self.context_lens.to(torch.long)[part.seqs]
        first_q = ctx - vl.lens
        qpos = first_q[:, None] + torch.arange(vl.qmax, device=ctx.device)[None, :]
        if window is None:
            start_blk = torch.zeros_like(ctx)
        else:  # skip blocks entirely outside every query's window
            start_blk = (first_q - window + 1).clamp(min=0) // bs
        end_blk = (ctx + bs - 1) // bs
        nb = int((end_blk - start_blk).max()) if vl.B else 0
        j = start_blk[:, None] + torch.arange(nb, device=ctx.device)[None, :]
        blk_valid = j < end_blk[:, None]
        table = self.block_tables[group][part.seqs]
        phys = torch.gather(table, 1, j.clamp(max=table.shape[1] - 1))
        phys = torch.where(blk_valid, phys, torch.full_like(phys, NULL_BLOCK))
        offs = torch.arange(bs, device=ctx.device)
        kpos = (j[:, :, None] * bs + offs).reshape(vl.B, nb * bs)
        kvalid = kpos < ctx[:, None]
        mask = _window_mask(qpos, kpos, kvalid, window)
        heads = self.cache.k[0].shape[2]
        slots = (phys[:, :, None] * bs + offs).reshape(vl.B, 1, nb * bs)
        rows = (slots * heads + torch.arange(heads, device=ctx.device)[:, None]).flatten()
        part.plans[key] = (rows, mask)
        return rows, mask

    def _max_query_len(self) -> int:
        if self.max_query_len is None:  # one host read per step, not per layer
            self.max_query_len = int((self.query_start[1:] - self.query_start[:-1]).max()) \
                if self.context_lens.numel() else 0
        return self.max_query_len

    def rope_into_cache(self, layer: int, q, k, v, cos, sin) -> torch.Tensor:
        """Rotate q and k and store this step's k and v in the layer's cache (one launch on the Triton
        path); returns the rotated q, for attend(layer, q, None, None, ...)."""
        slots = self.slot_mapping[self.layer_group[layer]]
        return dispatch.rope_into_cache(q, k, v, cos, sin, self.cache.k[layer], self.cache.v[layer], slots)

    def rotate_and_attend(self, layer: int, q, k, v, cos, sin, sinks, window: int | None, scale: float):
        """The Triton path's rotary, cache writes and attention: in one launch for a decode step (every
        sequence one new token), else rope_into_cache's launch, then attend's."""
        if self._max_query_len() != 1:
            return self.attend(layer, self.rope_into_cache(layer, q, k, v, cos, sin), None, None, sinks, window,
                               scale)
        group = self.layer_group[layer]
        return dispatch.paged_attention(q, self.cache.k[layer], self.cache.v[layer], self.block_tables[group],
                                        self.query_start, self.context_lens, sinks, window, scale, max_query_len=1,
                                        rope=(k, v, cos, sin, self.slot_mapping[group]))

    def attend(self, layer: int, q, k, v, sinks, window: int | None, scale: float) -> torch.Tensor:
        """k, v None: already in the cache (rope_into_cache)."""
        group = self.layer_group[layer]
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        if k is not None:
            slots = self.slot_mapping[group]
            store_rows(kc, slots, k)
            store_rows(vc, slots, v)
        if dispatch.use_triton(q.device):
            return dispatch.paged_attention(q, kc, vc, self.block_tables[group], self.query_start,
                                            self.context_lens, sinks, window, scale,
                                            max_query_len=self._max_query_len())
        out = torch.empty_like(q)
        K, D = kc.shape[2:]
        for part in self._parts:
            rows, mask = self._plan(part, group, window)
            B, L = mask.shape[0], mask.shape[2]
            # [B, K, L, D] in memory, handed over as the [B, L, K, D] view the reference takes
            kk = gather_rows(kc, rows).view(B, K, L, D).transpose(1, 2)
            vv = gather_rows(vc, rows).view(B, K, L, D).transpose(1, 2)
            res = attention_with_sinks(part.vl.pad(q[part.rows]), kk.to(q.dtype), vv.to(q.dtype), sinks, mask, scale)
            out[part.rows] = part.vl.unpad(res)
        return out
