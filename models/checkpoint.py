"""Random gpt-oss checkpoints in the real formats (HF and original/, MXFP4 or bf16 experts).

Every tensor is drawn from its own generator seeded by (seed, logical name),
so the same seed gives the same weights whatever the layout, and tensors are
written shard by shard: memory stays near one shard, never the whole model.
Scales keep activations O(1) through every layer: q.k/sqrt(d), router logits
and logits all come out with a standard deviation near one.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path
from typing import Iterator, Literal

import torch
from safetensors.torch import save_file

from .config import GptOssConfig, RopeScaling
from .weights import GLOBAL_NAMES, layer_tensor_names

YARN = RopeScaling(factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=4096, truncate=False)


def _alt(n: int) -> tuple[str, ...]:
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n))


def _preset(**kw) -> GptOssConfig:
    base = dict(vocab_size=201088, num_experts_per_tok=4, rope_theta=150000.0, rope_scaling=YARN,
                max_position_embeddings=131072)
    base.update(kw)
    base["layer_types"] = _alt(base["num_hidden_layers"])
    return GptOssConfig(**base)


PRESETS: dict[str, GptOssConfig] = {
    # tiny keeps the real vocab so harmony's special tokens are real tokens of the model
    "tiny": _preset(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_local_experts=8, sliding_window=16),
    "small": _preset(hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=32, num_local_experts=16, sliding_window=32),
    "gpt-oss-20b": _preset(hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                           num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                           num_local_experts=32, sliding_window=128),
    "gpt-oss-120b": _preset(hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                            num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                            num_local_experts=128, sliding_window=128),
}

Format = Literal["hf", "original", "both"]
Experts = Literal["mxfp4", "bf16"]


def _gen(seed: int, name: str, device: str | torch.device = "cpu") -> torch.Generator | None:
    if torch.device(device).type == "meta":  # shapes only (full-size dry runs): no numbers to draw
        return None
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _normal(seed: int, name: str, shape, std: float, mean: float = 0.0, device="cpu") -> torch.Tensor:
    g = _gen(seed, name, device)
    return (torch.randn(shape, generator=g, device=device) * std + mean).to(torch.bfloat16)


def _mxfp4(seed: int, name: str, out: int, inp: int, n: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks with scales chosen so each weight has std ~ 1/sqrt(inp)."""
    g = _gen(seed, name, device)
    blocks = torch.randint(0, 256, (n, out, inp // 32, 16), dtype=torch.uint8, generator=g, device=device)
    rms_code = math.sqrt(68.5 / 8)  # rms of the 16 E2M1 values
    s0 = 127 + round(math.log2(1.0 / (math.sqrt(inp) * rms_code)))
    scales = (s0 + torch.randint(-1, 2, (n, out, inp // 32), generator=g, device=device)).to(torch.uint8)
    return blocks, scales


def tensor_specs(cfg: GptOssConfig, experts: Experts) -> Iterator[tuple[str, int | None, tuple, str, float, float]]:
    """(logical name, layer or None, shape, kind, std, mean) of every tensor, in file order.

    kind is "normal" (bf16 draw), or "blocks"/"scales" for MXFP4 experts
    (std then is the target weight std). Experts are [E, out, in].
    """
    V, H, I = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    Hq, K, D, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_local_experts
    yield "embed", None, (V, H), "normal", 1.0, 0.0
    for i in range(cfg.num_hidden_layers):
        yield "attn_norm", i, (H,), "normal", 0.05, 1.0
        yield "mlp_norm", i, (H,), "normal", 0.05, 1.0
        for n, rows in (("q", Hq * D), ("k", K * D), ("v", K * D)):
            yield f"{n}_w", i, (rows, H), "normal", 1 / math.sqrt(H), 0.0
            yield f"{n}_b", i, (rows,), "normal", 0.05, 0.0
        yield "o_w", i, (H, Hq * D), "normal", 1 / math.sqrt(Hq * D), 0.0
        yield "o_b", i, (H,), "normal", 0.05, 0.0
        yield "sinks", i, (Hq,), "normal", 1.0, 0.0
        yield "router_w", i, (E, H), "normal", 1 / math.sqrt(H), 0.0
        yield "router_b", i, (E,), "normal", 0.1, 0.0
        for w, out, inp in (("w1", 2 * I, H), ("w2", H, I)):
            if experts == "mxfp4":
                yield f"{w}_blocks", i, (E, out, inp // 32, 16), "blocks", 1 / math.sqrt(inp), 0.0
                yield f"{w}_scales", i, (E, out, inp // 32), "scales", 1 / math.sqrt(inp), 0.0
            else:
                yield w, i, (E, out, inp), "normal", 1 / math.sqrt(inp), 0.0
        yield "b1", i, (E, 2 * I), "normal", 0.05, 0.0
        yield "b2", i, (E, H), "normal", 0.05, 0.0
    yield "norm", None, (H,), "normal", 0.05, 1.0
    yield "unembed", None, (V, H), "normal", 1 / math.sqrt(H), 0.0


def spec_bytes(shape: tuple, kind: str) -> int:
    return math.prod(shape) * (1 if kind in ("blocks", "scales") else 2)


def logical_tensors(cfg: GptOssConfig, seed: int, experts: Experts) -> Iterator[tuple[str, int | None, torch.Tensor]]:
    """Yield (logical name, layer or None, tensor), drawn one at a time."""
    mx: dict = {}
    for name, layer, shape, kind, std, mean in tensor_specs(cfg, experts):
        key = name if layer is None else f"{layer}.{name}"
        if kind == "normal":
            yield name, layer, _normal(seed, key, shape, std, mean)
        elif kind == "blocks":  # blocks and scales come from one draw, in that order
            b, mx["scales"] = _mxfp4(seed, key.removesuffix("_blocks"), shape[1], shape[2] * 32, shape[0])
            yield name, layer, b
        else:
            yield name, layer, mx.pop("scales")


class _ShardWriter:
    """Accumulates tensors and flushes a safetensors shard past `shard_bytes`."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[Path, list[str]]] = []

    def add(self, name: str, t: torch.Tensor):
        self.pending[name] = t.contiguous()
        self.size += t.numel() * t.element_size()
        if self.size >= self.shard_bytes:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        tmp = self.out / f".shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(tmp), metadata={"format": "pt"})
        self.files.append((tmp, list(self.pending)))
        self.pending, self.size = {}, 0

    def finish(self, stem: str) -> None:
        self.flush()
        n = len(self.files)
        if n == 1:
            self.files[0][0].rename(self.out / f"{stem}.safetensors")
            return
        weight_map, total = {}, 0
        for k, (tmp, names) in enumerate(self.files):
            final = self.out / f"{stem}-{k + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(final)
            total += final.stat().st_size
            weight_map.update({nm: final.name for nm in names})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _physical(layout: str, logical: str, layer: int | None, t: torch.Tensor, cfg: GptOssConfig):
    """Map one logical tensor onto the layout's tensor name(s)."""
    if layer is None:
        return [(GLOBAL_NAMES[layout][logical], t)]
    names = layer_tensor_names(layout, layer)
    if layout == "hf":
        if logical in ("w1", "w2"):  # transformers keeps unquantized experts as (in, out)
            return [(names[logical], t.transpose(1, 2))]
        return [(names[logical], t)]
    if logical in ("q_w", "k_w", "v_w", "q_b", "k_b", "v_b"):
        return []  # fused into qkv by the caller
    return [(names[logical], t)]


def write_checkpoint(out: str | Path, cfg: GptOssConfig, layout: Literal["hf", "original"], seed: int = 0,
                     experts: Experts = "mxfp4", shard_bytes: int = 2 * 2**30) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if experts == "mxfp4":
        cfg = cfg.model_copy(update={"quantization": "mxfp4"})
        GptOssConfig.model_validate(cfg.model_dump())
    else:
        cfg = cfg.model_copy(update={"quantization": None})
    cfg_dict = cfg.to_hf_dict() if layout == "hf" else cfg.to_original_dict()
    w = _ShardWriter(out, shard_bytes)
    qkv: dict[str, torch.Tensor] = {}
    for logical, layer, t in logical_tensors(cfg, seed, experts):
        if layout == "original" and logical[0] in "qkv" and logical[1] == "_":
            qkv[logical] = t
            if len(qkv) == 6:
                names = layer_tensor_names(layout, layer)
                w.add(names["qkv_w"], torch.cat([qkv["q_w"], qkv["k_w"], qkv["v_w"]]))
                w.add(names["qkv_b"], torch.cat([qkv["q_b"], qkv["k_b"], qkv["v_b"]]))
                qkv = {}
            continue
        for name, pt in _physical(layout, logical, layer, t, cfg):
            w.add(name, pt)
    w.finish("model")
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    if layout == "hf":
        gen = {"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def make_checkpoint(out: str | Path, preset: str | GptOssConfig = "tiny", fmt: Format = "hf",
                    experts: Experts = "mxfp4", seed: int = 0, shard_bytes: int = 2 * 2**30,
                    overwrite: bool = False) -> Path:
    """Write a random checkpoint; `fmt="both"` mirrors an HF snapshot (HF at the root, original/ inside)."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"'{out}' exists and is not empty (pass overwrite / --force to replace it)")
        shutil.rmtree(out)
    if fmt in ("hf", "both"):
        write_checkpoint(out, cfg, "hf", seed, experts, shard_bytes)
    if fmt == "original":
        write_checkpoint(out, cfg, "original", seed, experts, shard_bytes)
    if fmt == "both":
        write_checkpoint(out / "original", cfg, "original", seed, experts, shard_bytes)
    return out


class RandomCheckpoint:
    """What make_checkpoint(preset, "hf", experts, seed) writes, as a reader that draws each
    tensor when it is read: a stand-in for a checkpoint path in open_checkpoint / load_model.

    For full-size runs: gpt-oss-120b is ~65 GB, which would otherwise be drawn on the CPU,
    written to disk (more than some GPU machines have) and read back before the first step.
    On the CPU the draws are the file's, so a model loaded from here equals one loaded from
    the written checkpoint (tested); on another device they run there with that device's
    generator: the same names, shapes, dtypes and distributions, other numbers.
    """

    layout = "hf"

    def __init__(self, preset: str | GptOssConfig, experts: Experts = "mxfp4", seed: int = 0,
                 device: str | torch.device = "cpu"):
        if isinstance(preset, str) and preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
        cfg = PRESETS[preset] if isinstance(preset, str) else preset
        self.config = cfg.model_copy(update={"quantization": "mxfp4" if experts == "mxfp4" else None})
        self.seed, self.device = seed, torch.device(device)
        self.dir = f"random:{preset if isinstance(preset, str) else 'custom'}"  # names it in errors
        self._specs: dict[str, tuple] = {}
        for logical, layer, shape, kind, std, mean in tensor_specs(self.config, experts):
            name = GLOBAL_NAMES["hf"][logical] if layer is None else layer_tensor_names("hf", layer)[logical]
            self._specs[name] = (logical, layer, tuple(shape), kind, std, mean)
        self._other_half: dict[str, torch.Tensor] = {}  # blocks and scales come from one draw

    def has(self, name: str) -> bool:
        return name in self._specs

    def _spec(self, name: str) -> tuple:
        from .weights import CheckpointError
        if name not in self._specs:
            raise CheckpointError(f"missing tensor '{name}' in checkpoint '{self.dir}'")
        return self._specs[name]

    def shape(self, name: str) -> tuple[int, ...]:
        logical, _, shape, *_ = self._spec(name)
        return (shape[0], shape[2], shape[1]) if logical in ("w1", "w2") else shape  # hf keeps (in, out)

    def _draw(self, name: str) -> torch.Tensor:
        logical, layer, shape, kind, std, mean = self._spec(name)
        key = logical if layer is None else f"{layer}.{logical}"
        if kind == "normal":
            t = _normal(self.seed, key, shape, std, mean, self.device)
            return t.transpose(1, 2).contiguous() if logical in ("w1", "w2") else t
        if name in self._other_half:
            return self._other_half.pop(name)
        base = key.removesuffix("_blocks").removesuffix("_scales")
        b, sc = _mxfp4(self.seed, base, shape[1], shape[2] * 32, shape[0], self.device)
        mine, other = (b, sc) if kind == "blocks" else (sc, b)
        partner = name[: -len("blocks")] + "scales" if kind == "blocks" else name[: -len("scales")] + "blocks"
        self._other_half[partner] = other
        return mine

    def read(self, name: str, shape=None, rows=None, dim: int = 0) -> torch.Tensor:
        """As CheckpointReader.read: the tensor, or only `rows` of it along `dim`."""
        from .weights import CheckpointError
        full = self.shape(name)
        if shape is not None and full != tuple(shape):
            raise CheckpointError(f"tensor '{name}' in '{self.dir}' has shape {full}, expected {tuple(shape)}")
        t = self._draw(name)
        if rows is None:
            return t
        if isinstance(rows, slice):
            return t[rows] if dim == 0 else t[:, rows]
        ids = list(rows)
        if ids and ids == list(range(ids[0], ids[0] + len(ids))):  # a run (all experts, say): a view, no copy
            return t.narrow(dim, ids[0], len(ids))
        return t.index_select(dim, torch.as_tensor(ids, device=t.device))
