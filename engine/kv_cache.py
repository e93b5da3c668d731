"""Paged KV block management with automatic prefix caching.

Two pools: "full" for full-attention layers and "sliding" for sliding-window
layers. A sequence has one block table per pool, indexed by logical block
(tokens [i*bs, (i+1)*bs)). Sliding tables drop blocks the window can no
longer see, so a long conversation holds at most window/bs + 2 sliding blocks.

Prefix caching: every full block gets a hash chained from its predecessor
(hash(parent, tokens)). A block whose last user leaves keeps its hash and
joins an LRU of evictable blocks: a later request with the same prefix takes
it back instead of recomputing; allocation evicts the oldest when the free
list is empty. Sliding blocks are hashed the same way, so a hit also restores
the window of sliding KV just before the hit point.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from models.attention import NULL_BLOCK


class _Pool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError("a KV pool needs at least 2 blocks (block 0 is the null block)")
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() yields 1, 2, ...
        self.ref = [0] * num_blocks
        self.hash_of: dict[int, int] = {}          # block -> hash
        self.by_hash: dict[int, int] = {}          # hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but cached, oldest first

    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    def alloc(self) -> int | None:
        if self.free:
            b = self.free.pop()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(b)]
        else:
            return None
        self.ref[b] = 1
        return b

    def take_cached(self, h: int) -> int | None:
        b = self.by_hash.get(h)
        if b is None:
            return None
        if self.ref[b] == 0:
            self.evictable.pop(b, None)
        self.ref[b] += 1
        return b

    def release(self, b: int):
        if b == NULL_BLOCK:
            return
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if b in self.hash_of:
                self.evictable[b] = None
            else:
                self.free.append(b)

    def register(self, b: int, h: int):
        if b in self.hash_of or h in self.by_hash:
            return  # an identical block is already cached: keep the first
        self.hash_of[b] = h
        self.by_hash[h] = b

    def used(self) -> int:
        return self.num_blocks - 1 - self.available()


@dataclass
class SeqBlocks:
    tables: dict[str, list[int]] = field(default_factory=lambda: {"full": [], "sliding": []})
    hashes: list[int] = field(default_factory=list)   # chain hashes of completed full blocks
    slid: int = 0  # sliding-table entries before this index are released (NULL_BLOCK)
    group: int | None = None  # attention data parallelism: whose pools hold the blocks (engine.data_parallel)


class BlockManager:
    def __init__(self, num_full_blocks: int, num_sliding_blocks: int, block_size: int, window: int | None,
                 enable_prefix_cache: bool = True):
        self.bs = block_size
        self.window = window
        self.pools = {"full": _Pool(num_full_blocks)}
        if window is not None:
            self.pools["sliding"] = _Pool(num_sliding_blocks)
        self.prefix_cache = enable_prefix_cache
        self.hit_tokens = 0
        self.query_tokens = 0

    @property
    def pool_names(self) -> list[str]:
        return list(self.pools)

    def shares_pool(self, a: SeqBlocks, b: SeqBlocks) -> bool:
        """Whether freeing a's blocks can make room for b's (always, with one set of pools)."""
        return True

    # ---- prefix cache ------------------------------------------------------
    def _chain(self, tokens: list[int], n_blocks: int, parent: int = 0) -> list[int]:
        out = []
        for i in range(n_blocks):
            parent = hash((parent, tuple(tokens[i * self.bs:(i + 1) * self.bs])))
            out.append(parent)
        return out

    def chain(self, tokens: list[int]) -> list[int]:
        """The hashes of the full blocks a prompt's prefix match may use."""
        return self._chain(tokens, (len(tokens) - 1) // self.bs) if self.prefix_cache else []

    def cached_blocks(self, chain: list[int]) -> int:
        """How many leading blocks of `chain` the full pool holds (a probe: takes nothing)."""
        by_hash, k = self.pools["full"].by_hash, 0
        while k < len(chain) and chain[k] in by_hash:
            k += 1
        return k

    def match_prefix(self, seq: SeqBlocks, tokens: list[int]) -> int:
        """Attach cached blocks for the longest usable prefix; returns the tokens covered.

        At least one token is always left to compute (its logits are needed)."""
        if not self.prefix_cache:
            return 0
        n = (len(tokens) - 1) // self.bs
        chain = self._chain(tokens, n)
        full = self.pools["full"]
        k = 0
        while k < n and chain[k] in full.by_hash:
            k += 1
        sl = self.pools.get("sliding")
        while k > 0 and sl is not None:  # the window before the hit point must be cached too
            lo = max(0, k * self.bs - self.window) // self.bs
            if all(chain[i] in sl.by_hash for i in range(lo, k)):
                break
            k -= 1
        self.query_tokens += len(tokens)
        if k == 0:
            return 0
        seq.tables["full"] = [full.take_cached(h) for h in chain[:k]]
        if sl is not None:
            lo = max(0, k * self.bs - self.window) // self.bs
            seq.tables["sliding"] = [NULL_BLOCK] * lo + [sl.take_cached(h) for h in chain[lo:k]]
            seq.slid = lo
        seq.hashes = chain[:k]
        self.hit_tokens += k * self.bs
        return k * self.bs

    def commit_full_blocks(self, seq: SeqBlocks, tokens: list[int], num_computed: int):
        """Hash and register blocks completed by the tokens computed so far."""
        if not self.prefix_cache:
            return
        done = num_computed // self.bs
        if done <= len(seq.hashes):
            return
        start = len(seq.hashes)
        parent = seq.hashes[-1] if seq.hashes else 0
        new = self._chain(tokens[start * self.bs:], done - start, parent)
        for i, h in enumerate(new, start):
            for name, pool in self.pools.items():
                b = seq.tables[name][i]
                if b != NULL_BLOCK:
                    pool.register(b, h)
        seq.hashes.extend(new)

    # ---- allocation ----------------------------------------------------------
    def blocks_needed(self, seq: SeqBlocks, total_tokens: int) -> dict[str, int]:
        need = -(-total_tokens // self.bs)
        return {name: max(0, need - len(seq.tables[name])) for name in self.pools}

    def can_allocate(self, seq: SeqBlocks, total_tokens: int) -> bool:
        return all(self.pools[n].available() >= k for n, k in self.blocks_needed(seq, total_tokens).items())

    def allocate(self, seq: SeqBlocks, total_tokens: int) -> bool:
        """Grow the tables to hold `total_tokens`; all-or-nothing."""
        need = -(-total_tokens // self.bs)
        if all(len(seq.tables[n]) >= need for n in self.pools):  # most decode steps: the last block has room
            return True
        if not self.can_allocate(seq, total_tokens):
            return False
        for name, k in self.blocks_needed(seq, total_tokens).items():
            for _ in range(k):
                seq.tables[name].append(self.pools[name].alloc())
        return True

    def slide(self, seq: SeqBlocks, next_pos: int):
        """Release sliding blocks no query at position >= next_pos can attend to."""
        if self.window is None:
            return
        t, pool = seq.tables["sliding"], self.pools["sliding"]
        # block i is out of reach once (i + 1) * bs <= next_pos - window + 1; resume where the last
        # call stopped, so a step costs O(new releases), not O(context / block size) per sequence
        end = min(len(t), max(0, (next_pos - self.window + 1) // self.bs))
        for i in range(seq.slid, end):
            if t[i] != NULL_BLOCK:
                pool.release(t[i])
                t[i] = NULL_BLOCK
        seq.slid = max(seq.slid, end)

    def free(self, seq: SeqBlocks):
        for name, pool in self.pools.items():
            for b in seq.tables[name]:
                pool.release(b)
            seq.tables[name] = []
        seq.hashes = []
        seq.slid = 0

    def slot(self, seq: SeqBlocks, group: str, pos: int) -> int:
        return seq.tables[group][pos // self.bs] * self.bs + pos % self.bs

    def usage(self) -> dict[str, int]:
        out = {}
        for name, p in self.pools.items():
            out[f"{name}_used"] = p.used()
            out[f"{name}_free"] = p.available()
        return out

    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
