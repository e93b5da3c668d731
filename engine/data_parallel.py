"""Attention data parallelism: the engine's side.

With `attn_dp` a replica group's ranks form dp attention groups (tp ranks each,
parallel.layout) and each group serves its own share of the sequences: its
ranks hold only those sequences' KV. The expert layers still see every token
(the MoE exchanges pairs over the EP group), so every rank runs every step;
a group with nothing to do runs an empty one.

The engine keeps one scheduler. `DataParallelBlocks` gives each group its own
KV pools and pins a sequence to a group when it is admitted (all its blocks
come from that group's pools). The executor cuts each step into one sub-step
per group (`StepSplitter`, pure tensor code, tested on its own) and merges
the groups' sampled tokens back into the step's row order (`merge_samples`).
"""

from __future__ import annotations

import dataclasses

import torch

from kernels.cuda_graphs import bucket_for

from .executor import StepInput
from .kv_cache import BlockManager, SeqBlocks
from .sampler import SamplerOutput
from .sampler_state import SampleSpec


class DataParallelBlocks:
    """One BlockManager per attention group, with BlockManager's interface over SeqBlocks that
    carry their group. A sequence gets a group at its first match_prefix/allocate and loses it
    when freed (preempted or ended): re-admitted, it may land elsewhere."""

    def __init__(self, dp: int, *args, **kwargs):
        self.groups = [BlockManager(*args, **kwargs) for _ in range(dp)]
        self.live = [0] * dp            # sequences holding a group's blocks
        self.bs = self.groups[0].bs
        self.pool_names = self.groups[0].pool_names

    def choose(self, tokens: list[int] | None) -> int:
        """Balance first (a step lasts as long as its busiest group): among the groups within a
        small slack of the fewest live sequences, the longest cached prefix, then the most free
        blocks. A prefix-first rule would send every request sharing a system prompt to the
        group that cached it first; with the slack each group soon caches it too."""
        lo = min(self.live)
        slack = max(1, lo // 4)
        need = -(-len(tokens) // self.bs) if tokens else 1
        chain = self.groups[0].chain(tokens) if tokens else []
        cands = [g for g, n in enumerate(self.live) if n <= lo + slack]
        hits = {g: self.groups[g].cached_blocks(chain) for g in cands}
        fits = [g for g in cands if self.groups[g].pools["full"].available() >= need - hits[g]]
        return max(fits or cands, key=lambda g: (hits[g], self.groups[g].pools["full"].available(), -g))

    def _group(self, seq: SeqBlocks, tokens: list[int] | None = None) -> BlockManager:
        if seq.group is None:
            seq.group = self.choose(tokens)
            self.live[seq.group] += 1
        return self.groups[seq.group]

    def match_prefix(self, seq: SeqBlocks, tokens: list[int]) -> int:
        return self._group(seq, tokens).match_prefix(seq, tokens)

    def allocate(self, seq: SeqBlocks, total_tokens: int) -> bool:
        return self._group(seq).allocate(seq, total_tokens)

    def commit_full_blocks(self, seq: SeqBlocks, tokens: list[int], num_computed: int):
        if seq.group is not None:  # else it holds no blocks (freed while its step ran)
            self.groups[seq.group].commit_full_blocks(seq, tokens, num_computed)

    def slide(self, seq: SeqBlocks, next_pos: int):
        if seq.group is not None:
            self.groups[seq.group].slide(seq, next_pos)

    def free(self, seq: SeqBlocks):
        if seq.group is not None:
            self.groups[seq.group].free(seq)
            self.live[seq.group] -= 1
            seq.group = None

    def shares_pool(self, a: SeqBlocks, b: SeqBlocks) -> bool:
        return a.group == b.group

    def usage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.groups:
            for k, v in g.usage().items():
                out[k] = out.get(k, 0) + v
        return out

    def hit_rate(self) -> float:
        q = sum(g.query_tokens for g in self.groups)
        return sum(g.hit_tokens for g in self.groups) / q if q else 0.0


@dataclasses.dataclass
class SplitStep:
    steps: list[StepInput]                 # one per attention group (maybe empty)
    specs: list[SampleSpec | None]         # one per group: None where it samples nothing
    rows: list[torch.Tensor]               # per group: the step's sample rows it holds, in order
    num_rows: int


class StepSplitter:
    """Cuts the engine's steps into per-group sub-steps, in the order they run. It remembers
    where the previous sampling step's rows went: a pending input (overlapped scheduling) names
    the row of that step's samples, which its group's sampler knows by its own, local, index."""

    def __init__(self, dp: int, buckets: tuple[int, ...] = ()):
        """buckets: the ranks' decode graph buckets (a pure-decode step pads every group to one)."""
        self.dp, self.buckets = dp, buckets
        self._prev_group: torch.Tensor | None = None   # previous sampling step: row -> group
        self._prev_local: torch.Tensor | None = None   # row -> index among its group's rows

    def split(self, step: StepInput, spec: SampleSpec | None) -> SplitStep:
        if step.groups is None:
            raise ValueError("a step under attention data parallelism needs each sequence's group")
        qs = step.query_start
        lens = qs[1:] - qs[:-1]
        tok_group = torch.repeat_interleave(step.groups, lens)
        row_group = tok_group[step.sample_rows]
        if step.fill is not None and self._prev_group is None:
            raise ValueError("a step with pending inputs needs the previous step sampled through this splitter")
        counts = torch.bincount(step.groups, minlength=self.dp)
        decode = step.context_lens.numel() > 0 and int(lens.max()) == 1
        pad_to = (bucket_for(int(counts.max()), self.buckets) or 0) if decode and self.buckets else 0
        steps, rows = [], []
        for g in range(self.dp):
            seqs = (step.groups == g).nonzero().flatten()
            toks = (tok_group == g).nonzero().flatten()
            local = torch.full((tok_group.numel(),), -1, dtype=torch.long)
            local[toks] = torch.arange(toks.numel())
            mine = (row_group == g).nonzero().flatten()
            fill = None
            if step.fill is not None:
                f = step.fill[tok_group[step.fill[:, 0]] == g]
                if f.numel():
                    if not bool((self._prev_group[f[:, 1]] == g).all()):
                        raise ValueError("a pending input was sampled by another attention group")
                    fill = torch.stack([local[f[:, 0]], self._prev_local[f[:, 1]]], 1)
            steps.append(StepInput(
                step.input_ids[toks], step.positions[toks],
                torch.cat([qs.new_zeros(1), lens[seqs].cumsum(0)]), step.context_lens[seqs],
                {k: t[seqs] for k, t in step.block_tables.items()},
                {k: t[toks] for k, t in step.slot_mapping.items()},
                local[step.sample_rows[mine]], fill, pad_to=pad_to))
            rows.append(mine)
        specs: list[SampleSpec | None] = [None] * self.dp
        if spec is not None:
            for g in range(self.dp):
                if rows[g].numel():
                    specs[g] = take_rows(spec, rows[g].tolist())
            self._prev_group = row_group
            self._prev_local = torch.empty_like(row_group)
            for r in rows:
                self._prev_local[r] = torch.arange(r.numel())
        return SplitStep(steps, specs, rows, step.sample_rows.numel())


def take_rows(spec: SampleSpec, rows: list[int]) -> SampleSpec:
    """The spec of some of a step's sample rows."""
    def pick(xs):
        return None if xs is None else [xs[i] for i in rows]
    idx = torch.tensor(rows, dtype=torch.long)
    return SampleSpec(pick(spec.params), pick(spec.seeds),
                      None if spec.bitmask is None else spec.bitmask[idx],
                      None if spec.free is None else spec.free[idx],
                      pick(spec.prompt_ids), pick(spec.output_ids), positions=pick(spec.positions))


def merge_samples(outs: list[SamplerOutput | None], rows: list[torch.Tensor], n: int) -> SamplerOutput | None:
    """The groups' samples in the step's row order. A group that asked no logprobs has none:
    its rows get NaN (the engine reads logprobs only for rows that asked)."""
    if n == 0:
        return None
    ids = torch.full((n,), -1, dtype=torch.long)
    lp = torch.full((n,), float("nan")) if any(o is not None and o.logprobs is not None for o in outs) else None
    top = [[] for _ in range(n)] if any(o is not None and o.top_logprobs for o in outs) else None
    for o, r in zip(outs, rows):
        if not r.numel():
            continue
        ids[r] = o.token_ids.to(ids.device)
        if lp is not None and o.logprobs is not None:
            lp[r] = o.logprobs.to(lp.dtype)
        if top is not None and o.top_logprobs:
            for i, t in zip(r.tolist(), o.top_logprobs):
                top[i] = t
    return SamplerOutput(ids, lp, top)


def merge_logits(logits: list[torch.Tensor], rows: list[torch.Tensor], n: int) -> torch.Tensor:
    """The groups' logits rows in the step's row order."""
    out = torch.empty(n, logits[0].shape[-1], dtype=logits[0].dtype)
    for x, r in zip(logits, rows):
        out[r] = x
    return out
