"""The sampling side of an executor, across steps: the spec a step's sampling crosses processes as, and
the state that stays where the logits are made.

A seeded row's random draw is keyed by its seed and the output position it samples (philox_key), not by
how many draws its sequence made: the token at position k is drawn alike whatever the batch, however
often the sequence was preempted and recomputed, and whether a predicted output (engine.prediction) had
it verified in a step of several rows or a draft was rejected and it was sampled again. So a seeded
request's tokens are the same with and without `prediction`, as they are with and without batching."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .sampler import (Sampler, SamplerOutput, SamplingBatch, SamplingParams, make_generator,
                      temperature_only, to_device)

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
    tensors, no generator objects (the executor's SamplerState makes those, from seed and position)."""

    params: list[SamplingParams]
    seeds: list[int | None]          # per row: the seed of its choice's stream (request seed + choice index)
    bitmask: torch.Tensor | None = None  # packed grammar masks, int32 [B, ceil(V/32)] (engine.grammar)
    free: torch.Tensor | None = None     # bool [B]: rows without a grammar
    prompt_ids: list[list[int]] | None = None  # penalties only
    output_ids: list[list[int]] | None = None
    positions: list[int] | None = None  # per row: the output position it samples (0: the first token)


class SamplerState:
    """The sampling side of an executor: the sampler, where the logits are made, so only token ids leave:
    a [batch, 201k] logits tensor per step would otherwise cross from the rank that holds it."""

    def __init__(self) -> None:
        self.sampler = Sampler()
        self.rng = random.Random()       # unseeded rows' keys
        self.last: torch.Tensor | None = None  # the latest step's sampled ids, where they were sampled

    def sample(self, logits: torch.Tensor, spec: SampleSpec) -> SamplerOutput:
        keys = self._keys(spec)
        from kernels import dispatch
        fused = dispatch.use_triton(logits.device)  # temperature-only rows draw in the kernel, from their key
        gens = [make_generator(k, logits.device)
                if seed is not None and not p.greedy and not (fused and temperature_only(p, logits.shape[-1]))
                else None for k, seed, p in zip(keys, spec.seeds, spec.params)]
        allowed = None
        if spec.bitmask is not None:
            from .grammar import unpack_bitmask  # llguidance loads only where grammars are used
            dev = logits.device
            allowed = unpack_bitmask(spec.bitmask.to(dev, non_blocking=True), logits.shape[-1],
                                     spec.free.to(dev, non_blocking=True))
        on_device = to_device(logits.device, keys, torch.int64) if fused else None
        out = self.sampler.sample(logits, SamplingBatch(spec.params, spec.prompt_ids, spec.output_ids, gens, allowed,
                                                        on_device))
        self.last = out.token_ids
        return out

    def _keys(self, spec: SampleSpec) -> list[int]:
        """Per row: a seeded row's key, from its seed and the output position it samples (so its draw depends
        on neither the batch nor the steps it took to get there), or fresh random bits."""
        out = []
        positions = spec.positions or [0] * len(spec.params)
        for seed, p, pos in zip(spec.seeds, spec.params, positions):
            if seed is None or p.greedy:
                out.append(self.rng.getrandbits(64) - 2**63)
            else:
                out.append(philox_key(seed, pos))
        return out
