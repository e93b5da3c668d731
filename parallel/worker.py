"""Rank workers and the driver that steps them.

A worker hosts one rank's shard (its experts, heads and vocab rows) and its
share of the KV cache, and runs whatever the driver sends: engine steps,
plain forwards (tests), stats. Every rank runs every step, so the collectives
inside the model line up; the results come back from rank 0 (and, with
attention data parallelism, from the first rank of each attention group).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from dataclasses import dataclass, field

import torch

from .layout import RankLayout, group_leads, resolve_layout, shard_spec
from .replies import FAILURE_GRACE_S, BrokenGuard, GroupBroken, WorkerError  # noqa: F401 (re-exported)


@dataclass
class WorkerSpec:
    path: str
    tp: int
    ep: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    placement: list[tuple[int, ...]] | None = None
    init_method: str = ""
    attn_dp: bool = False
    keep_mxfp4: bool | None = None
    moe_combine: str = "auto"   # models.layers.MoE: "auto" | "all_to_all" | "all_reduce"
    # engine.executor.LocalExecutor's decode graphs (True / False / "eager") and GPTOSS_KERNELS: None / ""
    # = this (the driver's) environment. Decided here, once: ranks whose settings differed (Ray actors
    # do not inherit the driver's environment) would run different collectives and hang.
    cuda_graphs: bool | str | None = None
    kernels: str = ""

    def __post_init__(self):
        from engine.executor import _graphs_enabled
        if self.cuda_graphs is None:
            self.cuda_graphs = _graphs_enabled(None)
        self.kernels = self.kernels or os.environ.get("GPTOSS_KERNELS", "auto")
    extra: dict = field(default_factory=dict)


def expert_copies(layout: list[RankLayout]) -> list[list[int]]:
    """For each expert, the EP ranks (within an EP group) that hold it."""
    group = [r for r in layout if r.ep_ranks == layout[0].ep_ranks]
    n = max(e for r in group for e in r.experts) + 1
    return [[r.ep_rank for r in group if e in r.experts] for e in range(n)]


def build_rank_model(spec: WorkerSpec, rank: int):
    from models import load_model
    from models.config import load_config
    from models.weights import resolve_layout as resolve_ckpt

    from .comm import DistComm, RendezvousSpec, rank_env_defaults
    rank_env_defaults()
    os.environ["GPTOSS_KERNELS"] = spec.kernels
    cfg = load_config(resolve_ckpt(spec.path)[0])
    layout = resolve_layout(cfg, spec.tp, spec.ep, placement=spec.placement, attn_dp=spec.attn_dp)
    me = layout[rank]
    device = torch.device("cpu")
    if spec.device != "cpu":
        # a Ray actor given one GPU sees only that one (CUDA_VISIBLE_DEVICES), as cuda:0; and Triton
        # launches on the current device, so it must be this rank's
        device = torch.device(f"cuda:{me.local_gpu % max(1, torch.cuda.device_count())}")
        torch.cuda.set_device(device)
    comm = DistComm(layout, rank, RendezvousSpec(rank, me.world, spec.init_method), device)
    model = load_model(spec.path, spec.dtype, device, shard=shard_spec(me), keep_mxfp4=spec.keep_mxfp4, comm=comm,
                       expert_copies=expert_copies(layout), moe_combine=spec.moe_combine)
    return model, comm, layout


class RankRuntime:
    """One rank's shard, cache and message handler; hosted by a process or a Ray actor."""

    def __init__(self, spec: WorkerSpec, rank: int):
        self.spec, self.rank = spec, rank
        self.model, self.comm, layout = build_rank_model(spec, rank)
        self.me = layout[rank]
        self.executor = None  # engine.executor.LocalExecutor over this rank's shard, made by "cache"

    def ping(self) -> bool:
        return True

    def handle(self, kind: str, payload=None):
        from models.attention import DenseMetadata
        model, me = self.model, self.me
        if kind == "stop":
            self.comm.shutdown()
            return None
        if kind == "cache":  # payload: (CacheSpec, decode graph buckets)
            from engine.executor import LocalExecutor
            spec, buckets = payload
            self.executor = LocalExecutor(model, spec, cuda_graphs=self.spec.cuda_graphs, graph_buckets=buckets)
            g = self.executor.graphs
            return None if g is None else "graphs" if g.enabled else "eager graph path"
        if kind == "step":
            logits = self.executor.execute(payload)
            self.comm.end_forward()
            # rank 0, or each attention group's first rank (the others hold the same rows)
            return logits.cpu() if self.me.split_rank == 0 else None
        if kind == "step_sampled":
            return self._step_sampled(*payload)
        if kind == "kv_blocks":  # payload: EngineConfig; before "cache"
            from engine.kv_budget import measure_kv_blocks
            return measure_kv_blocks(model, payload)
        if kind == "warmup":  # every rank runs the same steps, so their collectives line up
            report = self.executor.warmup(payload)
            self.comm.end_forward()  # warmup's all-to-all time and pairs are not traffic's
            self.comm.take_times()
            for b in model.blocks:
                b.moe.received = 0
            return report
        if kind == "logits":  # payload: one list of 1-D token tensors per attention group
            seqs = payload[me.dp_rank if self.spec.attn_dp else 0]
            ids = torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.long)
            pos = torch.cat([torch.arange(len(s)) for s in seqs]) if seqs else ids
            qs = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
            h = model(ids.to(model.device), pos.to(model.device), DenseMetadata(qs.to(model.device)))
            logits = model.compute_logits(h)
            return logits.cpu() if me.tp_rank == 0 else None
        if kind == "expert_load":
            return torch.stack([b.moe.load for b in model.blocks]).cpu()
        if kind == "comm_times":
            return self.comm.take_times() if hasattr(self.comm, "take_times") else []
        if kind == "received":
            return sum(b.moe.received for b in model.blocks)
        if kind == "memory":
            return sum(b.numel() * b.element_size() for b in model.buffers())
        raise ValueError(f"unknown message {kind!r}")


    def _step_sampled(self, step, spec):
        """Run the step; the first rank of the ranks holding these rows (rank 0; under attention
        data parallelism, each group's first) samples where the logits are and sends back token ids
        (not [batch, vocab] logits); its peers keep the ids too (a broadcast): the next step, sent
        before the engine reads these, takes its pending inputs from them (overlapped scheduling)."""
        from engine.sampler import SamplerOutput
        sampling = self.executor.sampling
        logits = self.executor.execute(step)  # pending inputs filled from sampling.last
        self.comm.end_forward()
        if spec is None:
            return None
        out, failed = None, None
        if self.me.split_rank == 0:
            try:
                out = sampling.sample(logits, spec)
            except Exception as e:  # the other ranks wait in the broadcast: release them, then report
                failed = e
        if self.comm.split_size > 1:
            ids = out.token_ids if out is not None else torch.full((len(spec.params),), -1, dtype=torch.long,
                                                                    device=self.model.device)
            sampling.last = self.comm.broadcast_from_first(ids)
        if failed is not None:
            raise failed
        if out is None:
            return None
        return SamplerOutput(out.token_ids.cpu(), None if out.logprobs is None else out.logprobs.cpu(),
                             out.top_logprobs)


def _worker_main(spec: WorkerSpec, rank: int, conn) -> None:
    try:
        rt = RankRuntime(spec, rank)
        conn.send(("ready", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        kind, payload = conn.recv()
        try:
            reply = rt.handle(kind, payload)
            conn.send(("ok", reply))
            if kind == "stop":
                return
        except Exception:
            conn.send(("error", traceback.format_exc()))


def fit_kv(workers, config):
    """config with num_blocks measured on every rank (EngineConfig.kv_cache_fraction), the smallest;
    the ranks step the same measuring forward, so their collectives line up."""
    if config.kv_cache_fraction is None:
        return config
    from engine.kv_budget import fit
    return fit(config, workers.call("kv_blocks", config, timeout=WARMUP_TIMEOUT))


WARMUP_TIMEOUT = 1800.0  # seconds: compiling every kernel size class and capturing every graph, cold


class RankWorkers:
    """Starts `world` local rank processes (gloo on CPU) and talks to them."""

    def __init__(self, spec: WorkerSpec, timeout: float = 600.0, grace: float = FAILURE_GRACE_S):
        """timeout: per call; grace: how long the other ranks may take to answer once one failed
        (parallel.replies)."""
        from models.config import load_config
        from models.weights import resolve_layout as resolve_ckpt

        from .comm import free_port
        cfg = load_config(resolve_ckpt(spec.path)[0])
        self.config = cfg
        self.layout = resolve_layout(cfg, spec.tp, spec.ep, placement=spec.placement, attn_dp=spec.attn_dp)
        self.attn_dp = spec.attn_dp
        if not spec.init_method:
            spec.init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.timeout, self.grace = timeout, grace
        self.guard = BrokenGuard()
        self.conns, self.procs = [], []
        for r in range(len(self.layout)):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(spec, r, child), daemon=True)
            p.start()
            child.close()  # the child's end lives in the child only
            self.conns.append(parent)
            self.procs.append(p)
        try:
            self._gather("ready")
        except Exception:
            self._kill()
            raise

    def _wait(self, pending: list[int], seconds: float) -> list[tuple[int, bool, object]]:
        """The replies of the pending ranks that arrive within `seconds`; a rank whose process
        exited answers with that."""
        from multiprocessing.connection import wait
        watch = {self.conns[r]: r for r in pending} | {self.procs[r].sentinel: r for r in pending}
        out, seen = [], set()
        for ready in wait(list(watch), timeout=seconds):
            r = watch[ready]
            if r in seen:
                continue
            seen.add(r)
            c = self.conns[r]
            if c.poll():
                try:
                    kind, payload = c.recv()
                    out.append((r, kind != "error", payload))
                    continue
                except (EOFError, OSError):
                    pass
            self.procs[r].join(timeout=1)
            if not self.procs[r].is_alive():
                out.append((r, False, f"the rank process exited (code {self.procs[r].exitcode})"))
        return out

    def _gather(self, what: str, timeout: float | None = None) -> list:
        """Every rank's reply (parallel.replies.gather): all read before raising the first error,
        since a reply left unread would be taken as the answer to the next message."""
        return self.guard.gather(len(self.conns), self._wait, what, timeout or self.timeout, self.grace)

    def submit(self, kind: str, payload=None):
        """Send to every rank now; `collect` the replies later (ranks answer in the order sent)."""
        return self.submit_each(kind, [payload] * len(self.conns))

    def submit_each(self, kind: str, payloads: list):
        """Send each rank its own payload (payloads[rank])."""
        self.guard.check()
        for r, (c, p) in enumerate(zip(self.conns, payloads, strict=True)):
            try:
                c.send((kind, p))
            except OSError:  # the rank's process is gone: the ranks sent to already are out of step
                raise self.guard.fail(f"rank {r}'s process exited (code {self.procs[r].exitcode})") from None
        return kind

    def collect(self, ticket, timeout: float | None = None) -> list:
        return self._gather(ticket, timeout)

    def call(self, kind: str, payload=None, timeout: float | None = None) -> list:
        return self.collect(self.submit(kind, payload), timeout)

    def alive(self) -> bool:
        return self.guard.broken is None and all(p.is_alive() for p in self.procs)

    def logits(self, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full causal logits per sequence; under attention DP, sequences are dealt round-robin."""
        leads = group_leads(self.layout, self.attn_dp)
        dp = len(leads)
        groups = [[s for i, s in enumerate(seqs) if i % dp == g] for g in range(dp)]
        replies = self.call("logits", groups)
        out: list[torch.Tensor | None] = [None] * len(seqs)
        for g, lead in enumerate(leads):
            rows = replies[lead]
            start = 0
            for i in range(g, len(seqs), dp):
                out[i] = rows[start:start + len(seqs[i])]
                start += len(seqs[i])
        return out

    def shutdown(self):
        if self.guard.broken is None:
            try:
                self.call("stop", timeout=30)
            except Exception:
                pass
        self._kill()

    def _kill(self):
        for p in self.procs:  # a rank stuck in a collective never reads "stop"
            p.join(timeout=10 if self.guard.broken is None else 0)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


class _RankStep:
    """A step sent to the ranks whose reply has not been read: `synchronize()` reads it (and every
    step sent before it) into `output`."""

    def __init__(self, executor: "MultiProcessExecutor", ticket, merge=None):
        """merge: every rank's reply -> the step's output (default rank 0's)."""
        self.executor, self.ticket = executor, ticket
        self.merge = merge or (lambda replies: replies[0])
        self.done, self.output, self.error = False, None, None

    def synchronize(self) -> None:
        """Raises what the ranks raised for this step, even when another call read its reply first."""
        self.executor._drain(self)
        if self.error is not None:
            raise self.error


class MultiProcessExecutor:
    """The engine's executor over rank workers (RankWorkers, or Ray actors with the same `call`)."""

    def __init__(self, workers, cache_spec, sample_on_rank: bool = True, graph_buckets: tuple[int, ...] | None = None):
        """sample_on_rank=False brings the logits back and samples here (for measurements).
        graph_buckets: the ranks' decode graph buckets (engine.executor.graph_buckets; default all)."""
        from kernels.cuda_graphs import DEFAULT_BUCKETS
        self.workers = workers
        self.splitter, self.leads = None, group_leads(workers.layout, workers.attn_dp)
        if workers.attn_dp:  # each attention group runs its own sub-step; its first rank answers for it
            from engine.data_parallel import StepSplitter
            self.splitter = StepSplitter(len(self.leads), graph_buckets or DEFAULT_BUCKETS)
        self.config = workers.config
        self.sample_on_rank = sample_on_rank
        self.sampling = None
        self._sent: list[_RankStep] = []  # steps sent, replies not read, oldest first
        modes = workers.call("cache", (cache_spec, graph_buckets or DEFAULT_BUCKETS))
        if len(set(modes)) > 1:  # they would run different collectives in a decode step and hang
            raise WorkerError(f"the ranks disagree on running decode steps as CUDA graphs: {modes}")
        self.decode_mode = modes[0]

    @property
    def asynchronous(self) -> bool:
        """The ranks compute in their own processes: the engine may schedule the next step meanwhile."""
        return self.sample_on_rank

    def execute(self, step) -> torch.Tensor:
        self._drain()
        if step.fill is not None:  # sampled here (sample_on_rank=False): the ids to fill are here too
            if self.sampling is None or self.sampling.last is None:
                raise ValueError("a step with pending inputs needs the previous step sampled by this executor")
            from engine.executor import fill_pending
            step = fill_pending(step, self.sampling.last)
        if self.splitter is None:
            return self.workers.call("step", step)[0]
        from engine.data_parallel import merge_logits
        split = self.splitter.split(step, None)
        replies = self.workers.collect(self.workers.submit_each("step", self._per_rank(split.steps)))
        return merge_logits([replies[r] for r in self.leads], split.rows, split.num_rows)

    def _per_rank(self, per_group: list) -> list:
        return [per_group[r.dp_rank] for r in self.workers.layout]

    def execute_sampled(self, step, spec):
        """-> a _RankStep (sent, not waited for) whose `output` is rank 0's SamplerOutput once synchronized."""
        if self.sample_on_rank:
            if self.splitter is None:
                sent = _RankStep(self, self.workers.submit("step_sampled", (step, spec)))
            else:
                from engine.data_parallel import merge_samples
                split = self.splitter.split(step, spec)
                ticket = self.workers.submit_each("step_sampled", self._per_rank(list(zip(split.steps, split.specs))))
                sent = _RankStep(self, ticket, lambda replies: None if spec is None else merge_samples(
                    [replies[r] for r in self.leads], split.rows, split.num_rows))
            self._sent.append(sent)
            return sent
        from engine.sampler_state import SamplerState
        self.sampling = self.sampling or SamplerState()
        logits = self.execute(step)
        return self.sampling.sample(logits, spec) if spec is not None else None

    def _drain(self, upto: _RankStep | None = None) -> None:
        """Read replies in the order sent, through `upto` (default: all): the ranks answer one message
        at a time, so any other call must first take the replies of the steps before it."""
        while self._sent and (upto is None or not upto.done):
            sent = self._sent.pop(0)
            try:
                sent.output = sent.merge(self.workers.collect(sent.ticket))
            except Exception as e:  # kept for the engine, which fails the step when it reads it
                sent.error = e
            sent.done = True

    def warmup(self, max_tokens: int) -> dict:
        """Every rank compiles its kernels and captures its decode graphs (LocalExecutor.warmup), in
        step: the captures record each graph's collectives. Returns rank 0's report."""
        self._drain()
        return self.workers.call("warmup", max_tokens, timeout=WARMUP_TIMEOUT)[0]

    def expert_load(self) -> torch.Tensor:
        self._drain()
        return sum(self.workers.call("expert_load"))

    def comm_times(self) -> dict[int, list[float]]:
        """rank -> all-to-all seconds per step since the last call."""
        self._drain()
        return dict(enumerate(self.workers.call("comm_times")))

    def shutdown(self) -> None:
        try:
            self._drain()
        except Exception:  # a failed step is reported where it is read; shutting down goes on
            pass
        self.workers.shutdown()
