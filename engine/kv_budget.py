"""How many KV blocks fit on a GPU: EngineConfig.kv_cache_fraction.

A fixed `num_blocks` either wastes an H200 (the 1,024-block default holds 16k tokens) or runs out
of memory on a smaller card. With `kv_cache_fraction` set, each rank measures, after loading its
shard: the device's total and free memory, and the activation peak of the largest step the engine
will run (a `max_tokens_per_step` prefill over a one-block cache). The full-attention pool then
gets what is left of `fraction` x total once the weights, that peak and the sliding pool are
counted; a group takes the smallest rank's answer. Captured decode graphs and allocator slack live
in the rest (1 - fraction).
"""

from __future__ import annotations

import logging

import torch

from models.attention import cache_dtype

log = logging.getLogger(__name__)


def sliding_blocks(config, model_config) -> int:
    """The sliding-window pool's blocks (engine.core.LLMEngine sizes it the same way)."""
    bs = config.block_size
    return config.num_sliding_blocks or (
        config.max_num_seqs * ((model_config.sliding_window + bs - 1) // bs + 2) + config.max_tokens_per_step // bs + 2)


def block_bytes(model, block_size: int, kv_cache_dtype: str = "auto") -> tuple[int, int]:
    """Bytes of one block across this rank's full-attention layers, and across its sliding ones."""
    heads, cfg = model.blocks[0].attn.qkv.nkv, model.config
    bits = torch.finfo(cache_dtype(kv_cache_dtype, model.dtype)).bits
    per_layer = 2 * block_size * heads * cfg.head_dim * bits // 8  # k and v
    sliding = sum(1 for i in range(cfg.num_hidden_layers) if cfg.window(i))
    return per_layer * (cfg.num_hidden_layers - sliding), per_layer * sliding


def plan_blocks(total: int, free: int, fraction: float, peak: int, full_block: int, sliding_pool: int) -> int:
    """Full-pool blocks: fraction x total, less what is in use (total - free), the step's activation
    peak and the sliding pool, in blocks of `full_block` bytes."""
    budget = int(fraction * total) - (total - free) - peak - sliding_pool
    return max(0, budget // max(1, full_block))


def measure_kv_blocks(model, config) -> int | None:
    """This rank's full-pool blocks under config.kv_cache_fraction; None off CUDA (`fit` then keeps
    num_blocks)."""
    from .executor import CacheSpec, allocate_cache, null_step, run_step
    if model.device.type != "cuda":
        return None
    cfg, bs = model.config, config.block_size
    groups = tuple("sliding" if cfg.window(i) else "full" for i in range(cfg.num_hidden_layers))
    tiny = CacheSpec(bs, {"full": 1, "sliding": 1}, groups, config.kv_cache_dtype)  # null steps touch only block 0
    cache = allocate_cache(model, tiny)
    loads = [b.moe.load.clone() for b in model.blocks]
    torch.cuda.synchronize(model.device)
    base = torch.cuda.memory_allocated(model.device)
    torch.cuda.reset_peak_memory_stats(model.device)
    # every row real (no mask): a masked row reaches no expert, and the torch MoE would then allocate
    # nothing for it, under-measuring the peak; the load it counts is restored below
    run_step(model, cache, tiny, null_step(config.max_tokens_per_step, tiny))
    torch.cuda.synchronize(model.device)
    peak = torch.cuda.max_memory_allocated(model.device) - base
    for b, saved in zip(model.blocks, loads):
        b.moe.load.copy_(saved)
    del cache
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(model.device)
    full, sliding = block_bytes(model, bs, config.kv_cache_dtype)
    blocks = plan_blocks(total, free, config.kv_cache_fraction, peak, full, sliding * sliding_blocks(config, cfg))
    log.info("KV cache: %d full blocks of %d tokens (%.1f GiB) from %.0f%% of %.1f GiB; step peak %.2f GiB",
             blocks, bs, blocks * full / 2**30, 100 * config.kv_cache_fraction, total / 2**30, peak / 2**30)
    return blocks


def fit(config, measured: list[int | None]):
    """config with num_blocks from the ranks' measurements (the smallest: every rank holds the same
    blocks); unchanged, with a warning, where a rank is not on a GPU (None)."""
    if config.kv_cache_fraction is None:
        return config
    if not measured or any(m is None for m in measured):
        log.warning("kv_cache_fraction applies on GPUs; this model is on the CPU: num_blocks=%d", config.num_blocks)
        return config
    blocks = min(measured)
    need = -(-config.max_model_len // config.block_size) + 1  # and the null block
    if blocks < 2:
        raise ValueError(f"kv_cache_fraction={config.kv_cache_fraction} leaves room for {blocks} KV blocks; "
                         "raise it, or lower max_tokens_per_step / max_num_seqs")
    if blocks < need:
        log.warning("KV cache holds %d blocks: sequences are capped at %d tokens (max_model_len %d)",
                    blocks, (blocks - 1) * config.block_size, config.max_model_len)
    return config.model_copy(update={"num_blocks": blocks})


__all__ = ["block_bytes", "fit", "measure_kv_blocks", "plan_blocks", "sliding_blocks"]
