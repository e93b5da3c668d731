"""Measured launch configs (written by `python -m kernels.tune`), as the launchers look them up.

A launcher asks `lookup(kernel, shape, batch, device)` and falls back to its
hand-written default on None. The file is kernels/configs/<device name>.json
for the CUDA device the tensors are on (`device_file`), or the JSON that
GPTOSS_KERNEL_CONFIGS names (any device, the interpreter included, which is
how the tests check a file is obeyed); GPTOSS_KERNEL_CONFIGS=off uses no file.
A match needs the exact shape key and takes the entry whose batch bucket is
nearest `batch` as a ratio (ties to the larger bucket), within a factor of REACH
either way; beyond that reach there is none. Nearest, not "the next bucket up":
tuned buckets are sparse (decode at 1..256 sequences, then the prefill chunk's
8,192 tokens), and a decode step of 512 sequences on the chunk's compute-sized
tiles (BLOCK_M up to 256, 16 rows an expert) would pay ~16x the MMA work of a
decode tile; past the largest bucket, a prefill chunk of 16,384 tokens keeps the
8,192-token tiles rather than the launcher's guess. An entry whose config is
null records that a baseline outside the kernels won there (kernels.tune:
cuBLAS for the linears), so it answers None like no entry, but it is still the
nearest measurement and keeps a neighbouring bucket's config from reaching it.

Files are read once per path (`clear_cache()` forgets them). Inside `forced()`
the given configs win over any file: kernels.tune times candidates with it.
"""

import bisect
import functools
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch

ENV = "GPTOSS_KERNEL_CONFIGS"
REACH = 4  # a config serves batches up to this factor from the batch it was measured at
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

_forced: dict[str, dict] | None = None


def shape_key(**dims) -> str:
    """Shape string in the caller's order: shape_key(H=2880, dtype=torch.bfloat16) -> 'H=2880,dtype=bfloat16'."""
    return ",".join(f"{k}={str(v).removeprefix('torch.')}" for k, v in dims.items())


def device_file(name: str, root: Path = CONFIG_DIR) -> Path:
    """'NVIDIA H200' -> root/NVIDIA_H200.json."""
    return Path(root) / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".json")


@contextmanager
def forced(configs: dict[str, dict]):
    """{kernel: config} that lookup returns whatever the files say (nested uses are merged)."""
    global _forced
    prev = _forced
    _forced = {**(prev or {}), **configs}
    try:
        yield
    finally:
        _forced = prev


def lookup(kernel: str, shape: str, batch: int, device) -> dict | None:
    """The tuned config for this launch, or None (then the launcher's default runs)."""
    if _forced is not None and kernel in _forced:
        return dict(_forced[kernel])
    path = _path(torch.device(device))
    if path is None:
        return None
    hit = _pick(str(path), kernel, shape, max(int(batch), 1))
    return dict(hit) if hit is not None else None


def clear_cache() -> None:
    _load.cache_clear()
    _pick.cache_clear()
    _device_config.cache_clear()


def _path(device: torch.device) -> Path | None:
    env = os.environ.get(ENV, "").strip()
    if env.lower() == "off":
        return None
    if env:
        return Path(env)
    from . import _triton
    if device.type == "cuda":
        return _device_config(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "meta" and _triton._recorded is not None and torch.cuda.is_available():
        return _device_config(torch.cuda.current_device())  # kernels.aot on a GPU machine: what this GPU would run
    return None


@functools.lru_cache(maxsize=None)
def _device_config(idx: int) -> Path | None:
    """This GPU's file if there is one; asked once per process, not per launch."""
    p = device_file(torch.cuda.get_device_name(idx))
    return p if p.exists() else None


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict[tuple[str, str], tuple[list[int], list[dict]]]:
    """{(kernel, shape): (sorted batch buckets, their configs)}."""
    try:
        entries = json.loads(Path(path).read_text())["entries"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{ENV}={path}: no such file (set {ENV}=off to use no tuned configs)") from None
    table: dict[tuple[str, str], dict[int, dict]] = {}
    for e in entries:
        table.setdefault((e["kernel"], e["shape"]), {})[int(e["batch"])] = e["config"]
    return {k: (sorted(v), [v[b] for b in sorted(v)]) for k, v in table.items()}


@functools.lru_cache(maxsize=4096)
def _pick(path: str, kernel: str, shape: str, batch: int) -> dict | None:
    found = _load(path).get((kernel, shape))
    if found is None:
        return None
    buckets, configs = found
    i = bisect.bisect_left(buckets, batch)
    ratio = lambda j: max(batch / buckets[j], buckets[j] / batch)  # noqa: E731
    # the neighbours below and at-or-above; ties to the larger (j = i), as the old "next bucket up" rule
    j = min((j for j in (i - 1, i) if 0 <= j < len(buckets)), key=lambda j: (ratio(j), -j))
    return configs[j] if ratio(j) <= REACH else None


__all__ = ["CONFIG_DIR", "ENV", "REACH", "clear_cache", "device_file", "forced", "lookup", "shape_key"]
