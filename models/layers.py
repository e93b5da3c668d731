"""Building blocks of the gpt-oss model: norm, RoPE, fused QKV, output
projection, MoE. Each holds only its shard (a head range, a set of experts),
so the parallel layer can reuse them and add the collectives around them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels import dispatch  # kernel modules load lazily, on the first Triton call

from .config import GptOssConfig
from .weights import ExpertWeights


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        # kept in fp32, as the reference does: the norm is where bf16 loses most
        self.register_buffer("weight", weight.float(), persistent=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.use_triton(x.device):
            return dispatch.rmsnorm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def yarn_inv_freq(cfg: GptOssConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale ("concentration") of YaRN RoPE."""
    d, base = cfg.head_dim, cfg.rope_theta
    rs = cfg.rope_scaling
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if rs.factor <= 1.0:
        return 1.0 / pos_freqs, 1.0

    def corr_dim(rot: float) -> float:
        return d * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(rs.beta_fast), corr_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp  # 1 where the dimension keeps its original frequency
    inv = (1.0 / (rs.factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    return inv, 0.1 * math.log(rs.factor) + 1.0


class Rotary(nn.Module):
    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        inv, self.mscale = yarn_inv_freq(cfg)
        self.register_buffer("inv_freq", inv, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        f = positions.float()[:, None] * self.inv_freq[None, :]
        return (f.cos() * self.mscale).to(dtype), (f.sin() * self.mscale).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [N, heads, D]; rotates the two halves (not interleaved pairs)."""
        a, b = x.chunk(2, dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((a * c - b * s, b * c + a * s), dim=-1)

    @staticmethod
    def apply_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(apply(q), apply(k)): one Triton launch where dispatch.use_triton (the same roundings), else
        the two torch rotations above (about 7 kernels each on CUDA)."""
        if dispatch.use_triton(q.device):
            return dispatch.rope(q, k, cos, sin)
        return Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)


class QKVLinear(nn.Module):
    """Fused q/k/v projection for this shard's query and KV heads."""

    def __init__(self, w: dict[str, torch.Tensor], head_dim: int):
        super().__init__()
        self.nq = w["q_w"].shape[0] // head_dim
        self.nkv = w["k_w"].shape[0] // head_dim
        self.head_dim = head_dim
        self.register_buffer("weight", torch.cat([w["q_w"], w["k_w"], w["v_w"]]), persistent=False)
        self.register_buffer("bias", torch.cat([w["q_b"], w["k_b"], w["v_b"]]), persistent=False)

    def forward(self, x: torch.Tensor):
        qkv = dispatch.linear(x, self.weight, self.bias)
        d = self.head_dim
        q, k, v = qkv.split([self.nq * d, self.nkv * d, self.nkv * d], dim=-1)
        return q.view(-1, self.nq, d), k.view(-1, self.nkv, d), v.view(-1, self.nkv, d)


def _onednn_packing() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class PackedLinear:
    """`F.linear(x, weight)` for a large fp32 CPU weight, through oneDNN on a copy of the
    weight reordered once into oneDNN's blocked layout.

    Made for the unembedding ([a few dozen rows, hidden] x [hidden, 201088]): measured on
    the benchmark's mix of batch sizes it is ~1.6x faster than MKL's sgemm on the plain
    weight, which also drops into a slow path for 4..11 rows. In our checks oneDNN's value
    for a row depends neither on how many rows are batched nor on the thread count, and
    equals MKL's for 12 rows or more (fewer rows take other MKL kernels, whose last bits
    differ). Costs one more copy of the weight; anything else (CUDA, other dtypes, no
    rows) takes dispatch.linear (F.linear, or a measured Triton launch on a GPU).
    """

    available = _onednn_packing()

    def __init__(self):
        self._plain: torch.Tensor | None = None  # the weight the packed copy was made from
        self._packed: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not (self.available and x.shape[0] and weight.device.type == "cpu"
                and weight.dtype == x.dtype == torch.float32 and x.dim() == 2 and weight.dim() == 2):
            return dispatch.linear(x, weight)
        if self._plain is not weight:  # first call, or the model's weight was replaced
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self._plain = weight
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")


class RowLinear(nn.Module):
    """Output projection over this shard's heads; a sharded caller sums the partials."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.linear(x, self.weight, self.bias)


def swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU over interleaved (gate, linear) columns."""
    gate = gate_up[..., 0::2].clamp(max=limit)
    lin = gate_up[..., 1::2].clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (lin + 1)


def add_norm(out: torch.Tensor, residual: torch.Tensor | None, norm):
    """residual + out, and with `norm` (an RMSNorm) (that, norm(that)): one fused kernel on the GPU."""
    if residual is None:
        return out
    if norm is None:
        return residual + out
    if dispatch.use_triton(out.device):
        h, x = dispatch.rmsnorm(out, norm.weight, norm.eps, residual=residual)
        return x, h
    x = residual + out
    return x, norm(x)


class MoE(nn.Module):
    """Top-k router over all experts; computes this shard's experts.

    Single process: the full MoE. Over several ranks, the ranks holding the
    same tokens (the split group) each take a slice of them. Each rank sends
    every (token, expert) pair of its slice to the EP rank owning that expert
    (all-to-all, sizes exchanged first), gets the expert outputs back and
    combines them; the split group then gathers the slices. `copies` says which
    EP ranks hold each expert: a hot expert may live on several, and its pairs
    are split between the copies.

    The all-to-all sizes are read on the host, which a CUDA graph cannot
    capture. So a static step (a decode step replayed as a graph) whose tokens
    the whole EP group holds combines by all-reduce instead ("all_reduce"):
    every EP rank routes all tokens, runs the pairs it owns (`owners`: the
    copies of an expert take turns), and the EP group sums the partial
    outputs: fixed shapes, no host reads, and one [N, hidden] all-reduce in
    place of two all-to-alls of the pairs and a gather. `combine` forces one way for every step
    ("all_to_all" or "all_reduce"); "auto" takes the all-reduce for static steps only.
    Under attention data parallelism (each attention group holds its own tokens, padded to one
    bucket) a static step gathers the EP group's tokens first, each TP rank sending a share of its
    group's, and sums by reduce-scatter, each rank keeping its share (`_gathered`): the same fixed
    shapes, the all-reduce's traffic.
    With one EP rank, the split group's slices need no exchange either way.
    """

    COMBINES = ("auto", "all_to_all", "all_reduce")

    def __init__(self, cfg: GptOssConfig, router_w: torch.Tensor, router_b: torch.Tensor, experts: ExpertWeights,
                 comm=None, copies: list[list[int]] | None = None, combine: str = "auto"):
        super().__init__()
        if combine not in self.COMBINES:
            raise ValueError(f"combine must be one of {self.COMBINES}, got {combine!r}")
        self.combine = combine
        self.top_k = cfg.num_experts_per_tok
        self.limit, self.alpha = cfg.swiglu_limit, cfg.swiglu_alpha
        self.comm = comm
        self.register_buffer("router_w", router_w, persistent=False)
        self.register_buffer("router_b", router_b, persistent=False)
        local = torch.full((cfg.num_local_experts,), -1, dtype=torch.long)
        local[list(experts.ids)] = torch.arange(len(experts.ids))
        self.register_buffer("global_to_local", local, persistent=False)
        self.expert_ids = experts.ids
        self.identity_map = list(experts.ids) == list(range(cfg.num_local_experts))
        copies = copies or [[0] for _ in range(cfg.num_local_experts)]
        width = max(len(c) for c in copies)
        # one more row for expert id E (a graph's padding rows, MoE.route's drop_masked): owned by no rank
        self.register_buffer("copy_rank", torch.tensor([c + [c[0]] * (width - len(c)) for c in copies]
                                                       + [[-1] * width]), persistent=False)
        self.register_buffer("n_copies", torch.tensor([len(c) for c in copies] + [1]), persistent=False)
        # all-reduce combine: a pair this rank does not own is sent to expert id E, which maps to -1 (skipped)
        self.ep_rank = comm.ep_rank if comm is not None else 0
        self.register_buffer("local_or_skip", torch.cat([local, local.new_full((1,), -1)]), persistent=False)
        # under the all-reduce every rank routes every token: one rank counts the expert load
        self.counts_all = comm is None or comm.rank == 0
        # tokens routed to each expert since the last reset (expert-load stats)
        self.register_buffer("load", torch.zeros(cfg.num_local_experts, dtype=torch.long), persistent=False)
        # (token, expert) pairs the all-to-all brought this rank: the EP load it carries in prefill and
        # mixed steps (the all-reduce combine of decode steps exchanges no pairs and counts none)
        self.received = 0
        for name in ("b1", "b2", "w1", "w2", "w1_blocks", "w1_scales", "w2_blocks", "w2_scales"):
            t = getattr(experts, name)
            if t is not None:
                self.register_buffer(name, t, persistent=False)

    @property
    def packed(self) -> bool:
        """Experts kept as MXFP4 blocks: the Triton MoE reads these directly."""
        return getattr(self, "w1_blocks", None) is not None

    @property
    def alone(self) -> bool:
        """All tokens and all experts in this process: no split group or EP group to exchange with."""
        c = self.comm
        return c is None or (c.split_size == 1 and c.ep_size == 1)

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, count: bool = True,
              drop_masked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """count: add the routed tokens (token_mask's rows) to the expert load (index_add_, not bincount,
        which reads its max back to the host: a CUDA graph cannot capture that). drop_masked: the rows
        token_mask leaves out (a graph's padding) get expert id E, which local_or_skip maps to none.
        On the GPU one launch instead of five (kernels/route.py)."""
        logits = dispatch.linear(x, self.router_w, self.router_b)
        return dispatch.route(logits, self.top_k, self.load if count else None, token_mask, drop_masked)

    def expert_weights(self, j: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(self, "w1", None) is not None:
            return self.w1[j], self.w2[j]
        from . import mxfp4  # packed experts: decode just this one
        return (mxfp4.decode(self.w1_blocks[j], self.w1_scales[j], dtype),
                mxfp4.decode(self.w2_blocks[j], self.w2_scales[j], dtype))

    def _moe_kernel(self, x, routing, top_k, global_to_local, residual=None, norm=None):
        return dispatch.moe(x, routing, self.w1_blocks, self.w1_scales, self.b1, self.w2_blocks, self.w2_scales,
                            self.b2, top_k=top_k, global_to_local=global_to_local, limit=self.limit,
                            alpha=self.alpha, residual=residual,
                            norm=None if norm is None else (norm.weight, norm.eps))

    def run_experts(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """rows[i] through local expert local_ids[i] (unweighted), grouped by expert."""
        if self.packed and dispatch.use_triton(rows.device):
            # the EP path: each (row, expert) pair is a one-expert "token" with weight 1 (exact in fp32)
            return self._moe_kernel(rows, (local_ids[:, None], rows.new_ones(len(rows), 1)), 1, None)
        out = torch.empty_like(rows)
        order = torch.argsort(local_ids, stable=True)
        counts = torch.bincount(local_ids, minlength=len(self.expert_ids))
        start = 0
        for j, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            sel = order[start:start + c]
            w1, w2 = self.expert_weights(j, rows.dtype)
            h = swiglu(torch.nn.functional.linear(rows[sel], w1, self.b1[j]), self.limit, self.alpha)
            out[sel] = torch.nn.functional.linear(h, w2, self.b2[j])
            start += c
        return out

    def compute(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                local_map: torch.Tensor | None = None, residual: torch.Tensor | None = None, norm=None):
        """Weighted sum over the local experts among each token's top-k (absent ones skipped).
        local_map[e]: this rank's index of expert e, -1 = skip (default: global_to_local);
        residual: returns residual + that sum (the kernel adds it in its combine); norm (an RMSNorm),
        with residual: returns (that, norm(that)) (the kernel's combine normalises it too)."""
        if self.packed and dispatch.use_triton(x.device):
            # every expert here in router order (no EP): router ids are local ids, no map to read
            g2l = local_map if local_map is not None else None if self.identity_map else self.global_to_local
            return self._moe_kernel(x, (idx, weights), self.top_k, g2l, residual, norm)
        local = (self.global_to_local if local_map is None else local_map)[idx].flatten()
        keep = (local >= 0).nonzero().squeeze(1)
        tok = keep // self.top_k
        y = self.run_experts(x[tok], local[keep])
        out = torch.zeros_like(x).index_add_(0, tok, y * weights.flatten()[keep, None])
        return add_norm(out, residual, norm)

    def owners(self, idx: torch.Tensor) -> torch.Tensor:
        """EP rank that computes each (token, expert) pair; copies take turns; expert id E: -1 (none)."""
        flat = idx.flatten()
        slot = torch.arange(flat.numel(), device=flat.device) % self.n_copies[flat]
        return self.copy_rank[flat, slot]

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, static: bool = False,
                residual: torch.Tensor | None = None, norm=None):
        """token_mask [N] bool: the real rows (None = all); the others, a graph's padding, reach no expert
        and stay out of the expert load (their output is the residual alone). static: no host reads
        (the step is captured in a CUDA graph). residual: returns residual + the MoE output; norm (an
        RMSNorm, the next one the model applies), with residual: returns (that, norm(that))."""
        if self.alone:
            # a graph's padding rows (token_mask) reach no expert: no weight reads, no matmul rows for
            # them. Always through the map (one gather per pair): one kernel variant, masked or not
            idx, weights = self.route(x, token_mask, drop_masked=True)
            return self.compute(x, idx, weights, self.local_or_skip, residual, norm)
        return add_norm(self._exchange(x, token_mask, static), residual, norm)

    def forward_block(self, o: torch.Tensor, residual: torch.Tensor, mlp_norm, token_mask: torch.Tensor | None,
                      norm=None):
        """forward(mlp_norm(residual + o), token_mask, residual=residual + o, norm=norm) in one call where
        kernels.moe_gate's fused gate applies (packed experts, one process, a decode step's few rows on the
        Triton path: dispatch.fuses_gate), the add, norm, router, routing and align in one launch; else None."""
        if not (self.packed and self.alone and dispatch.fuses_gate(o)):
            return None
        return dispatch.moe_block(o, residual, (mlp_norm.weight, mlp_norm.eps), self.router_w, self.router_b,
                                  self.w1_blocks, self.w1_scales, self.b1, self.w2_blocks, self.w2_scales, self.b2,
                                  top_k=self.top_k, global_to_local=self.local_or_skip, load=self.load,
                                  token_mask=token_mask, drop_masked=True, limit=self.limit, alpha=self.alpha,
                                  norm=None if norm is None else (norm.weight, norm.eps))

    def _gathered(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention DP, every decode step padded to one bucket: each TP rank of a group takes an equal
        share of its group's rows (the group's TP ranks hold the same rows), the EP group gathers all
        shares, so each token is routed once, runs the pairs owned here, and reduce-scatters the sums;
        the TP group then reassembles its rows. Fixed shapes, no host reads (a CUDA graph captures it)."""
        c = self.comm
        n, t = x.shape[0], c.split_size
        s = -(-n // t)
        if s * t != n:  # a share per TP rank: pad with rows that count in no load
            x = torch.cat([x, x.new_zeros(s * t - n, *x.shape[1:])])
            keep = torch.arange(s * t, device=x.device) < n
            token_mask = keep if token_mask is None else torch.cat([token_mask, keep[n:]])
        lo = c.split_rank * s
        xs, ms = x[lo:lo + s], None if token_mask is None else token_mask[lo:lo + s]
        xa = c.ep_all_gather_rows(xs)
        ma = None if ms is None else c.ep_all_gather_rows(ms.to(torch.uint8)).bool()
        out = c.ep_reduce_scatter_rows(self._owned_pairs(xa, ma))
        return c.split_all_gather_rows(out, [s] * t)[:n]

    def _owned_pairs(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """Every EP rank routes all of x; this rank's share of the MoE output: the (token, expert)
        pairs it owns (copies of a hot expert take turns, as in the all-to-all), each computed once
        in the EP group. One rank counts the expert load."""
        idx, weights = self.route(x, token_mask, count=self.counts_all, drop_masked=True)
        mine = torch.where(self.owners(idx).view_as(idx) == self.ep_rank, idx, len(self.global_to_local))
        return self.compute(x, mine, weights, self.local_or_skip)

    def _exchange(self, x: torch.Tensor, token_mask: torch.Tensor | None, static: bool) -> torch.Tensor:
        """The MoE output over several ranks (see the class doc)."""
        c = self.comm
        if c.ep_size > 1 and c.ep_replicated and (self.combine == "all_reduce"
                                                  or (self.combine == "auto" and static)):
            return c.ep_all_reduce(self._owned_pairs(x, token_mask))
        if static and c.ep_size > 1 and self.combine != "all_to_all":
            return self._gathered(x, token_mask)
        if static and c.ep_size > 1:
            raise RuntimeError("a static MoE step needs the all-reduce combine or, under attention DP, the "
                               "gathered one: combine must not be 'all_to_all'")
        n, t = x.shape[0], c.split_size
        counts = [n // t + (1 if r < n % t else 0) for r in range(t)]
        start = sum(counts[:c.split_rank])
        xs = x[start:start + counts[c.split_rank]]
        mask = None if token_mask is None else token_mask[start:start + counts[c.split_rank]]
        idx, weights = self.route(xs, mask)
        if c.ep_size == 1:  # every rank holds every expert: its slice needs no exchange
            return c.split_all_gather_rows(self.compute(xs, idx, weights), counts)
        dest = self.owners(idx)
        order = torch.argsort(dest, stable=True)
        send = torch.bincount(dest, minlength=c.ep_size).tolist()
        tok = order // self.top_k
        rows, recv = c.ep_all_to_all(xs[tok], send)
        eids, _ = c.ep_all_to_all(idx.flatten()[order], send)
        self.received += int(rows.shape[0])
        y = self.run_experts(rows, self.global_to_local[eids])
        back = c.ep_all_to_all_back(y, send, recv)
        out = torch.zeros_like(xs).index_add_(0, tok, back * weights.flatten()[order, None])
        return c.split_all_gather_rows(out, counts)
