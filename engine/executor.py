"""Executors run the model for the engine: in this process, or over N rank workers.

The engine hands an executor one `StepInput` per step (plain tensors, so it
can cross a process boundary) and gets back the logits of the rows it samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.attention import KVCache, PagedMetadata


@dataclass
class StepInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    query_start: torch.Tensor
    context_lens: torch.Tensor
    block_tables: dict[str, torch.Tensor]
    slot_mapping: dict[str, torch.Tensor]
    sample_rows: torch.Tensor


@dataclass(frozen=True)
class CacheSpec:
    block_size: int
    blocks: dict[str, int]      # pool name -> blocks
    layer_group: tuple[str, ...]


def allocate_cache(model, spec: CacheSpec) -> KVCache:
    """The KV pools of this process's share of the KV heads."""
    heads = model.blocks[0].attn.qkv.nkv
    return KVCache.allocate(len(spec.layer_group), [spec.blocks[g] for g in spec.layer_group], spec.block_size,
                            heads, model.config.head_dim, model.dtype, model.device)


def run_step(model, cache: KVCache, spec: CacheSpec, step: StepInput) -> torch.Tensor:
    dev = model.device
    meta = PagedMetadata(cache, step.query_start.to(dev), step.context_lens.to(dev),
                         {g: t.to(dev) for g, t in step.block_tables.items()},
                         {g: t.to(dev) for g, t in step.slot_mapping.items()}, list(spec.layer_group))
    hidden = model(step.input_ids.to(dev), step.positions.to(dev), meta)
    return model.compute_logits(hidden[step.sample_rows.to(dev)])


class LocalExecutor:
    def __init__(self, model, spec: CacheSpec):
        self.model, self.spec = model, spec
        self.config = model.config
        self.cache = allocate_cache(model, spec)

    def execute(self, step: StepInput) -> torch.Tensor:
        return run_step(self.model, self.cache, self.spec, step)

    def expert_load(self) -> torch.Tensor:
        return torch.stack([b.moe.load for b in self.model.blocks])

    def shutdown(self) -> None:
        pass
