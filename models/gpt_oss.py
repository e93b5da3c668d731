"""gpt-oss (20b / 120b and smaller random variants) in torch.

Two entry points share every layer:
* `logits(input_ids)`: one sequence, full causal forward, no cache (parity tests).
* `forward(input_ids, positions, meta)`: the engine's call. Tokens of many
  sequences are flattened into one batch; `meta` (see attention.py) says which
  keys each token attends to and where the paged cache lives, so prefill
  chunks and decode tokens run in the same step.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from kernels import dispatch

from .attention import DenseMetadata
from .config import GptOssConfig
from .layers import MoE, PackedLinear, QKVLinear, RMSNorm, Rotary, RowLinear, add_norm
from .weights import GLOBAL_NAMES, CheckpointReader, ShardSpec, open_checkpoint, read_attention, read_experts


class Attention(nn.Module):
    """Attention over this rank's heads; the TP group sums the output projections."""

    def __init__(self, cfg: GptOssConfig, layer: int, w: dict[str, torch.Tensor], comm):
        super().__init__()
        self.comm = comm
        self.layer = layer
        self.window = cfg.window(layer)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.qkv = QKVLinear(w, cfg.head_dim)
        # the bias joins the sum once: on TP rank 0
        self.o = RowLinear(w["o_w"], w["o_b"] if comm.tp_rank == 0 else None)
        self.register_buffer("sinks", w["sinks"], persistent=False)

    def forward(self, x, cos, sin, meta) -> torch.Tensor:
        q, k, v = self.qkv(x)
        if dispatch.use_triton(q.device) and hasattr(meta, "rotate_and_attend"):
            # the paged step on the GPU: rotation and both cache writes in one launch, the attention's own
            # in a decode step
            o = meta.rotate_and_attend(self.layer, q, k, v, cos, sin, self.sinks, self.window, self.scale)
        else:
            q, k = Rotary.apply_qk(q, k, cos, sin)
            o = meta.attend(self.layer, q, k, v, self.sinks, self.window, self.scale)
        return self.comm.tp_all_reduce(self.o(o.flatten(1)))


class Block(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer: int, w: dict[str, torch.Tensor], experts, comm, copies=None,
                 moe_combine: str = "auto"):
        super().__init__()
        self.attn_norm = RMSNorm(w["attn_norm"], cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer, w, comm)
        self.mlp_norm = RMSNorm(w["mlp_norm"], cfg.rms_norm_eps)
        self.moe = MoE(cfg, w["router_w"], w["router_b"], experts, comm, copies, moe_combine)

    def forward(self, x, h, cos, sin, meta, next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream, h = attn_norm(x) (the previous block fused it into its MoE combine)
        -> (the new stream x', next_norm(x')): the next block's attention norm, or the model's last."""
        o = self.attn(h, cos, sin, meta)
        mask = getattr(meta, "token_mask", None)
        fused = self.moe.forward_block(o, x, self.mlp_norm, mask, next_norm)  # a decode step on the GPU
        if fused is not None:
            return fused
        x, h = add_norm(o, x, self.mlp_norm)  # one kernel on the GPU
        return self.moe(h, mask, getattr(meta, "static", False), residual=x, norm=next_norm)


class GptOssForCausalLM(nn.Module):
    def __init__(self, cfg: GptOssConfig, embed: torch.Tensor, blocks: list[Block],
                 norm: torch.Tensor, unembed: torch.Tensor, shard: ShardSpec, comm):
        super().__init__()
        self.config = cfg
        self.shard = shard
        self.comm = comm
        self.vocab_start = shard.vocab[0] if shard.vocab else 0
        self.register_buffer("embed", embed, persistent=False)
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(norm, cfg.rms_norm_eps)
        self.register_buffer("unembed", unembed, persistent=False)
        self._unembed = PackedLinear()
        self.rotary = Rotary(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """input_ids, positions [N] -> final hidden states [N, hidden] (after the last norm)."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        h = self.blocks[0].attn_norm(x)
        norms = [b.attn_norm for b in self.blocks[1:]] + [self.norm]
        for blk, nxt in zip(self.blocks, norms):
            x, h = blk(x, h, cos, sin, meta, nxt)
        return h

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.tp_size == 1:
            return self.embed[ids]
        # vocab-parallel: each TP rank looks up the ids in its rows, the group sums
        local = ids - self.vocab_start
        hit = (local >= 0) & (local < self.embed.shape[0])
        x = self.embed[local.clamp(0, self.embed.shape[0] - 1)] * hit[:, None].to(self.embed.dtype)
        return self.comm.tp_all_reduce(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._unembed(hidden, self.unembed).float()
        return self.comm.tp_all_gather_last(logits)[:, : self.config.vocab_size]

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1-D LongTensor of T tokens -> [T, vocab] float logits (causal, no cache)."""
        if input_ids.dim() != 1:
            raise ValueError(f"logits() takes a 1-D tensor of token ids, got shape {tuple(input_ids.shape)}")
        ids = input_ids.to(self.device)
        pos = torch.arange(ids.numel(), device=self.device)
        return self.compute_logits(self.forward(ids, pos, DenseMetadata.single(ids.numel(), self.device)))


def _keep_packed(cfg: GptOssConfig, n_experts: int, dtype: torch.dtype, keep_mxfp4: bool | None) -> bool:
    if cfg.quantization != "mxfp4":
        return False
    if keep_mxfp4 is not None:
        return keep_mxfp4
    # decode at load while the float experts stay small; beyond that keep the
    # checkpoint's 4.25 bits per weight and decode one expert at a time
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size * torch.finfo(dtype).bits // 8
    return per_expert * n_experts * cfg.num_hidden_layers > 2 * 2**30


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               shard: ShardSpec | None = None, keep_mxfp4: bool | None = None, comm=None,
               expert_copies: list[list[int]] | None = None, moe_combine: str = "auto") -> GptOssForCausalLM:
    """Load a gpt-oss checkpoint (HF or original/ layout, MXFP4 or float experts).

    Reads tensor by tensor, and only the shard's experts, heads and vocab rows.
    `comm` (parallel.comm) joins the model to its TP/EP groups; `expert_copies[e]`
    lists the EP ranks holding expert e; `moe_combine` picks how EP ranks combine
    expert outputs (models.layers.MoE).
    """
    from parallel.comm import LocalComm
    comm = comm or LocalComm()
    shard = shard or ShardSpec()
    reader, cfg = open_checkpoint(path)
    ids = shard.expert_ids(cfg)
    packed = _keep_packed(cfg, len(ids), dtype, keep_mxfp4)
    dev = torch.device(device)
    names = GLOBAL_NAMES[reader.layout]
    V, H = cfg.vocab_size, cfg.hidden_size

    def to_dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(dev)

    vrows = slice(*shard.vocab) if shard.vocab else None
    embed = to_dev(reader.read(names["embed"], (V, H), vrows).to(dtype))
    blocks = []
    for i in range(cfg.num_hidden_layers):
        w = {k: to_dev(v) for k, v in read_attention(reader, cfg, i, shard, dtype).items()}
        ex = read_experts(reader, cfg, i, ids, dtype, packed)
        for f in ("b1", "b2", "w1", "w2", "w1_blocks", "w1_scales", "w2_blocks", "w2_scales"):
            t = getattr(ex, f)
            if t is not None:
                setattr(ex, f, to_dev(t))
        blocks.append(Block(cfg, i, w, ex, comm, expert_copies, moe_combine))
    norm = to_dev(reader.read(names["norm"], (H,)).to(dtype))
    unembed = reader.read(names["unembed"], (V, H), vrows).to(dtype)
    if shard.vocab and comm.tp_size > 1:  # equal shards for the all-gather; padded rows are cut after it
        rows = -(-V // comm.tp_size)
        unembed = torch.cat([unembed, unembed.new_zeros(rows - unembed.shape[0], H)])
    model = GptOssForCausalLM(cfg, embed, blocks, norm, to_dev(unembed), shard, comm)
    return model.to(dev)  # the buffers modules make themselves (rotary frequencies, expert maps, loads)


__all__ = ["GptOssForCausalLM", "load_model", "CheckpointReader"]
