"""The engine: one step = schedule -> execute -> sample -> update."""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from models.attention import KV_CACHE_DTYPES, NULL_BLOCK

from . import harmony, kv_budget, prediction
from .data_parallel import DataParallelBlocks
from .executor import CacheSpec, LocalExecutor, StepInput, graph_buckets
from .grammar import GrammarMatcher, fill_draft_masks, fill_packed
from .kv_cache import BlockManager
from .request import (ContextLengthError, EngineError, GenerateRequest, RequestOutput, ScheduledSeq,
                      SchedulerOutput, Sequence, Usage, tier_name)
from .sampler import SamplerOutput
from .sampler_state import SampleSpec
from .stop import StopChecker
from .scheduler import Scheduler


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    block_size: int = Field(16, ge=1)
    num_blocks: int = Field(1024, ge=2, description="blocks in the full-attention pool")
    num_sliding_blocks: int | None = Field(None, ge=2, description="default: enough for max_num_seqs windows")
    max_num_seqs: int = Field(64, ge=1)
    max_tokens_per_step: int = Field(512, ge=1)
    max_model_len: int = Field(8192, ge=2)
    kv_cache_fraction: float | None = Field(
        None, gt=0, lt=1, description="on GPUs: size the full-attention KV pool to fill this fraction of each "
                                      "GPU's memory, after the weights, the sliding pool and the largest step's "
                                      "activations (num_blocks is then ignored; see engine/kv_budget.py)")
    kv_cache_dtype: Literal[KV_CACHE_DTYPES] = Field(
        "auto", description="what the KV cache stores: auto = the model's dtype; fp8 = float8 e4m3 (no scale), "
                            "half of bf16's bytes: twice the cached tokens a GPU holds and half a decode "
                            "step's cache reads, at e4m3's 2^-4 rounding of each cached value")
    enable_prefix_cache: bool = True
    max_draft_tokens: int = Field(
        8, ge=0, description="a request with a predicted output (chat `prediction`) verifies up to this many of "
                             "its tokens each step (engine.prediction); 0 ignores predictions")
    flex_promote_s: float = Field(
        60.0, ge=0, description="the floor under flex: a flex request that has waited this long since it arrived "
                                "is scheduled as default work (in arrival order among it, and default work no "
                                "longer takes its place), so sustained load cannot starve it; 0: never")
    overlap_scheduling: bool | None = Field(
        None, description="schedule step N+1 while step N runs on the device (None: on where the executor "
                          "runs asynchronously, i.e. on CUDA)")


class LLMEngine:
    """`model` runs in this process; `executor_factory(cache_spec)` runs it elsewhere (rank workers)."""

    def __init__(self, model=None, config: EngineConfig = EngineConfig(), executor_factory=None, model_config=None,
                 data_parallel: int = 1):
        """data_parallel: attention groups of the executor's ranks (engine.data_parallel), each with its
        own KV pools of config's sizes."""
        if model is not None and config.kv_cache_fraction is not None:  # rank workers: sized by the caller
            config = kv_budget.fit(config, [kv_budget.measure_kv_blocks(model, config)])
        self.config = config
        mc = model.config if model is not None else model_config
        bs = config.block_size
        # A sequence must fit the full pool on its own (block 0 is the null block), else one
        # without max_tokens would outgrow it, preempt itself and never run again.
        self.max_model_len = min(config.max_model_len, mc.max_position_embeddings, (config.num_blocks - 1) * bs)
        has_sliding = any(mc.window(i) for i in range(mc.num_hidden_layers))
        window = mc.sliding_window if has_sliding else None
        n_slide = kv_budget.sliding_blocks(config, mc)
        min_slide = -(-(mc.sliding_window + config.max_tokens_per_step) // bs) + 2  # one window + one chunk
        if has_sliding and n_slide < min_slide:
            raise ValueError(f"num_sliding_blocks={n_slide} cannot hold one sequence's window and step "
                             f"(needs >= {min_slide})")
        self.vocab_size = mc.vocab_size
        args = (config.num_blocks, n_slide, bs, window, config.enable_prefix_cache)
        self.data_parallel = data_parallel
        self.blocks = DataParallelBlocks(data_parallel, *args) if data_parallel > 1 else BlockManager(*args)
        groups = tuple("sliding" if mc.window(i) else "full" for i in range(mc.num_hidden_layers))
        spec = CacheSpec(bs, {"full": config.num_blocks, "sliding": n_slide}, groups, config.kv_cache_dtype)
        self.executor = executor_factory(spec) if executor_factory else LocalExecutor(
            model, spec, graph_buckets=graph_buckets(config.max_num_seqs))
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_tokens_per_step,
                                   config.flex_promote_s)
        self.seqs: dict[str, list[Sequence]] = {}
        self.overlap = (config.overlap_scheduling if config.overlap_scheduling is not None
                        else getattr(self.executor, "asynchronous", False))
        self._inflight: _Launched | None = None
        self._lockstep: set[Sequence] = set()  # live sequences that need each token before the next step
        self._arrival = itertools.count()
        self.generated_tokens = 0
        self.computed_tokens = 0
        self._t0 = time.time()

    # ---- requests -------------------------------------------------------------
    def validate(self, req: GenerateRequest) -> None:
        """Refuse what cannot run, before any compute."""
        n = len(req.prompt_ids)
        if n == 0:
            raise EngineError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in req.prompt_ids):
            raise EngineError("the prompt holds token ids outside the vocabulary")
        bad = [t for t in req.params.logit_bias if t >= self.vocab_size]
        if bad:
            raise EngineError(f"logit_bias: token id {bad[0]} is outside the vocabulary (0 to {self.vocab_size - 1})",
                              param="logit_bias")
        if n >= self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {n} tokens.",
                self.max_model_len)
        mt = req.params.max_tokens
        if mt is not None and n + mt > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + mt} tokens ({n} in the prompt, {mt} for the completion).", self.max_model_len)
        need = -(-(n + (mt or 1)) // self.config.block_size)
        if need > self.config.num_blocks - 1:
            raise ContextLengthError(f"the request needs {need} KV blocks; the pool has {self.config.num_blocks - 1}")
        if req.prediction and len(req.prediction) > self.max_model_len:  # it indexes every n-gram it holds
            raise EngineError(f"the prediction has {len(req.prediction)} tokens; this model's context holds "
                              f"{self.max_model_len}", param="prediction")
        if req.request_id in self.seqs:
            raise EngineError(f"duplicate request id '{req.request_id}'")

    def add_request(self, req: GenerateRequest) -> None:
        self.validate(req)
        seqs, first, now, n = [], None, time.monotonic(), len(req.prompt_ids)
        for i in range(req.params.n):
            p = req.params
            s = Sequence(req, i, list(req.prompt_ids), len(req.prompt_ids), next(self._arrival),
                         matcher=GrammarMatcher.from_spec(req.grammar) if req.grammar else None,
                         parser=harmony.OutputParser() if req.harmony else None,
                         stop=StopChecker(p.stop) if p.stop else None, wait_for=first, t_arrival=now,
                         max_len=min(self.max_model_len, n + p.max_tokens) if p.max_tokens is not None
                         else self.max_model_len,
                         proposer=prediction.DraftProposer(req.prediction, self.config.max_draft_tokens)
                         if req.prediction and self.config.max_draft_tokens else None)
            if s.matcher is not None or p.has_penalties or s.proposer is not None:
                self._lockstep.add(s)
            first = first or s
            seqs.append(s)
            self.scheduler.add(s)
        self.seqs[req.request_id] = seqs

    def abort(self, request_id: str) -> bool:
        seqs = self.seqs.pop(request_id, None)
        for s in seqs or []:
            if not s.finished:
                s.finished, s.finish_reason = True, "abort"  # a step in flight must drop its token
            self._lockstep.discard(s)
            self.scheduler.remove(s)
        return seqs is not None

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # ---- the step -------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step: schedule -> execute -> sample -> update. With overlap on, the update is the
        previous step's: this step is enqueued behind it before its tokens are read, so the device
        never waits on the host between steps (see _overlapping)."""
        try:
            if self._overlapping():
                launched = self._launch(self.scheduler.schedule())
                outs = self._complete(self._inflight)
                self._inflight = launched
                return outs
            outs = self._complete(self._inflight)
            self._inflight = None
            return outs + self._complete(self._launch(self.scheduler.schedule()))
        except BaseException:
            self._inflight = None
            raise

    def _overlapping(self) -> bool:
        """Overlap needs no token before the next step: a grammar mask must see the token first,
        and penalties count it, so while such a sequence lives the engine runs in lockstep."""
        return self.overlap and not self._lockstep

    def _launch(self, sched: SchedulerOutput) -> _Launched | None:
        if not sched.items:
            return None
        step, sample_seqs = self._build_step(sched)
        # sampled where the logits are (this process or rank 0): only token ids come back
        sampled = self.executor.execute_sampled(step, self._sample_spec(sample_seqs) if sample_seqs else None)
        for it in sched.items:
            it.seq.num_computed += it.num_tokens
            it.seq.verifying = len(it.seq.draft)
        for row, s in enumerate(sample_seqs):
            s.pending += 1
            s.pending_row = row
        for it in sched.items:
            self.scheduler.after_step(it.seq)
        self.computed_tokens += sched.num_tokens
        return _Launched(sched, sample_seqs, sampled, *_to_host(sampled))

    def _complete(self, launched: _Launched | None) -> list[RequestOutput]:
        if launched is None:
            return []
        if launched.ready is not None:
            launched.ready.synchronize()
            if launched.tokens is None and hasattr(launched.ready, "output"):  # a rank step's reply
                launched.sampled = out = launched.ready.output
                launched.tokens, launched.logprobs = (out.token_ids, out.logprobs) if out is not None else (None, None)
        return self._update(launched)

    def _build_step(self, sched: SchedulerOutput) -> tuple[StepInput, list[Sequence]]:
        bs = self.config.block_size
        ids, pos, qs, ctx, rows, sample_seqs, fill = [], [], [0], [], [], [], []
        slots = {g: [] for g in self.blocks.pool_names}
        for it in sched.items:
            s, a = it.seq, it.seq.num_computed
            b = a + it.num_tokens
            s.draft = s.draft[:it.draft]  # what the scheduler had room for; it comes after the known tokens
            known = s.tokens[a:b - it.draft] + s.draft if it.draft else s.tokens[a:b]
            ids.extend(known)
            if len(known) < b - a:  # its input is the token the step in flight samples
                fill.append((len(ids), s.pending_row))
                ids.append(0)
            pos.extend(range(a, b))
            for g in slots:
                t = s.blocks.tables[g]
                slots[g].extend(t[p // bs] * bs + p % bs for p in range(a, b))
            qs.append(qs[-1] + it.num_tokens)
            ctx.append(b)
            if it.samples:  # the last position, and each draft token's (engine.prediction)
                rows.extend(range(qs[-1] - 1 - len(s.draft), qs[-1]))
                sample_seqs.extend([s] * (len(s.draft) + 1))
        tables = {}
        for g in slots:
            width = max(len(it.seq.blocks.tables[g]) for it in sched.items)
            # row by row into numpy: ~7x faster than torch.tensor on nested lists at batch 256
            t = np.full((len(sched.items), width), NULL_BLOCK, dtype=np.int64)
            for i, it in enumerate(sched.items):
                row = it.seq.blocks.tables[g]
                t[i, :len(row)] = row
            tables[g] = torch.from_numpy(t)
        # pending inputs are filled by the executor, where the step in flight samples them (fill_pending)
        step = StepInput(torch.tensor(ids), torch.tensor(pos), torch.tensor(qs), torch.tensor(ctx), tables,
                         {g: torch.tensor(v, dtype=torch.long) for g, v in slots.items()},
                         torch.tensor(rows, dtype=torch.long), torch.tensor(fill) if fill else None,
                         torch.tensor([it.seq.blocks.group for it in sched.items]) if self.data_parallel > 1 else None)
        return step, sample_seqs

    def _sample_spec(self, seqs: list[Sequence]) -> SampleSpec:
        params = [s.req.params for s in seqs]
        # a sequence verifying a draft has a row per draft token after its first: the k-th samples after draft[:k]
        offsets = _draft_offsets(seqs)
        bitmask = free = None
        if any(s.matcher for s in seqs):
            # packed: 1/8 of a [batch, vocab] bool mask crosses to the sampler, which unpacks it there
            bitmask, free = fill_packed([s.matcher if k == 0 else None for s, k in zip(seqs, offsets)])
            for row, (s, k) in enumerate(zip(seqs, offsets)):
                if k == 0 and s.draft and s.matcher is not None:
                    fill_draft_masks(s.matcher, s.draft, bitmask, row)
                    free[row:row + len(s.draft) + 1] = False
        history = {}
        if any(p.has_penalties for p in params):  # copying every history each step costs O(batch x length)
            history = dict(prompt_ids=[s.tokens[:s.prompt_len] for s in seqs],
                           output_ids=[s.output_ids + s.draft[:k] for s, k in zip(seqs, offsets)])
        return SampleSpec(params,
                          [p.seed + s.index if p.seed is not None else None for s, p in zip(seqs, params)],
                          bitmask, free,
                          # the output position each row samples: tokens known, the one in flight, its draft row
                          positions=[len(s.tokens) - s.prompt_len + s.pending + k for s, k in zip(seqs, offsets)],
                          **history)

    def _update(self, done: _Launched) -> list[RequestOutput]:
        outs, ended = [], []
        tokens = done.tokens.tolist() if done.seqs else []  # one transfer, not one per row
        logprobs = done.logprobs.tolist() if done.logprobs is not None else None
        row = 0
        while row < len(done.seqs):
            s = done.seqs[row]
            first, n, draft = row, s.verifying + 1, s.draft  # a sequence verifying a draft has a row per token
            row += n
            s.pending -= n
            s.verifying, s.draft = 0, []
            if s.finished:  # ended (or aborted) while this step was in flight: its tokens are moot
                continue
            out = RequestOutput(s.req.request_id, s.index, [])
            kept = 0  # draft tokens sampling agreed with; the token after them is the last kept
            for k in range(first, first + n):
                tok = tokens[k]
                s.tokens.append(tok)
                out.token_ids.append(tok)
                if logprobs is not None and s.req.params.logprobs:
                    top = done.sampled.top_logprobs[k] if done.sampled.top_logprobs else []
                    out.logprobs.append({"token": tok, "logprob": logprobs[k], "top": top})
                self._check_finish(s, tok, out)
                if s.finished or k == first + n - 1 or tok != draft[k - first]:
                    break
                kept += 1
            self.generated_tokens += len(out.token_ids)
            if s.proposer is not None:
                prediction.settle(s, out, kept, len(draft), self.max_model_len)
            if s.finished:
                ended.append(s)
            outs.append(out)
        for s in ended:
            self._retire(s)
        for it in done.sched.items:
            if not it.seq.finished:
                self.scheduler.after_step(it.seq)
        return outs

    def _check_finish(self, s: Sequence, tok: int, out: RequestOutput) -> None:
        p = s.req.params
        reason = None
        if s.matcher is not None and not s.matcher.accept(tok):
            reason = "stop"  # cannot happen under the mask; end cleanly if it does
        if s.parser is not None:
            out.events.extend(s.parser.feed([tok]))
            if out.logprobs:
                out.logprobs[-1]["answer"] = s.parser.last_in_answer
            if s.parser.is_done:
                reason = "stop"
        else:
            # decode only the tokens not yet emitted; hold them back while they end mid-character
            # (an output may bring several tokens, a verified draft's: each adds its text in turn)
            text = harmony.decode(s.tokens[s.prompt_len + s.text_sent:])
            if text.endswith("\ufffd"):
                text = ""
            else:
                s.text_sent = len(s.tokens) - s.prompt_len
            if s.stop is not None:
                text, hit = s.stop.feed(text)
                reason = "stop" if hit else reason
            out.text += text
            if not p.ignore_eos and tok in _raw_eos():
                reason = "stop"
        if tok in p.stop_token_ids:
            reason = "stop"
        n_out = len(s.tokens) - s.prompt_len  # not s.output_ids: that copies the output every token
        if reason is None and ((p.max_tokens is not None and n_out >= p.max_tokens)
                               or len(s.tokens) >= self.max_model_len):
            reason = "length"
        if reason is None:
            return
        s.finished = True
        if s.parser is not None:
            out.events.extend(s.parser.finish("length" if reason == "length" else "stop"))
            fin = out.events[-1] if out.events else None
            reason = getattr(fin, "finish_reason", reason)
            out.error = getattr(fin, "error", None)
        elif s.stop is not None and reason == "length":
            out.text += s.stop.flush()
        s.finish_reason = out.finish_reason = reason
        out.finished = True
        # (a predicted sequence's prediction counts go in once its step is settled: prediction.settle)
        out.usage = Usage(s.prompt_len, n_out, s.parser.reasoning_tokens if s.parser else 0, s.cached_tokens)
        out.queue_time = (s.t_scheduled or s.t_arrival) - s.t_arrival

    def _retire(self, s: Sequence) -> None:
        self._lockstep.discard(s)
        self.scheduler.remove(s)
        group = self.seqs.get(s.req.request_id, [])
        if group and all(x.finished for x in group):
            del self.seqs[s.req.request_id]

    # ---- sync convenience and stats ---------------------------------------------
    def generate(self, requests: list[GenerateRequest]) -> dict[str, list[RequestOutput]]:
        """Run requests to completion; returns every step output per request id."""
        results: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        for r in requests:
            self.add_request(r)
        while self.has_work():
            for o in self.step():
                results[o.request_id].append(o)
        return results

    def warmup(self) -> dict:
        """Compile the kernels and capture the decode graphs now (executor.warmup); {} where the
        executor has nothing to warm."""
        fn = getattr(self.executor, "warmup", None)
        return fn(self.config.max_tokens_per_step) if fn is not None else {}

    def shutdown(self) -> None:
        self.executor.shutdown()

    def expert_load(self) -> torch.Tensor:
        """[layers, experts] tokens routed to each expert since start."""
        return self.executor.expert_load()

    def stats(self) -> dict:
        el = max(time.time() - self._t0, 1e-9)
        waiting = self.scheduler.waiting.by_tier()
        return {"waiting": sum(waiting.values()), "running": len(self.scheduler.running),
                "waiting_by_tier": {tier_name(p): n for p, n in waiting.items()},
                **{f"kv_{k}": v for k, v in self.blocks.usage().items()},
                "prefix_hit_rate": self.blocks.hit_rate(), "preemptions": self.scheduler.num_preemptions,
                "generated_tokens": self.generated_tokens, "tokens_per_s": self.generated_tokens / el}


@dataclass
class _Launched:
    """A step on the device whose sampled tokens the host has not read yet."""
    sched: SchedulerOutput
    seqs: list[Sequence]            # the sequences of the sampled rows, in row order
    sampled: SamplerOutput | None   # on the device (rank workers: set from the reply when read)
    tokens: torch.Tensor | None     # host copies, complete once `ready` is
    logprobs: torch.Tensor | None
    ready: object | None            # a CUDA event, or the rank step (parallel.worker._RankStep)


def _draft_offsets(seqs: list[Sequence]) -> list[int]:
    """Per sampled row: 0 for a sequence's first row, k for the k-th after it (its draft's positions)."""
    out: list[int] = []
    for i, s in enumerate(seqs):
        out.append(out[-1] + 1 if i and seqs[i - 1] is s else 0)
    return out


def _to_host(sampled) -> tuple:
    """Start the copies of the sampled ids (and logprobs) to the host without waiting for them. A step
    sent to rank workers (no SamplerOutput yet) is its own `ready`: its reply carries host tensors."""
    if sampled is None:
        return None, None, None
    if not isinstance(sampled, SamplerOutput):
        return None, None, sampled
    tok, lp = sampled.token_ids, sampled.logprobs
    if tok.device.type != "cuda":
        return tok, lp, None

    def copy(t):
        return None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
    tok, lp = copy(tok), copy(lp)
    ready = torch.cuda.Event()
    ready.record()
    return tok, lp, ready


@functools.lru_cache(maxsize=1)
def _raw_eos() -> frozenset[int]:
    """Tokens that end a raw completion: the assistant's stop tokens and <|endoftext|>."""
    return frozenset(harmony.assistant_stop_tokens() + [199999])


def build_engine(path, config: EngineConfig = EngineConfig(), tp: int = 1, ep: int = 1,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", keep_mxfp4: bool | None = None,
                 attn_dp: bool = False) -> LLMEngine:
    """An engine over one process (tp = ep = 1) or over tp x ep local rank workers."""
    if tp == 1 and ep == 1:
        from models import load_model
        return LLMEngine(load_model(path, dtype, device, keep_mxfp4=keep_mxfp4), config)
    from parallel.worker import RankWorkers, WorkerSpec
    return engine_over_workers(RankWorkers(WorkerSpec(str(path), tp, ep, dtype, device, keep_mxfp4=keep_mxfp4,
                                                      attn_dp=attn_dp)), config)


def engine_over_workers(workers, config: EngineConfig) -> LLMEngine:
    """An engine driving started rank workers (RankWorkers or Ray actors), its KV sized on the ranks
    (kv_cache_fraction) and, under attention data parallelism, one set of pools per attention group."""
    from parallel.worker import MultiProcessExecutor, fit_kv
    config = fit_kv(workers, config)
    buckets = graph_buckets(config.max_num_seqs)
    dp = workers.layout[0].dp if workers.attn_dp else 1
    return LLMEngine(None, config, model_config=workers.config, data_parallel=dp,
                     executor_factory=lambda spec: MultiProcessExecutor(workers, spec, graph_buckets=buckets))


def output_tokens(outs: list[RequestOutput], index: int = 0) -> list[int]:
    return [t for o in outs if o.index == index for t in o.token_ids]


__all__ = ["EngineConfig", "LLMEngine", "ScheduledSeq", "build_engine", "engine_over_workers", "output_tokens"]
