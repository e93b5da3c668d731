"""The one function that decides who does what: `resolve_layout`.

World = max(tp, ep) ranks. Attention runs tensor-parallel in groups of `tp`
consecutive ranks; with world > tp there are world/tp such groups, which
either each serve their own share of the sequences (`attn_dp=True`, attention
data parallelism) or all run the same batch (replicated attention, what the
engine uses today). Experts are spread over groups of `ep` consecutive ranks;
with ep < world each EP group holds every expert. Before the MoE, the ranks
holding the same tokens (the "split group": the TP group under attention DP,
else the whole world) each take a slice; each slice's (token, expert) pairs
travel to the ranks owning the experts inside the EP group, and the split
group gathers the slices back.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import GptOssConfig


class LayoutError(ValueError):
    """A TP/EP combination that cannot shard this model."""


@dataclass(frozen=True)
class RankLayout:
    rank: int
    world: int
    tp: int
    ep: int
    tp_rank: int
    dp_rank: int                 # which attention group (sequence share) this rank serves
    ep_rank: int
    tp_ranks: tuple[int, ...]    # global ranks of this rank's TP group
    ep_ranks: tuple[int, ...]    # global ranks of this rank's EP group
    split_ranks: tuple[int, ...]  # ranks holding the same tokens before the MoE
    split_rank: int
    q_heads: tuple[int, int]     # [start, stop) query heads kept
    kv_heads: tuple[int, int]    # [start, stop) KV heads kept (replicated when tp > KV heads)
    vocab: tuple[int, int]       # [start, stop) rows of the (un)embedding kept
    experts: tuple[int, ...]     # global ids of the experts this rank computes
    node: int                    # placement: which node the rank's bundle lands on
    local_gpu: int

    @property
    def dp(self) -> int:
        return self.world // self.tp


def contiguous_placement(num_experts: int, ep: int) -> list[tuple[int, ...]]:
    per, extra = divmod(num_experts, ep)
    out, start = [], 0
    for r in range(ep):
        n = per + (1 if r < extra else 0)
        out.append(tuple(range(start, start + n)))
        start += n
    return out


def resolve_layout(cfg: GptOssConfig, tp: int = 1, ep: int = 1, gpus_per_node: int = 8,
                   placement: list[tuple[int, ...]] | None = None, attn_dp: bool = False) -> list[RankLayout]:
    """Every rank's share of the model and its groups, for `tp` x `ep`."""
    for name, v in (("tp", tp), ("ep", ep), ("gpus_per_node", gpus_per_node)):
        if v < 1:
            raise LayoutError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    world = max(tp, ep)
    if world % tp or world % ep:
        raise LayoutError(f"--tp {tp} and --ep {ep}: the larger must be a multiple of the smaller")
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    if H % tp:
        raise LayoutError(f"--tp {tp} does not divide the {H} query heads")
    if tp > K and tp % K:
        raise LayoutError(f"--tp {tp} exceeds the {K} KV heads and is not a multiple of them")
    if tp <= K and K % tp:
        raise LayoutError(f"--tp {tp} does not divide the {K} KV heads")
    if attn_dp and world == tp:
        raise LayoutError(f"--attn-dp needs --ep larger than --tp (attention groups = ep / tp); --tp {tp} "
                          f"--ep {ep} makes one group")
    if ep > cfg.num_local_experts:
        raise LayoutError(f"--ep {ep} exceeds the {cfg.num_local_experts} experts")
    placement = placement or contiguous_placement(cfg.num_local_experts, ep)
    if len(placement) != ep:
        raise LayoutError(f"the expert placement has {len(placement)} ranks, expected {ep}")
    covered = {e for p in placement for e in p}
    if covered != set(range(cfg.num_local_experts)):
        raise LayoutError("the expert placement must cover every expert")
    V = cfg.vocab_size
    out = []
    for r in range(world):
        tr, dr = r % tp, r // tp
        er = r % ep
        qh = H // tp
        if tp <= K:
            kh = K // tp
            kv = (tr * kh, (tr + 1) * kh)
        else:  # several ranks share one KV head: each keeps a copy (GQA)
            kv_idx = tr * qh // (H // K)
            kv = (kv_idx, kv_idx + 1)
        vs = -(-V // tp)
        out.append(RankLayout(
            rank=r, world=world, tp=tp, ep=ep, tp_rank=tr, dp_rank=dr, ep_rank=er,
            tp_ranks=tuple(range(dr * tp, (dr + 1) * tp)),
            ep_ranks=tuple(range((r // ep) * ep, (r // ep + 1) * ep)),
            split_ranks=tuple(range(dr * tp, (dr + 1) * tp)) if attn_dp else tuple(range(world)),
            split_rank=tr if attn_dp else r,
            q_heads=(tr * qh, (tr + 1) * qh), kv_heads=kv,
            vocab=(min(tr * vs, V), min((tr + 1) * vs, V)), experts=tuple(placement[er]),
            node=r // gpus_per_node, local_gpu=r % gpus_per_node))
    return out


def shard_spec(me: RankLayout):
    """What rank `me` loads of the checkpoint: its experts and attention heads, and with tp > 1 its
    vocabulary rows (the (un)embedding is vocab-parallel then)."""
    from models import ShardSpec
    return ShardSpec(experts=me.experts, q_heads=me.q_heads, kv_heads=me.kv_heads,
                     vocab=me.vocab if me.tp > 1 else None)


def group_leads(layout: list[RankLayout], attn_dp: bool) -> list[int]:
    """The rank answering for each attention group's rows (its first TP rank), in group order;
    without attention DP every rank holds the same rows and rank 0 answers."""
    if not attn_dp:
        return [0]
    return [r.rank for r in sorted(layout, key=lambda r: r.dp_rank) if r.tp_rank == 0]


def placement_bundles(layout: list[RankLayout], use_gpu: bool, cpus_per_rank: float = 1.0) -> list[dict]:
    """Ray placement-group bundles, one per rank (a GPU each on GPU clusters)."""
    return [{"GPU": 1, "CPU": cpus_per_rank} if use_gpu else {"CPU": cpus_per_rank} for _ in layout]
