"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running sequences first (decodes and unfinished prefill chunks, in
arrival order), then waiting ones are admitted while the budget, the sequence
limit and the KV pools allow. When a running sequence cannot get a block, the
most recently admitted one of the lowest service tier is preempted: its
blocks are released (they stay in the prefix cache, so the recompute is
usually a cache hit) and it goes back to the front of its tier's queue with
its generated tokens as part of its prompt.

Service tiers (`GenerateRequest.priority`, lower first; the API's
`service_tier`): the waiting queue serves tiers in order, and a waiting
sequence that finds the batch full (`max_num_seqs`) or its pools short takes
the place of a running one of a strictly lower tier, so priority work never
waits behind flex work. Within one tier the order is arrival, as with no tiers.

The floor under flex (`promote_s`): a flex sequence that arrived `promote_s` ago
or more is scheduled as default work from then on: it is admitted in arrival
order among the default queue's sequences and default work no longer takes its
place, so sustained default (or priority and default) load cannot starve it, nor
a batch running on flex past its completion window. Priority work still comes
first, and still takes its place.
"""

from __future__ import annotations

import time
from collections import deque
from itertools import chain
from typing import Iterator

from .kv_cache import BlockManager
from .request import SERVICE_TIERS, ScheduledSeq, SchedulerOutput, Sequence

DEFAULT_TIER = SERVICE_TIERS["default"]


def tier_now(seq: Sequence, now: float, promote_s: float) -> int:
    """The tier `seq` is scheduled on at `now`: its own, or default once a lower one has waited promote_s
    since it arrived (0: never)."""
    if promote_s and seq.priority > DEFAULT_TIER and now - seq.t_arrival >= promote_s:
        return DEFAULT_TIER
    return seq.priority


class WaitQueue:
    """Waiting sequences: one FIFO per tier, the tiers served lowest priority value first (a lower tier's
    oldest sequence, once promoted (tier_now), in arrival order among the tier it is promoted to)."""

    def __init__(self, promote_s: float = 0.0):
        self.promote_s = promote_s
        self._tiers: dict[int, deque[Sequence]] = {}

    def _tier(self, seq: Sequence) -> deque[Sequence]:
        q = self._tiers.get(seq.priority)
        if q is None:
            q = self._tiers[seq.priority] = deque()
            self._tiers = dict(sorted(self._tiers.items()))
        return q

    def append(self, seq: Sequence):
        self._tier(seq).append(seq)

    def appendleft(self, seq: Sequence):
        """To the front of its own tier (a preempted or skipped sequence keeps its turn)."""
        self._tier(seq).appendleft(seq)

    def popleft(self, now: float | None = None) -> Sequence:
        """The next sequence to admit: each tier's head is its longest waiting, so only heads compete."""
        now = time.monotonic() if now is None else now
        heads = [q for q in self._tiers.values() if q]
        if not heads:
            raise IndexError("pop from an empty WaitQueue")
        return min(heads, key=lambda q: (tier_now(q[0], now, self.promote_s), q[0].t_arrival)).popleft()

    def remove(self, seq: Sequence):
        self._tiers[seq.priority].remove(seq)

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._tiers.get(seq.priority, ())

    def __len__(self) -> int:
        return sum(map(len, self._tiers.values()))

    def __bool__(self) -> bool:
        return any(self._tiers.values())

    def __iter__(self) -> Iterator[Sequence]:
        return chain.from_iterable(self._tiers.values())

    def by_tier(self) -> dict[int, int]:
        return {p: len(q) for p, q in self._tiers.items() if q}


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_tokens_per_step: int, promote_s: float = 0.0):
        """promote_s: the floor under flex (module docstring; 0: none)."""
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_tokens_per_step = max_tokens_per_step
        self.promote_s = promote_s
        self.waiting = WaitQueue(promote_s)
        self._now = 0.0
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def remove(self, seq: Sequence):
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.blocks)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence):
        self.running.remove(seq)
        self.blocks.free(seq.blocks)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _tier(self, seq: Sequence) -> int:
        return tier_now(seq, self._now, self.promote_s)

    def _victim(self, seq: Sequence) -> Sequence:
        """Who gives up blocks for seq: the lowest tier's most recently admitted, among those whose
        blocks come from the same pools (attention groups); seq itself when it is that one."""
        return max((v for v in reversed(self.running) if self.blocks.shares_pool(v.blocks, seq.blocks)),
                   key=self._tier)

    def _lower(self, seq: Sequence, pools: bool) -> Sequence | None:
        """A running sequence of a strictly lower tier than waiting seq (sharing its pools if asked)."""
        tier = self._tier(seq)
        cands = [v for v in reversed(self.running) if self._tier(v) > tier and
                 (not pools or self.blocks.shares_pool(v.blocks, seq.blocks))]
        return max(cands, key=self._tier, default=None)

    def _evict(self, victim: Sequence, items: list[ScheduledSeq], evicted: set[int]) -> int:
        """Preempt victim; if this step already scheduled it, unschedule it and give back its tokens."""
        self._preempt(victim)
        evicted.add(id(victim))
        for k, it in enumerate(items):
            if it.seq is victim:
                del items[k]
                return it.num_tokens
        return 0

    def schedule(self) -> SchedulerOutput:
        self._now = time.monotonic()  # one instant for the step: a sequence's tier does not change within it
        budget = self.max_tokens_per_step
        items: list[ScheduledSeq] = []
        evicted: set[int] = set()  # ids of sequences preempted below to make room
        for seq in list(self.running):
            if budget == 0:
                break
            if id(seq) in evicted or seq.ends_with_pending:
                continue
            n = min(seq.to_compute, budget)
            while not self.blocks.allocate(seq.blocks, seq.num_computed + n):
                victim = self._victim(seq)
                budget += self._evict(victim, items, evicted)
                if victim is seq:
                    break
            else:
                items.append(ScheduledSeq(seq, n))
                budget -= n
        # admit waiting sequences; a sibling waits until the first choice's prompt is computed
        skipped: list[Sequence] = []
        while self.waiting and budget > 0:
            seq = self.waiting.popleft(self._now)
            if seq.pending:  # preempted while a step was in flight: recompute once its token is known
                skipped.append(seq)
                continue
            if seq.wait_for is not None and seq.wait_for.num_computed < seq.prompt_len and \
                    not seq.wait_for.finished:
                skipped.append(seq)
                continue
            if len(self.running) >= self.max_num_seqs:
                victim = self._lower(seq, pools=False)
                if victim is None:
                    self.waiting.appendleft(seq)
                    break
                budget += self._evict(victim, items, evicted)
            if seq.num_computed == 0:
                seq.num_computed = self.blocks.match_prefix(seq.blocks, seq.tokens)
                if not seq.admitted:  # a preempted sequence's own recomputed blocks are not a cache saving
                    seq.cached_tokens = min(seq.num_computed, seq.prompt_len)
            n = min(seq.to_compute, budget)
            fits = self.blocks.allocate(seq.blocks, seq.num_computed + n)
            while not fits and (victim := self._lower(seq, pools=True)) is not None:
                budget += self._evict(victim, items, evicted)
                fits = self.blocks.allocate(seq.blocks, seq.num_computed + n)
            if not fits:  # no room, and no one of a lower tier to take it from
                self.blocks.free(seq.blocks)
                seq.num_computed = 0
                self.waiting.appendleft(seq)
                break
            seq.admitted = True
            if seq.t_scheduled is None:
                seq.t_scheduled = time.monotonic()
            self.running.append(seq)
            items.append(ScheduledSeq(seq, n))
            budget -= n
        for seq in reversed(skipped):
            self.waiting.appendleft(seq)
        self._drafts(items, budget)
        return SchedulerOutput(items, len(evicted))

    def _drafts(self, items: list[ScheduledSeq], budget: int) -> None:
        """Draft tokens (engine.prediction) get what is left of the budget once every scheduled sequence has
        its own tokens, and only blocks that are free: speculative work never delays or preempts real work."""
        for it in items:
            if budget <= 0:
                return
            s = it.seq
            if s.draft and it.samples:
                d = min(len(s.draft), budget)
                if self.blocks.allocate(s.blocks, s.num_computed + it.num_tokens + d):
                    it.num_tokens += d
                    it.draft = d
                    budget -= d

    def after_step(self, seq: Sequence):
        """Register completed blocks for prefix reuse, then drop KV the window no longer sees.

        Called when a step is launched and again when its tokens arrive: a block holding a token
        still on the device is hashed at the second call. Blocks are released, and registered,
        while the step that writes or reads them may still run: the device runs steps in order,
        so a later step that reuses them runs after it. Draft tokens in flight (`verifying`) may be
        rejected, and the positions before them then computed again: the window stays where they start."""
        self.blocks.commit_full_blocks(seq.blocks, seq.tokens, min(seq.num_computed, len(seq.tokens)))
        self.blocks.slide(seq.blocks, seq.num_computed - seq.verifying)
