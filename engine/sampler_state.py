"""The sampling side of an executor, across steps: the spec a step's sampling crosses processes as, and
the state that stays where the logits are made (each seeded sequence's generator and Philox draw count)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .sampler import Sampler, SamplerOutput, SamplingBatch, SamplingParams, make_generator, to_device

_M64 = 2**64 - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser: nearby inputs (seed, seed + 1; draw n, n + 1) give unrelated keys."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def philox_key(seed: int, draw: int) -> int:
    """The 64-bit key (as a signed int64) of a seeded sequence's `draw`-th draw."""
    k = _mix64(_mix64(seed & _M64) ^ draw)
    return k - 2**64 if k >= 2**63 else k


@dataclass
class SampleSpec:
    """A step's sampling inputs in a form that crosses to an executor in another process: no device
    tensors, no generator objects (the executor's SamplerState owns those)."""

    params: list[SamplingParams]
    keys: list[int]                  # per row: the sequence (engine-unique), whose generator a seed selects
    seeds: list[int | None]          # per row: the seed of its choice's stream (request seed + choice index)
    bitmask: torch.Tensor | None = None  # packed grammar masks, int32 [B, ceil(V/32)] (engine.grammar)
    free: torch.Tensor | None = None     # bool [B]: rows without a grammar
    prompt_ids: list[list[int]] | None = None  # penalties only
    output_ids: list[list[int]] | None = None
    released: list[int] = field(default_factory=list)  # sequences gone since the last spec


class SamplerState:
    """The sampling side of an executor: the sampler, and each seeded sequence's generator, made on the
    logits' device at its first draw and kept across steps (and preemptions) until released. Where
    the logits are made, so only token ids leave: a [batch, 201k] logits tensor per step would
    otherwise cross from the rank that holds it."""

    def __init__(self) -> None:
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator] = {}
        self.draws: dict[int, int] = {}  # seeded sequence -> draws so far: its next Philox key
        self.rng = random.Random()       # unseeded rows' keys
        self.last: torch.Tensor | None = None  # the latest step's sampled ids, where they were sampled

    def sample(self, logits: torch.Tensor, spec: SampleSpec) -> SamplerOutput:
        for k in spec.released:
            self.generators.pop(k, None)
            self.draws.pop(k, None)
        gens = []
        for k, seed in zip(spec.keys, spec.seeds):
            if seed is not None and k not in self.generators:
                self.generators[k] = make_generator(seed, logits.device)
            gens.append(self.generators.get(k) if seed is not None else None)
        allowed = None
        if spec.bitmask is not None:
            from .grammar import unpack_bitmask  # llguidance loads only where grammars are used
            dev = logits.device
            allowed = unpack_bitmask(spec.bitmask.to(dev, non_blocking=True), logits.shape[-1],
                                     spec.free.to(dev, non_blocking=True))
        from kernels import dispatch
        keys = to_device(logits.device, self._keys(spec), torch.int64) if dispatch.use_triton(logits.device) else None
        out = self.sampler.sample(logits, SamplingBatch(spec.params, spec.prompt_ids, spec.output_ids, gens, allowed,
                                                        keys))
        self.last = out.token_ids
        return out

    def _keys(self, spec: SampleSpec) -> list[int]:
        """Per row: a seeded sequence's key for its next draw (so its stream depends on its seed and
        how many tokens it drew, not on the batch), or fresh random bits."""
        out = []
        for k, seed, p in zip(spec.keys, spec.seeds, spec.params):
            if seed is None or p.greedy:
                out.append(self.rng.getrandbits(64) - 2**63)
                continue
            n = self.draws.get(k, 0)
            self.draws[k] = n + 1
            out.append(philox_key(seed, n))
        return out
