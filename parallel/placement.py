"""Expert placement from observed load: balance EP ranks, copy hot experts.

`plan_placement` takes per-expert token counts (summed over layers; one
placement serves every layer) and returns, for each EP rank, the experts it
holds. With `redundant` extra slots, the hottest experts (by load per copy)
get extra copies on other ranks; the MoE layer splits a replicated expert's
tokens between its copies. Assignment is longest-processing-time first onto
the least-loaded rank with a free slot, every rank getting the same number
of slots so memory stays even.
"""

from __future__ import annotations

import torch


def plan_placement(load: torch.Tensor, ep: int, redundant: int = 0) -> list[tuple[int, ...]]:
    total = load.reshape(-1, load.shape[-1]).sum(0).double()
    E = total.numel()
    if not 0 <= redundant <= E * (ep - 1):
        raise ValueError(f"redundant={redundant} must be between 0 and {E * (ep - 1)}")
    copies = [1] * E
    for _ in range(redundant):
        e = max((e for e in range(E) if copies[e] < ep), key=lambda e: (total[e] / copies[e]).item())
        copies[e] += 1
    slots = -(-(E + redundant) // ep)
    items = sorted(((total[e].item() / copies[e], e) for e in range(E) for _ in range(copies[e])), reverse=True)
    held: list[list[int]] = [[] for _ in range(ep)]
    rank_load = [0.0] * ep
    for w, e in items:
        r = min((r for r in range(ep) if len(held[r]) < slots and e not in held[r]), key=lambda r: rank_load[r])
        held[r].append(e)
        rank_load[r] += w
    return [tuple(sorted(h)) for h in held]


def rank_loads(load: torch.Tensor, placement: list[tuple[int, ...]]) -> list[float]:
    """Expected tokens per rank when each expert's tokens split evenly over its copies."""
    total = load.reshape(-1, load.shape[-1]).sum(0).double()
    n = [sum(e in p for p in placement) for e in range(total.numel())]
    return [sum(total[e].item() / n[e] for e in p) for p in placement]


def imbalance(per_rank: list[float]) -> float:
    """max / mean: 1.0 is perfectly balanced."""
    mean = sum(per_rank) / len(per_rank)
    return max(per_rank) / mean if mean else 1.0
