"""Executors run the model for the engine: in this process, or over N rank workers.

The engine hands an executor one `StepInput` per step (plain tensors, so it
can cross a process boundary) and gets back the logits of the rows it samples.

On CUDA with the Triton kernels, LocalExecutor replays pure-decode steps as
CUDA graphs, one per batch-size bucket (kernels/cuda_graphs.py): the step is
padded to its bucket by `pad_decode_step` (a pure function, tested on CPU),
its hidden states come from the graph and the logits of the sampled rows are
computed eagerly (one large matmul gains nothing from a graph, and a static
[bucket, vocab] output would cost memory). Prefill and mixed steps, batches
past the largest bucket and everything off CUDA run eagerly.
`GPTOSS_CUDA_GRAPHS=0` or `LocalExecutor(..., cuda_graphs=False)` turns graphs off.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import torch

from kernels import dispatch
from kernels.cuda_graphs import DEFAULT_BUCKETS, DecodeGraphRunner, bucket_for
from models.attention import NULL_BLOCK, KVCache, PagedMetadata, cache_dtype

from .sampler import SamplerOutput
from .sampler_state import SampleSpec, SamplerState

log = logging.getLogger(__name__)
GRAPHS_ENV = "GPTOSS_CUDA_GRAPHS"


@dataclass
class StepInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    query_start: torch.Tensor
    context_lens: torch.Tensor
    block_tables: dict[str, torch.Tensor]
    slot_mapping: dict[str, torch.Tensor]
    sample_rows: torch.Tensor
    # overlapped scheduling: [n, 2] (row of input_ids, row of the previous step's samples) for inputs
    # that step sampled and the engine has not read yet; the executor fills them where they are
    fill: torch.Tensor | None = None
    # attention data parallelism: [sequences] the attention group each sequence's KV lives in
    groups: torch.Tensor | None = None
    # attention data parallelism, a group's sub-step: the decode bucket every group pads to (all run
    # the static forward, whose MoE gathers every group's tokens), or 0: every group runs eagerly (the
    # all-to-all). The ranks must agree, so the driver decides; None: the executor decides (one group).
    pad_to: int | None = None


@dataclass(frozen=True)
class CacheSpec:
    block_size: int
    blocks: dict[str, int]      # pool name -> blocks
    layer_group: tuple[str, ...]
    kv_cache_dtype: str = "auto"  # EngineConfig.kv_cache_dtype


def allocate_cache(model, spec: CacheSpec) -> KVCache:
    """The KV pools of this process's share of the KV heads."""
    heads = model.blocks[0].attn.qkv.nkv
    return KVCache.allocate(len(spec.layer_group), [spec.blocks[g] for g in spec.layer_group], spec.block_size,
                            heads, model.config.head_dim, cache_dtype(spec.kv_cache_dtype, model.dtype),
                            model.device)


def to_device(tensors: dict[str, torch.Tensor], dev: torch.device, pack: bool | None = None
              ) -> dict[str, torch.Tensor]:
    """Move host tensors to `dev`. On CUDA (pack=None) the int64 ones cross as one pinned,
    asynchronous copy: one transfer instead of one per tensor, and a copy from pageable memory
    could make the host wait for the work already queued, while the engine wants to schedule
    the next step as the device runs this one."""
    pack = dev.type == "cuda" if pack is None else pack
    out = {k: v.to(dev) for k, v in tensors.items() if v.device.type != "cpu" or v.dtype != torch.long}
    host = {k: v for k, v in tensors.items() if k not in out}
    if not pack or not host:
        return {**out, **{k: v.to(dev) for k, v in host.items()}}
    # each tensor starts 128 bytes in: kernels see aligned pointers (Triton compiles a copy per alignment)
    starts, end = [], 0
    for v in host.values():
        starts.append(end)
        end += -(-v.numel() // 16) * 16
    buf = torch.empty(end, dtype=torch.long, pin_memory=dev.type == "cuda")
    for (k, v), a in zip(host.items(), starts):
        buf[a:a + v.numel()] = v.reshape(-1)
    flat = buf.to(dev, non_blocking=True)
    for (k, v), a in zip(host.items(), starts):
        out[k] = flat[a:a + v.numel()].view(v.shape)
    return out


def fill_pending(step: StepInput, last: torch.Tensor) -> StepInput:
    """The step with its pending inputs taken from `last` (the previous step's sampled ids, on the
    device that sampled them), on that device: no wait for those ids to reach the host."""
    if step.fill is None:
        return step
    t = to_device({"ids": step.input_ids, "fill": step.fill}, last.device)
    dst, src = t["fill"].unbind(1)
    ids = t["ids"]
    ids[dst] = last[src]
    return dataclasses.replace(step, input_ids=ids, fill=None)


def step_tensors(step: StepInput) -> dict[str, torch.Tensor]:
    return {"input_ids": step.input_ids, "positions": step.positions, "query_start": step.query_start,
            "context_lens": step.context_lens, "sample_rows": step.sample_rows,
            **{"table/" + g: t for g, t in step.block_tables.items()},
            **{"slot/" + g: t for g, t in step.slot_mapping.items()}}


def _max_query_len(query_start: torch.Tensor) -> int | None:
    # read from the engine's CPU tensors so the Triton path needs no device->host sync
    if query_start.device.type != "cpu" or query_start.numel() < 2:
        return None
    return int((query_start[1:] - query_start[:-1]).max())


def run_step(model, cache: KVCache, spec: CacheSpec, step: StepInput, num_real_tokens: int | None = None
             ) -> torch.Tensor:
    """Eager step. num_real_tokens: rows past it are padding (left out of the expert load)."""
    dev = model.device
    mask = None
    if num_real_tokens is not None:
        mask = torch.arange(step.input_ids.numel(), device=dev) < num_real_tokens
    t = to_device(step_tensors(step), dev)
    meta = PagedMetadata(cache, t["query_start"], t["context_lens"],
                         {g: t["table/" + g] for g in step.block_tables}, {g: t["slot/" + g] for g in step.slot_mapping},
                         list(spec.layer_group), max_query_len=_max_query_len(step.query_start), token_mask=mask)
    hidden = model(t["input_ids"], t["positions"], meta)
    return model.compute_logits(hidden[t["sample_rows"]])


# ---------------------------------------------------------------- decode steps as CUDA graphs

def decode_bucket(step: StepInput, buckets: tuple[int, ...]) -> int | None:
    """The bucket of a pure-decode step (every sequence brings exactly one token), else None."""
    n = step.context_lens.numel()
    if n == 0 or step.input_ids.numel() != n:
        return None
    if not torch.equal(step.query_start.cpu(), torch.arange(n + 1, dtype=step.query_start.dtype)):
        return None
    return bucket_for(n, buckets)


def pad_decode_step(step: StepInput, bucket: int, width: int, block_size: int,
                    full_width: bool = False) -> StepInput | None:
    """A decode step of n sequences padded to `bucket` sequences; its block tables keep their own
    width (the graph runner pads them on the device) unless `full_width`: then `width` wide, the
    shape a graph is captured with. A host-side [256, 8192] table per pool every step would be
    tens of MB built and copied per decode step.

    Each padding row is a one-token sequence of its own (token 0 at position 0, context 1,
    a table of NULL_BLOCK only) writing its k/v to slot 0 of the null block and reading it
    back: real sequences never read that slot unmasked (the torch path masks NULL entries,
    the kernel never visits them), padding rows all write the same values there, and their
    outputs are finite and ignored (sample_rows keeps the real rows). None when a table is
    wider than `width` (the step then runs eagerly)."""
    n = step.context_lens.numel()
    p = bucket - n
    if p < 0 or any(t.shape[1] > width for t in step.block_tables.values()):
        return None

    def grow(t: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([t, t.new_full((p,), value)])

    def table(t: torch.Tensor) -> torch.Tensor:
        out = t.new_full((bucket, width if full_width else t.shape[1]), NULL_BLOCK)
        out[:n, :t.shape[1]] = t
        return out

    return StepInput(
        input_ids=grow(step.input_ids, 0), positions=grow(step.positions, 0),
        query_start=torch.arange(bucket + 1, dtype=step.query_start.dtype),
        context_lens=grow(step.context_lens, 1),
        block_tables={g: table(t) for g, t in step.block_tables.items()},
        slot_mapping={g: grow(t, NULL_BLOCK * block_size) for g, t in step.slot_mapping.items()},
        sample_rows=step.sample_rows)


def null_step(tokens: int, spec: CacheSpec) -> StepInput:
    """One sequence of `tokens` tokens whose whole table is the null block: it writes and reads only
    that block (as padding rows do), so running it changes no real sequence's KV."""
    n_blocks = -(-tokens // spec.block_size)
    z = torch.zeros(tokens, dtype=torch.long)
    return StepInput(z, torch.arange(tokens), torch.tensor([0, tokens]), torch.tensor([tokens]),
                     {g: torch.full((1, n_blocks), NULL_BLOCK) for g in spec.blocks},
                     {g: torch.full((tokens,), NULL_BLOCK * spec.block_size) for g in spec.blocks},
                     torch.tensor([tokens - 1]))


def empty_step(groups) -> StepInput:
    """A step of no sequence: pad_decode_step turns it into an all-padding step (graph capture)."""
    z = torch.zeros(0, dtype=torch.long)
    return StepInput(z, z, torch.zeros(1, dtype=torch.long), z, {g: z.view(0, 1) for g in groups},
                     {g: z for g in groups}, z)


def static_forward_supported(model) -> bool:
    """Whether the decode forward can run with no host reads (PagedMetadata(static=True)): MXFP4
    experts (the torch expert loop reads counts on the host) and, over several ranks, MoE layers
    that need no all-to-all sizes: one EP rank (the split group's slices are gathered at sizes
    known up front), an EP group holding the same tokens that may combine by all-reduce, or
    attention-DP groups whose decode steps pad to one bucket and gather every group's tokens."""
    comm = model.comm
    # an EP group holding the same tokens all-reduces; attention-DP ranks gather every group's tokens
    # first and reduce-scatter (models.layers.MoE); the all-to-all reads its sizes on the host
    moe_ok = comm.ep_size == 1 or all(b.moe.combine != "all_to_all" for b in model.blocks)
    return moe_ok and all(b.moe.packed for b in model.blocks)


def graphs_supported(model) -> bool:
    """Static conditions for capturing the decode forward: on CUDA, and a static forward exists
    (its collectives, NCCL all-reduces and all-gathers of fixed sizes, are captured with it). That
    the Triton kernels run (dispatch.use_triton) is checked per step, since GPTOSS_KERNELS may change."""
    return model.device.type == "cuda" and torch.cuda.is_available() and static_forward_supported(model)


def graph_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Decode graph buckets up to the first that holds max_num_seqs: no larger decode step exists.
    Past the largest bucket (an fp8 cache's 1,024 sequences) all buckets, and larger steps run eagerly:
    at those batches a step's kernels outlast their launches."""
    top = bucket_for(max_num_seqs, DEFAULT_BUCKETS)
    if top is None:
        return DEFAULT_BUCKETS
    return tuple(b for b in DEFAULT_BUCKETS if b < max_num_seqs) + (top,)


def _graphs_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return os.environ.get(GRAPHS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class LocalExecutor:
    """cuda_graphs: None = on unless GPTOSS_CUDA_GRAPHS=0 (and only where graphs_supported);
    "eager" = decode steps take the graph path (padded to a bucket, static forward) but run eagerly,
    on any device: the graph path's logic, checked off CUDA."""

    def __init__(self, model, spec: CacheSpec, cuda_graphs: bool | str | None = None,
                 graph_buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        self.model, self.spec = model, spec
        self.config = model.config
        if model.device.type == "cuda":
            torch.cuda.set_device(model.device)  # Triton launches, and graphs capture, on the current device
        self.cache = allocate_cache(model, spec)
        self.sampling = SamplerState()
        self.buckets = graph_buckets
        self.graphs: DecodeGraphRunner | None = None
        pads = {f"table/{g}": NULL_BLOCK for g in spec.blocks}
        if cuda_graphs == "eager":
            if not static_forward_supported(model):
                raise ValueError("this model has no static decode forward (see static_forward_supported)")
            self.graphs = DecodeGraphRunner(self._graph_forward, buckets=graph_buckets, enabled=False, pads=pads)
        elif _graphs_enabled(cuda_graphs) and graphs_supported(model):
            self.graphs = DecodeGraphRunner(self._graph_forward, buckets=graph_buckets, enabled=True, pads=pads)
        # tables padded to a width fixed up front, so a growing sequence never outgrows its graph:
        # no table is wider than the full pool, nor than the longest position in blocks
        pool = spec.blocks.get("full", max(spec.blocks.values()))
        self.graph_width = min(pool, -(-model.config.max_position_embeddings // spec.block_size))

    @property
    def asynchronous(self) -> bool:
        """Work is queued, not done, when execute returns: the engine may schedule ahead."""
        return self.model.device.type == "cuda"

    def execute_sampled(self, step: StepInput, spec: SampleSpec | None) -> SamplerOutput | None:
        logits = self.execute(step)
        return self.sampling.sample(logits, spec) if spec is not None else None

    def execute(self, step: StepInput) -> torch.Tensor:
        step = fill_pending(step, self.sampling.last) if step.fill is not None else step
        graph_path = self.graphs is not None and (self.graphs.enabled is False or dispatch.use_triton(self.model.device))
        if step.pad_to is not None:  # attention DP: the driver chose for every group
            if step.pad_to and graph_path:
                padded = pad_decode_step(step, step.pad_to, self.graph_width, self.spec.block_size)
                if padded is None:  # no table outgrows graph_width (the pool, the longest position)
                    raise RuntimeError(f"a decode step does not fit bucket {step.pad_to}")
                return self._replay(padded, step.context_lens.numel())
            return run_step(self.model, self.cache, self.spec, step)
        if graph_path:
            bucket = decode_bucket(step, self.graphs.buckets)
            padded = None if bucket is None else pad_decode_step(step, bucket, self.graph_width,
                                                                 self.spec.block_size)
            if padded is not None:
                return self._replay(padded, step.context_lens.numel())
        return run_step(self.model, self.cache, self.spec, step)

    def _graph_forward(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The captured function: the decode forward on static inputs, no host reads."""
        groups = [k.split("/", 1)[1] for k in t if k.startswith("table/")]
        meta = PagedMetadata(self.cache, t["query_start"], t["context_lens"],
                             {g: t["table/" + g] for g in groups}, {g: t["slot/" + g] for g in groups},
                             list(self.spec.layer_group), max_query_len=1, token_mask=t["token_mask"],
                             static=True)
        return self.model(t["input_ids"], t["positions"], meta)

    def _graph_inputs(self, padded: StepInput, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The graph's inputs on the device, and the rows to sample (not a graph input)."""
        dev = self.model.device
        inputs = to_device(step_tensors(padded), dev)
        inputs["token_mask"] = torch.arange(padded.context_lens.numel(), device=dev) < n
        return inputs, inputs.pop("sample_rows")

    def _capture(self, bucket: int, inputs: dict[str, torch.Tensor]) -> bool:
        # warm-up runs count expert load and rewrite this step's k/v (the same values):
        # restore the load so that only replays count
        loads = [b.moe.load.clone() for b in self.model.blocks]
        try:
            self.graphs.capture(bucket, inputs, bucket)
            ok = True
        except Exception:  # a failed capture must not take the engine down: decode eagerly from now on
            log.exception("CUDA graph capture failed for bucket %d", bucket)
            ok = False
        for b, saved in zip(self.model.blocks, loads):
            b.moe.load.copy_(saved)
        # over ranks, all keep graphs or none: the eager fallback is the same static forward (same
        # collectives as a replay), and a rank still capturing the next bucket needs every rank there
        if not self.model.comm.all_ok(ok):
            log.warning("CUDA graph capture failed on a rank (bucket %d): decode steps run eagerly", bucket)
            self.graphs.enabled = False
            return False
        return True

    def _replay(self, padded: StepInput, n: int) -> torch.Tensor:
        bucket = padded.context_lens.numel()
        inputs, rows = self._graph_inputs(padded, n)
        if bucket not in self.graphs.graphs and self.graphs.active(inputs):
            # captured at the full width, so later steps' narrower tables are padded into it on the device
            wide = pad_decode_step(padded, bucket, self.graph_width, self.spec.block_size, full_width=True)
            self._capture(bucket, self._graph_inputs(wide, n)[0])  # failed: the runner calls it eagerly
        hidden = self.graphs.run(inputs, bucket)  # a view of the graph's output buffer: index it now
        return self.model.compute_logits(hidden[rows])

    def capture_graphs(self) -> int:
        """Capture every bucket now, largest first (the smaller graphs reuse its memory pool), instead of
        on each bucket's first step. The steps are all padding: they write only the null block and count
        no expert load. Returns the number of graphs held."""
        if self.graphs is None or not self.graphs.enabled or not dispatch.use_triton(self.model.device):
            return 0
        empty = empty_step(self.spec.blocks)
        for b in sorted(self.graphs.buckets, reverse=True):
            if b not in self.graphs.graphs:
                padded = pad_decode_step(empty, b, self.graph_width, self.spec.block_size, full_width=True)
                if not self._capture(b, self._graph_inputs(padded, 0)[0]):
                    return 0
        return len(self.graphs.graphs)

    def warmup(self, max_tokens: int) -> dict:
        """Compile every kernel configuration before traffic arrives, instead of in the middle of a
        request (seconds per compilation on a GPU): prefill steps of 1, 2, 4, ... `max_tokens` tokens
        (launchers pick tiles by size class, and powers of two reach every class; token counts are
        not specialised, kernels._triton.no_specialize), then every decode graph. The steps touch
        only the null block and leave the expert load as it was. The prefill steps run unmasked, as
        real prefills do (a mask is a kernel variant of its own, and masked rows reach no expert:
        nothing would be compiled for them); the decode graphs compile the masked variants. Returns
        what ran."""
        t0 = time.perf_counter()
        sizes = [1 << i for i in range(max(1, max_tokens).bit_length()) if 1 << i < max_tokens] + [max_tokens]
        loads = [b.moe.load.clone() for b in self.model.blocks]
        for n in sizes:
            run_step(self.model, self.cache, self.spec, null_step(n, self.spec))
        for b, saved in zip(self.model.blocks, loads):
            b.moe.load.copy_(saved)
        graphs = self.capture_graphs()
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return {"prefill_sizes": sizes, "graphs": graphs, "seconds": time.perf_counter() - t0}

    def expert_load(self) -> torch.Tensor:
        return torch.stack([b.moe.load for b in self.model.blocks])

    def shutdown(self) -> None:
        pass
