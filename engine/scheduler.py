"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running sequences first (decodes and unfinished prefill chunks, in
arrival order), then waiting ones are admitted while the budget, the sequence
limit and the KV pools allow. When a running sequence cannot get a block, the
most recently admitted one is preempted: its blocks are released (they stay
in the prefix cache, so the recompute is usually a cache hit) and it goes back
to the front of the queue with its generated tokens as part of its prompt.
"""

from __future__ import annotations

import time
from collections import deque

from .kv_cache import BlockManager
from .request import ScheduledSeq, SchedulerOutput, Sequence


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_tokens_per_step: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_tokens_per_step = max_tokens_per_step
        self.waiting: deque[Sequence] = deque()
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

    def schedule(self) -> SchedulerOutput:
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
                # the latest admitted whose blocks come from the same pools (attention groups)
                victim = next(v for v in reversed(self.running) if self.blocks.shares_pool(v.blocks, seq.blocks))
                self._preempt(victim)
                evicted.add(id(victim))
                if victim is seq:
                    break
            else:
                items.append(ScheduledSeq(seq, n))
                budget -= n
        # admit waiting sequences; a sibling waits until the first choice's prompt is computed
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if seq.pending:  # preempted while a step was in flight: recompute once its token is known
                skipped.append(seq)
                continue
            if seq.wait_for is not None and seq.wait_for.num_computed < seq.prompt_len and \
                    not seq.wait_for.finished:
                skipped.append(seq)
                continue
            if seq.num_computed == 0:
                seq.num_computed = self.blocks.match_prefix(seq.blocks, seq.tokens)
                if not seq.admitted:  # a preempted sequence's own recomputed blocks are not a cache saving
                    seq.cached_tokens = min(seq.num_computed, seq.prompt_len)
            n = min(seq.to_compute, budget)
            if not self.blocks.allocate(seq.blocks, seq.num_computed + n):
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
        self.waiting.extendleft(reversed(skipped))
        return SchedulerOutput(items, len(evicted))

    def after_step(self, seq: Sequence):
        """Register completed blocks for prefix reuse, then drop KV the window no longer sees.

        Called when a step is launched and again when its tokens arrive: a block holding a token
        still on the device is hashed at the second call. Blocks are released, and registered,
        while the step that writes or reads them may still run: the device runs steps in order,
        so a later step that reuses them runs after it."""
        self.blocks.commit_full_blocks(seq.blocks, seq.tokens, min(seq.num_computed, len(seq.tokens)))
        self.blocks.slide(seq.blocks, seq.num_computed)
