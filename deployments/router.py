"""Routing within a model: queue depth plus prefix affinity (a Ray Serve request router).

Each replica group caches the KV of prompt prefixes it has computed (engine
prefix cache, hash-chained blocks). A request whose prompt shares a long
prefix with one routed earlier should go to the group that computed it, unless
that group's queue is much longer than the shortest one; otherwise the usual
power-of-two-choices on queue length decides. `PrefixTable` is the pure part
(tested on its own); `PrefixAffinityRouter` plugs it into Serve.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, LocalityMixin, PendingRequest, RequestRouter, RunningReplica


def prefix_keys(prompt_ids: list[int], block: int, max_tokens: int, cache_key: str | None = None) -> list[bytes]:
    """Hash-chained keys of the prompt's full blocks, shortest prefix first. A cache key (the API's
    prompt_cache_key) starts the chain, so the same prefix under another key is another entry: traffic sharing
    a long system prompt spreads by key instead of piling onto the one group that computed it first."""
    keys = []
    h = b"" if cache_key is None else hashlib.blake2b(cache_key.encode(), digest_size=16).digest()
    n = min(len(prompt_ids), max_tokens) // block * block
    for i in range(0, n, block):
        h = hashlib.blake2b(h + repr(prompt_ids[i:i + block]).encode(), digest_size=16).digest()
        keys.append(h)
    return keys


class PrefixTable:
    """prefix key -> the replica that last computed it (LRU, bounded)."""

    def __init__(self, block: int = 16, min_tokens: int = 64, max_tokens: int = 4096,
                 imbalance: int = 8, max_entries: int = 200_000):
        self.block, self.min_blocks, self.max_tokens = block, max(1, min_tokens // block), max_tokens
        self.imbalance, self.max_entries = imbalance, max_entries
        self.owner: OrderedDict[bytes, str] = OrderedDict()

    def keys(self, prompt_ids: list[int], cache_key: str | None = None) -> list[bytes]:
        return prefix_keys(prompt_ids, self.block, self.max_tokens, cache_key)

    def lookup(self, keys: list[bytes], live: set[str]) -> tuple[str | None, int]:
        """The live replica holding the longest cached prefix (of >= min_tokens), and its length in blocks."""
        for n in range(len(keys), self.min_blocks - 1, -1):
            rid = self.owner.get(keys[n - 1])
            if rid is not None and rid in live:
                return rid, n
        return None, 0

    def record(self, keys: list[bytes], replica: str) -> None:
        for k in keys:
            self.owner[k] = replica
            self.owner.move_to_end(k)
        while len(self.owner) > self.max_entries:
            self.owner.popitem(last=False)

    def forget(self, replica: str) -> None:
        for k in [k for k, r in self.owner.items() if r == replica]:
            del self.owner[k]

    def rank(self, keys: list[bytes], queue_lens: dict[str, int | None], rng=random) -> list[list[str]]:
        """Replica ids in preference ranks: the affine replica first (unless overloaded), then two
        random choices (Serve picks the shorter queue within a rank)."""
        ids = list(queue_lens)
        if not ids:
            return []
        hit, _ = self.lookup(keys, set(ids))
        known = [q for q in queue_lens.values() if q is not None]
        if hit is not None and queue_lens[hit] is not None and known and \
                queue_lens[hit] > min(known) + self.imbalance:
            hit = None  # the cache saving is not worth waiting behind a long queue
        others = [i for i in ids if i != hit]
        two = rng.sample(others, min(2, len(others)))
        return ([[hit]] if hit else []) + ([two] if two else [])


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, RequestRouter):
    def initialize_state(self, block: int = 16, min_prefix_tokens: int = 64, max_prefix_tokens: int = 4096,
                         imbalance: int = 8, **_):
        self.table = PrefixTable(block, min_prefix_tokens, max_prefix_tokens, imbalance)

    def _keys(self, pending: PendingRequest | None) -> list[bytes]:
        req = pending.args[0] if pending is not None and pending.args else None
        return self.table.keys(list(getattr(req, "prompt_ids", None) or []), getattr(req, "cache_key", None))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        lens = {rid: cache.get(r.replica_id) for rid, r in by_id.items()}
        ranks = self.table.rank(self._keys(pending_request), lens)
        return [[by_id[i] for i in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        self.table.record(self._keys(pending_request), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id.unique_id)
