"""Lazy, selective reading of gpt-oss safetensors checkpoints in both layouts.

`CheckpointReader` opens the shards lazily (safetensors mmaps them) and hands
out one tensor, or one slice of one tensor, at a time, so a rank that keeps a
quarter of the experts never materialises the rest. `LayerWeights` names the
logical tensors the model needs; `read_layer` maps them onto the layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from . import mxfp4
from .config import ConfigError, GptOssConfig, load_config


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be used; names the culprit."""


def resolve_layout(path: str | Path) -> tuple[Path, str]:
    """Return (directory, "hf"|"original") for a checkpoint path.

    A Hugging Face snapshot of openai/gpt-oss-* holds both layouts: the root
    (HF) wins; a directory holding only `original/` uses that.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path '{p}' does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path '{p}' is not a directory")
    for d in (p, p / "original"):
        cfg = d / "config.json"
        if cfg.exists() and any(d.glob("*.safetensors")):
            try:
                raw = json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{cfg}: not valid JSON ({e})") from None
            is_hf = "model_type" in raw or "num_local_experts" in raw
            return d, "hf" if is_hf else "original"
    raise CheckpointError(f"'{p}' holds no config.json with *.safetensors beside it")


class CheckpointReader:
    def __init__(self, path: str | Path):
        self.dir, self.layout = resolve_layout(path)
        self._handles: dict[Path, object] = {}
        self.weight_map: dict[str, Path] = {}
        index = next(iter(sorted(self.dir.glob("*.safetensors.index.json"))), None)
        if index is not None:
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            for name, fname in wm.items():
                f = self.dir / fname
                if not f.exists():
                    raise CheckpointError(f"{index} lists '{fname}' for tensor '{name}', but the file is missing")
                self.weight_map[name] = f
        else:
            for f in sorted(self.dir.glob("*.safetensors")):
                for name in self._open(f).keys():
                    self.weight_map[name] = f

    def _open(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error type for bad headers
                raise CheckpointError(f"cannot read safetensors file '{f.name}': {e}") from None
            self._handles[f] = h
        return h

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _slice(self, name: str):
        f = self.weight_map.get(name)
        if f is None:
            raise CheckpointError(f"missing tensor '{name}' in checkpoint '{self.dir}'")
        h = self._open(f)
        if name not in h.keys():
            raise CheckpointError(f"tensor '{name}' is not in '{f.name}' although the index says so")
        return h.get_slice(name), f

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name)[0].get_shape())

    def read(self, name: str, shape: Sequence[int] | None = None,
             rows: slice | Sequence[int] | None = None, dim: int = 0) -> torch.Tensor:
        """Read a tensor, or only `rows` of it along `dim` (0 or 1).

        `shape` is the full expected shape; a mismatch is a CheckpointError.
        """
        sl, f = self._slice(name)
        full = tuple(sl.get_shape())
        if shape is not None and full != tuple(shape):
            raise CheckpointError(f"tensor '{name}' in '{f.name}' has shape {full}, expected {tuple(shape)}")
        try:
            if rows is None:
                t = sl[:]
            elif isinstance(rows, slice):
                t = sl[rows] if dim == 0 else sl[:, rows]
            else:
                # contiguous runs are read as slices: one read each, no gather of the whole tensor
                parts, ids = [], list(rows)
                i = 0
                while i < len(ids):
                    j = i
                    while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
                        j += 1
                    s = slice(ids[i], ids[j] + 1)
                    parts.append(sl[s] if dim == 0 else sl[:, s])
                    i = j + 1
                t = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor '{name}' from '{f.name}' (truncated file?): {e}") from None
        return t


@dataclass(frozen=True)
class ShardSpec:
    """Which part of the model a process keeps.

    experts: global expert ids to load (None = all). q_heads / kv_heads:
    [start, stop) head ranges for attention (None = all). vocab: [start, stop)
    rows of the embedding and unembedding (None = all).
    """
    experts: tuple[int, ...] | None = None
    q_heads: tuple[int, int] | None = None
    kv_heads: tuple[int, int] | None = None
    vocab: tuple[int, int] | None = None

    def expert_ids(self, cfg: GptOssConfig) -> tuple[int, ...]:
        ids = tuple(range(cfg.num_local_experts)) if self.experts is None else tuple(self.experts)
        bad = [e for e in ids if not 0 <= e < cfg.num_local_experts]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"invalid expert ids {ids} for {cfg.num_local_experts} experts")
        return ids

    def heads(self, cfg: GptOssConfig) -> tuple[tuple[int, int], tuple[int, int]]:
        q = self.q_heads or (0, cfg.num_attention_heads)
        kv = self.kv_heads or (0, cfg.num_key_value_heads)
        if not (0 <= q[0] < q[1] <= cfg.num_attention_heads and 0 <= kv[0] < kv[1] <= cfg.num_key_value_heads):
            raise ValueError(f"invalid head ranges q={q} kv={kv}")
        return q, kv


def _names(layout: str, i: int) -> dict[str, str]:
    if layout == "hf":
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        return {
            "attn_norm": f"model.layers.{i}.input_layernorm.weight",
            "mlp_norm": f"model.layers.{i}.post_attention_layernorm.weight",
            "q_w": f"{a}.q_proj.weight", "q_b": f"{a}.q_proj.bias",
            "k_w": f"{a}.k_proj.weight", "k_b": f"{a}.k_proj.bias",
            "v_w": f"{a}.v_proj.weight", "v_b": f"{a}.v_proj.bias",
            "o_w": f"{a}.o_proj.weight", "o_b": f"{a}.o_proj.bias",
            "sinks": f"{a}.sinks",
            "router_w": f"{m}.router.weight", "router_b": f"{m}.router.bias",
            "w1": f"{m}.experts.gate_up_proj", "b1": f"{m}.experts.gate_up_proj_bias",
            "w2": f"{m}.experts.down_proj", "b2": f"{m}.experts.down_proj_bias",
            "w1_blocks": f"{m}.experts.gate_up_proj_blocks", "w1_scales": f"{m}.experts.gate_up_proj_scales",
            "w2_blocks": f"{m}.experts.down_proj_blocks", "w2_scales": f"{m}.experts.down_proj_scales",
        }
    a, m = f"block.{i}.attn", f"block.{i}.mlp"
    return {
        "attn_norm": f"{a}.norm.scale", "mlp_norm": f"{m}.norm.scale",
        "qkv_w": f"{a}.qkv.weight", "qkv_b": f"{a}.qkv.bias",
        "o_w": f"{a}.out.weight", "o_b": f"{a}.out.bias", "sinks": f"{a}.sinks",
        "router_w": f"{m}.gate.weight", "router_b": f"{m}.gate.bias",
        "w1": f"{m}.mlp1_weight", "b1": f"{m}.mlp1_bias",
        "w2": f"{m}.mlp2_weight", "b2": f"{m}.mlp2_bias",
        "w1_blocks": f"{m}.mlp1_weight.blocks", "w1_scales": f"{m}.mlp1_weight.scales",
        "w2_blocks": f"{m}.mlp2_weight.blocks", "w2_scales": f"{m}.mlp2_weight.scales",
    }


GLOBAL_NAMES = {
    "hf": {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "unembed": "lm_head.weight"},
    "original": {"embed": "embedding.weight", "norm": "norm.scale", "unembed": "unembedding.weight"},
}


def layer_tensor_names(layout: str, layer: int) -> dict[str, str]:
    """Logical name -> checkpoint tensor name for one layer (used by the writer too)."""
    return _names(layout, layer)


@dataclass
class ExpertWeights:
    """One layer's local experts, (out, in) orientation.

    Either dense `w1 [E, 2I, H]`, `w2 [E, H, I]` or packed MXFP4 (`*_blocks`,
    `*_scales`), which is kept packed so memory stays at the checkpoint's size.
    """
    ids: tuple[int, ...]
    b1: torch.Tensor
    b2: torch.Tensor
    w1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w1_blocks: torch.Tensor | None = None
    w1_scales: torch.Tensor | None = None
    w2_blocks: torch.Tensor | None = None
    w2_scales: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.w1 is None


def read_experts(r: CheckpointReader, cfg: GptOssConfig, layer: int, ids: tuple[int, ...],
                 dtype: torch.dtype, keep_packed: bool) -> ExpertWeights:
    n = _names(r.layout, layer)
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    ids_list = list(ids)
    b1 = r.read(n["b1"], (E, 2 * I), ids_list).to(dtype)
    b2 = r.read(n["b2"], (E, H), ids_list).to(dtype)
    if r.has(n["w1_blocks"]):
        w1b = r.read(n["w1_blocks"], (E, 2 * I, H // 32, 16), ids_list)
        w1s = r.read(n["w1_scales"], (E, 2 * I, H // 32), ids_list)
        w2b = r.read(n["w2_blocks"], (E, H, I // 32, 16), ids_list)
        w2s = r.read(n["w2_scales"], (E, H, I // 32), ids_list)
        if keep_packed:
            return ExpertWeights(ids, b1, b2, w1_blocks=w1b, w1_scales=w1s, w2_blocks=w2b, w2_scales=w2s)
        # decode expert by expert so the float copy is the only large allocation
        w1 = torch.empty(len(ids), 2 * I, H, dtype=dtype)
        w2 = torch.empty(len(ids), H, I, dtype=dtype)
        for j in range(len(ids)):
            w1[j] = mxfp4.decode(w1b[j], w1s[j], dtype)
            w2[j] = mxfp4.decode(w2b[j], w2s[j], dtype)
        return ExpertWeights(ids, b1, b2, w1=w1, w2=w2)
    if r.layout == "hf":  # transformers stores unquantized experts as (in, out)
        w1 = r.read(n["w1"], (E, H, 2 * I), ids_list).to(dtype).transpose(1, 2).contiguous()
        w2 = r.read(n["w2"], (E, I, H), ids_list).to(dtype).transpose(1, 2).contiguous()
    else:
        w1 = r.read(n["w1"], (E, 2 * I, H), ids_list).to(dtype)
        w2 = r.read(n["w2"], (E, H, I), ids_list).to(dtype)
    return ExpertWeights(ids, b1, b2, w1=w1, w2=w2)


def read_attention(r: CheckpointReader, cfg: GptOssConfig, layer: int, shard: ShardSpec,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """q/k/v/o weights and sinks for the shard's heads, (out, in) orientation."""
    n = _names(r.layout, layer)
    H, D = cfg.hidden_size, cfg.head_dim
    Hq, K = cfg.num_attention_heads, cfg.num_key_value_heads
    (q0, q1), (k0, k1) = shard.heads(cfg)
    qs, ks = slice(q0 * D, q1 * D), slice(k0 * D, k1 * D)
    if r.layout == "hf":
        out = {
            "q_w": r.read(n["q_w"], (Hq * D, H), qs), "q_b": r.read(n["q_b"], (Hq * D,), qs),
            "k_w": r.read(n["k_w"], (K * D, H), ks), "k_b": r.read(n["k_b"], (K * D,), ks),
            "v_w": r.read(n["v_w"], (K * D, H), ks), "v_b": r.read(n["v_b"], (K * D,), ks),
        }
    else:
        tot = (Hq + 2 * K) * D
        ko, vo = Hq * D, (Hq + K) * D
        w, b = n["qkv_w"], n["qkv_b"]
        out = {
            "q_w": r.read(w, (tot, H), qs), "q_b": r.read(b, (tot,), qs),
            "k_w": r.read(w, (tot, H), slice(ko + ks.start, ko + ks.stop)),
            "k_b": r.read(b, (tot,), slice(ko + ks.start, ko + ks.stop)),
            "v_w": r.read(w, (tot, H), slice(vo + ks.start, vo + ks.stop)),
            "v_b": r.read(b, (tot,), slice(vo + ks.start, vo + ks.stop)),
        }
    out["o_w"] = r.read(n["o_w"], (H, Hq * D), qs, dim=1)
    out["o_b"] = r.read(n["o_b"], (H,))
    out["sinks"] = r.read(n["sinks"], (Hq,), slice(q0, q1))
    out["attn_norm"] = r.read(n["attn_norm"], (H,))
    out["mlp_norm"] = r.read(n["mlp_norm"], (H,))
    out["router_w"] = r.read(n["router_w"], (cfg.num_local_experts, H))
    out["router_b"] = r.read(n["router_b"], (cfg.num_local_experts,))
    return {k: v.to(dtype) for k, v in out.items()}


def open_checkpoint(path) -> tuple[CheckpointReader, GptOssConfig]:
    """`path`: a checkpoint directory, or a reader that carries its config (models.checkpoint.RandomCheckpoint)."""
    if hasattr(path, "read") and hasattr(path, "config"):
        return path, path.config
    r = CheckpointReader(path)
    cfg = load_config(r.dir)
    if cfg.quantization is None and r.has(_names(r.layout, 0)["w1_blocks"]):
        cfg = cfg.model_copy(update={"quantization": "mxfp4"})
    return r, cfg
