"""CUDA-graph replay of decode steps, one graph per batch-size bucket (used by engine.executor.LocalExecutor).

Why: a gpt-oss decode step is hundreds of small launches (per layer: norms,
qkv, rope, attention, router, three MoE kernels, ...). At batch 1-64 the GPU
waits on the CPU between them; replaying a captured graph issues the whole
step at once.

What a graph fixes, and how this class copes:
* Shapes and addresses. A step of n sequences runs the graph of the smallest
  bucket >= n. Each bucket owns static input buffers; `run` copies the real
  inputs in, fills rows n.. with that input's pad rule and replays. Inputs
  whose trailing dims are narrower than the captured buffers (block tables
  of shorter sequences) are padded along those dims too; wider ones, or
  n > the largest bucket, run eagerly. Allocate the block-table width for
  max_model_len up front so graphs are never bypassed.
* No host syncs inside. The captured function may not read device values
  on the host (.item(), int(t), .tolist(), torch.bincount on CUDA, boolean
  masks). kernels.dispatch.paged_attention(max_query_len=1) and
  kernels.dispatch.moe qualify; PagedMetadata builds its host-reading
  _Varlen/_plan only on the torch path, so a graph needs the Triton path and
  PagedMetadata(max_query_len=1).
* Padding rows must be harmless. The executor pads before calling `run`
  (engine.executor.pad_decode_step): each padding row is a one-token
  sequence of its own (input 0, position 0, context 1, a NULL_BLOCK table)
  writing k/v to slot 0 of the null block, which real sequences never read
  unmasked, so every row has a finite output and nothing real is touched.
  (This class's own pad rules, e.g. query_start "last" = empty padded
  sequences, also keep real rows right but leave the padded rows' outputs unset.)
* The output is the graph's static buffer: `run` returns a view of its
  first n rows that the next replay of that bucket overwrites.

Graphs share one memory pool; capture the largest bucket first so the
smaller ones reuse its memory. On CPU, or with enabled=False, `run` just
calls the function eagerly on the real inputs.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Callable, Mapping

import torch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512)
Pad = float | int | str  # a fill value, or "last" to repeat the last real row


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    """Smallest bucket >= n, or None when n exceeds them all."""
    if n < 1:
        raise ValueError(f"batch size must be positive, got {n}")
    i = bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def fill_static(static: torch.Tensor, real: torch.Tensor, pad: Pad) -> bool:
    """Copy `real` into the top-left corner of `static` and pad the rest; False if it does not fit.

    pad "last" repeats real's last row (e.g. query_start, so padded sequences are empty)."""
    if real.dim() != static.dim() or any(r > s for r, s in zip(real.shape, static.shape)):
        return False
    rows = real.shape[0]
    if pad == "last":
        if rows == 0 or real.shape[1:] != static.shape[1:]:
            return False
        static[rows:].copy_(real[-1:].expand(static.shape[0] - rows, *real.shape[1:]))
    else:
        static.fill_(pad)
    static[(slice(0, rows),) + tuple(slice(0, d) for d in real.shape[1:])].copy_(real)
    return True


class DecodeGraphRunner:
    """fn(inputs: dict[str, Tensor]) -> Tensor with dim 0 = the batch; inputs' dim 0 is n (+ a fixed extra,
    e.g. query_start has n + 1 rows)."""

    def __init__(self, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, pads: Mapping[str, Pad] | None = None,
                 enabled: bool | None = None, warmup: int = 2):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive sizes, got {buckets}")
        self.fn, self.buckets, self.pads = fn, tuple(buckets), dict(pads or {})
        self.enabled, self.warmup = enabled, warmup
        self.graphs: dict[int, tuple[object, dict[str, torch.Tensor], torch.Tensor]] = {}
        self.pool = None
        self.eager_calls = 0
        self.replays = 0

    def active(self, inputs: Mapping[str, torch.Tensor]) -> bool:
        """Whether `run` would replay graphs for these inputs (CUDA and not disabled)."""
        dev = next(iter(inputs.values())).device
        on_cuda = dev.type == "cuda" and torch.cuda.is_available()
        return on_cuda if self.enabled is None else (self.enabled and on_cuda)

    def run(self, inputs: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        bucket = bucket_for(n, self.buckets)
        if bucket is None or not self.active(inputs):
            self.eager_calls += 1
            return self.fn(dict(inputs))
        if bucket not in self.graphs:
            self.capture(bucket, inputs, n)
        graph, static, out = self.graphs[bucket]
        for name, t in inputs.items():
            if not fill_static(static[name], t, self.pads.get(name, 0)):
                self.eager_calls += 1
                return self.fn(dict(inputs))
        graph.replay()
        self.replays += 1
        return out[:n]

    def capture(self, bucket: int, inputs: Mapping[str, torch.Tensor], n: int) -> None:
        """Record fn on bucket-sized static copies of `inputs` (padded as in `run`)."""
        static = {}
        for name, t in inputs.items():
            shape = (bucket + t.shape[0] - n, *t.shape[1:])
            static[name] = torch.empty(shape, dtype=t.dtype, device=t.device)
            fill_static(static[name], t, self.pads.get(name, 0))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy inits, Triton compiles, autotuning
            for _ in range(self.warmup):
                self.fn(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(static)
        self.pool = graph.pool()
        self.graphs[bucket] = (graph, static, out)

    def capture_all(self, make_inputs: Callable[[int], Mapping[str, torch.Tensor]]) -> None:
        """Capture every bucket, largest first, from make_inputs(bucket) (e.g. dummy decode inputs)."""
        for b in sorted(self.buckets, reverse=True):
            if b not in self.graphs:
                self.capture(b, make_inputs(b), b)


__all__ = ["DEFAULT_BUCKETS", "DecodeGraphRunner", "bucket_for", "fill_static"]
