"""gpt-oss model configuration, read from either checkpoint layout's config.json.

The Hugging Face layout (`config.json` of `GptOssForCausalLM`) and OpenAI's
`original/` layout name the same hyper-parameters differently; both map onto
one validated `GptOssConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

LayerType = Literal["sliding_attention", "full_attention"]


class ConfigError(ValueError):
    """A config.json that is missing a field or holds inconsistent values."""


class RopeScaling(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    # HF floors/ceils the YaRN correction range unless told otherwise;
    # gpt-oss checkpoints say truncate=false (the reference never truncates).
    truncate: bool = True


class GptOssConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int
    layer_types: tuple[LayerType, ...]
    rope_theta: float = 150000.0
    rope_scaling: RopeScaling = RopeScaling()
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    eos_token_id: int = 200002
    pad_token_id: int = 199999
    # "mxfp4" when the checkpoint stores experts as blocks+scales.
    quantization: Literal["mxfp4"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "GptOssConfig":
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim",
            "num_local_experts", "num_experts_per_tok", "sliding_window",
            "max_position_embeddings",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but "
                f"num_hidden_layers is {self.num_hidden_layers}")
        if self.quantization == "mxfp4" and (self.hidden_size % 32 or self.intermediate_size % 32):
            raise ValueError("mxfp4 experts need hidden_size and intermediate_size divisible by 32")
        return self

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def window(self, layer: int) -> int | None:
        """Attention window of `layer` in tokens (None = full causal)."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    # ---- serialisation -------------------------------------------------
    def to_hf_dict(self) -> dict:
        d = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_theta": self.rope_theta,
            "rope_scaling": {"rope_type": "yarn", **self.rope_scaling.model_dump()},
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "initial_context_length": self.rope_scaling.original_max_position_embeddings,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
            "use_cache": True,
        }
        # harmony's ids only exist in the real 201088-token vocab
        for k in ("eos_token_id", "pad_token_id"):
            if getattr(self, k) < self.vocab_size:
                d[k] = getattr(self, k)
        if self.quantization == "mxfp4":
            d["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router",
                    "model.embed_tokens", "lm_head",
                ],
            }
        return d

    def to_original_dict(self) -> dict:
        """OpenAI reference layout. It has no layer_types or YaRN truncation
        fields: it alternates sliding (even) / full (odd) and never truncates."""
        if self.layer_types != _alternating(self.num_hidden_layers):
            raise ConfigError("the original/ layout can only express alternating sliding/full layers")
        if self.rope_scaling.truncate:
            raise ConfigError("the original/ layout cannot express truncated YaRN")
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.rope_scaling.original_max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling.factor,
            "rope_ntk_alpha": self.rope_scaling.beta_slow,
            "rope_ntk_beta": self.rope_scaling.beta_fast,
        }


def _alternating(n: int) -> tuple[str, ...]:
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n))


def _require(raw: dict, name: str, source: str):
    if name not in raw:
        raise ConfigError(f"{source}: missing required field '{name}'")
    return raw[name]


def _from_hf(raw: dict, source: str) -> dict:
    names = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "num_experts_per_tok",
             "sliding_window"]
    out = {n: _require(raw, n, source) for n in names}
    out["num_local_experts"] = raw.get("num_local_experts", raw.get("num_experts"))
    if out["num_local_experts"] is None:
        raise ConfigError(f"{source}: missing required field 'num_local_experts'")
    out["head_dim"] = raw.get("head_dim") or out["hidden_size"] // out["num_attention_heads"]
    out["layer_types"] = tuple(raw.get("layer_types") or _alternating(out["num_hidden_layers"]))
    # transformers 4.x writes rope_theta + rope_scaling, 5.x rope_parameters.
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or raw.get("rope_theta", 150000.0)
    rope_type = rope.pop("rope_type", rope.pop("type", "yarn"))
    if rope_type not in ("yarn", "default"):
        raise ConfigError(f"{source}: unsupported rope_type '{rope_type}' (gpt-oss uses yarn)")
    if rope_type == "default":
        rope = {"factor": 1.0}
    rope.setdefault("original_max_position_embeddings",
                    raw.get("initial_context_length", raw.get("max_position_embeddings", 4096)))
    for k in ("attention_factor", "mscale", "mscale_all_dim", "partial_rotary_factor"):
        if rope.get(k) not in (None, 1.0):
            raise ConfigError(f"{source}: unsupported rope parameter '{k}'")
        rope.pop(k, None)
    out["rope_theta"] = theta
    out["rope_scaling"] = rope
    for k in ("rms_norm_eps", "max_position_embeddings", "swiglu_limit"):
        if k in raw:
            out[k] = raw[k]
    if isinstance(raw.get("eos_token_id"), int):
        out["eos_token_id"] = raw["eos_token_id"]
    if isinstance(raw.get("pad_token_id"), int):
        out["pad_token_id"] = raw["pad_token_id"]
    q = raw.get("quantization_config")
    if q:
        method = q.get("quant_method")
        if method != "mxfp4":
            raise ConfigError(f"{source}: unsupported quantization_config.quant_method '{method}'")
        out["quantization"] = "mxfp4"
    return out


def _from_original(raw: dict, source: str) -> dict:
    names = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
             "experts_per_token", "sliding_window"]
    r = {n: _require(raw, n, source) for n in names}
    ctx = raw.get("initial_context_length", 4096)
    factor = raw.get("rope_scaling_factor", 1.0)
    return {
        **{n: r[n] for n in names[:7]},
        "num_local_experts": r["num_experts"],
        "num_experts_per_tok": r["experts_per_token"],
        "sliding_window": r["sliding_window"],
        "layer_types": _alternating(r["num_hidden_layers"]),
        "rope_theta": raw.get("rope_theta", 150000.0),
        "rope_scaling": {
            "factor": factor,
            "beta_fast": raw.get("rope_ntk_beta", 32.0),
            "beta_slow": raw.get("rope_ntk_alpha", 1.0),
            "original_max_position_embeddings": ctx,
            "truncate": False,
        },
        "max_position_embeddings": int(ctx * max(factor, 1.0)),
        "swiglu_limit": raw.get("swiglu_limit", 7.0),
    }


def config_from_dict(raw: dict, source: str = "config.json", quantization: str | None = None) -> GptOssConfig:
    """Build a config from either layout's dict; errors name the bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    is_original = "num_experts" in raw and "experts_per_token" in raw and "num_local_experts" not in raw \
        and "model_type" not in raw
    fields = _from_original(raw, source) if is_original else _from_hf(raw, source)
    if quantization and "quantization" not in fields:
        fields["quantization"] = quantization
    try:
        return GptOssConfig(**fields)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: str | Path, quantization: str | None = None) -> GptOssConfig:
    path = Path(path)
    f = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(f.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{f}: no config.json found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f}: not valid JSON ({e})") from None
    return config_from_dict(raw, str(f), quantization)
