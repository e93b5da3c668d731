"""Batched token sampling: request parameters and logit processing (stop strings: engine.stop).

Logit processing order (each row of the batch, all in batched tensor ops):

    logit_bias -> repetition / frequency / presence penalties -> grammar mask
    -> [logprobs are taken here] -> temperature -> top_k -> top_p -> min_p -> sample

Bias and penalties come first so that they shape the distribution the grammar
mask and the truncation steps see (a +100 bias is a way to force a token, and
top_k must rank tokens *after* penalties). Logprobs are the log_softmax of the
logits after bias/penalties/mask but BEFORE temperature and truncation, so they
describe the (penalised, grammar-constrained) model rather than an artefact of
the truncation knobs, and stay finite for every allowed token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# Temperatures below this are treated as greedy: dividing logits by ~0 overflows
# to inf and softmax turns it into NaN (vLLM uses the same cut-off).
_GREEDY_EPS = 1e-5
_M64 = (1 << 64) - 1
MAX_LOGIT_BIAS = 1024

TokenId = Annotated[int, Field(ge=0)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
# int64, as OpenAI's; choice i of n samples from seed + i (make_generator wraps it to 64 bits)
Seed = Annotated[int, Field(ge=-2**63, le=2**63 - 1, description="a 64-bit signed integer, as OpenAI's")]


class SamplingParams(BaseModel):
    """Per-request sampling knobs (OpenAI / vLLM semantics)."""

    # extra="forbid" so a misspelled knob fails loudly instead of being ignored.
    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="-1 or 0 = disabled")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # Capped: each entry is host work in every step the request is in, which every request in the
    # batch waits for (200k entries cost ~60 ms a step).
    logit_bias: dict[TokenId, Bias] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS)
    seed: Seed | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] = Field(default_factory=list, max_length=4)
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    n: int = Field(1, ge=1, le=128)
    logprobs: bool = False
    # Declared after `logprobs` so its validator can see that field.
    top_logprobs: int = Field(0, ge=0, le=20)
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v):
        # OpenAI accepts `"stop": "x"` as shorthand for `["x"]`.
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, v: int, info: ValidationInfo) -> int:
        if v > 0 and not info.data.get("logprobs", False):
            raise ValueError("top_logprobs > 0 requires logprobs=true")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded row's RNG (engine.sampler_state makes one per draw, from the row's seed and output position)."""
    return torch.Generator(device=device).manual_seed(seed & _M64)  # torch takes [-2**63, 2**64)


IdSeq = Sequence[int] | torch.Tensor


@dataclass
class SamplingBatch:
    """One decode step's worth of sampling inputs; every list has one entry per row."""

    params: list[SamplingParams]
    # Token history for penalties; None = empty for every row. repetition_penalty
    # looks at prompt+output, frequency/presence at output only.
    prompt_ids: Sequence[IdSeq] | None = None
    output_ids: Sequence[IdSeq] | None = None
    # Must be non-None for rows whose params carry a seed (see make_generator).
    generators: Sequence[torch.Generator | None] | None = None
    allowed: torch.Tensor | None = None  # [B, V] bool grammar mask, True = allowed
    # [B] int64 Philox keys, on the logits' device: rows that only scale by temperature draw with the
    # fused kernel (kernels/sample.py) from these instead of their generators (SamplerState sets them
    # where the Triton kernels run)
    keys: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b = len(self.params)
        for name in ("prompt_ids", "output_ids", "generators"):
            v = getattr(self, name)
            if v is not None and len(v) != b:
                raise ValueError(f"SamplingBatch.{name} has {len(v)} rows, params has {b}")
        if self.generators is None:
            self.generators = [None] * b
        if self.keys is not None and len(self.keys) != b:
            raise ValueError(f"SamplingBatch.keys has {len(self.keys)} rows, params has {b}")
        if self.keys is None:  # with keys, the fused kernel's rows draw from them (checked where rows split)
            _check_generators(self.params, self.generators, range(b))


def _check_generators(params, gens, rows) -> None:
    for i, p, g in zip(rows, params, gens):
        if p.seed is not None and g is None and not p.greedy:
            raise ValueError(f"row {i} has seed={p.seed} but no generator; create one with make_generator")


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] long
    # [B] float, logprob of the chosen token; set for every row when any row asked.
    logprobs: torch.Tensor | None = None
    # One list per row, sorted by descending logprob; [] for rows that did not ask.
    top_logprobs: list[list[tuple[int, float]]] | None = None


def _flat_keys(ids: Sequence[IdSeq] | None, rows: list[int], vocab: int) -> torch.Tensor:
    """History of `rows` as keys row * V + token, i.e. indices into logits.view(-1); on the CPU
    (histories are host lists: built there, they cross to the logits' device once, sorted)."""
    if ids is None:
        return torch.empty(0, dtype=torch.long)
    seqs = [torch.as_tensor(ids[i], dtype=torch.long).reshape(-1).cpu() for i in rows]
    lens = torch.tensor([s.numel() for s in seqs])
    tok = torch.cat(seqs)
    row = torch.repeat_interleave(torch.tensor(rows), lens)
    ok = (tok >= 0) & (tok < vocab)  # ids outside the logits row cannot be penalised
    return row[ok] * vocab + tok[ok]


def to_device(dev: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    """A small host list on `dev`. On CUDA through pinned memory, asynchronously: a copy from pageable
    memory makes the host wait for the queued work, which overlapped scheduling must not."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t.to(dev)


def temperature_only(p: SamplingParams, vocab: int) -> bool:
    """A sampled row that no truncation touches: the fused kernel draws it in one pass."""
    return not (0 < p.top_k < vocab) and p.top_p >= 1.0 and p.min_p <= 0


def first_argmax(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """x [B, V] -> [B] index of the first maximum of each row, as torch.argmax.

    argmax / max(dim) over a 201k vocab are scalar loops on CPU; amax is vectorised and
    ~6x faster. So: the max of each `chunk`-wide slice (one amax pass), the first slice
    that holds the row's max, and argmax within that slice only. Rows with a NaN take
    torch's own argmax (amax and == cannot locate a NaN)."""
    B, V = x.shape
    if V <= chunk or x.device.type != "cpu":
        return x.argmax(-1)
    full = V // chunk * chunk
    per = x[:, :full].reshape(B, V // chunk, chunk).amax(-1)
    if full < V:
        per = torch.cat([per, x[:, full:].amax(-1, keepdim=True)], 1)
    best = per.amax(-1, keepdim=True)
    if bool(best.isnan().any()):
        return x.argmax(-1)
    first = (per == best).to(torch.uint8).argmax(-1)  # first slice holding the max
    # the slice's columns; the last slice may be short: clamping repeats column V-1 after itself
    cols = (first[:, None] * chunk + torch.arange(chunk, device=x.device)).clamp_(max=V - 1)
    return cols.gather(1, x.gather(1, cols).argmax(-1, keepdim=True)).squeeze(1)


class Sampler:
    """Stateless batched sampler. `generator` feeds the unseeded rows (one shared
    draw per step); None means torch's default generator."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        params = batch.params
        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(f"logits must be [B={len(params)}, V], got {tuple(logits.shape)}")
        if self._plain_greedy(batch):
            # Nothing modifies the logits, so argmax of the raw row is exact.
            return self._finish(logits, first_argmax(logits), params)
        x = self._process(logits, batch)
        token_ids = torch.empty(len(params), dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            gi = to_device(logits.device, greedy, torch.long)
            token_ids[gi] = first_argmax(x[gi])
        rest = [i for i, p in enumerate(params) if not p.greedy]
        if rest and batch.keys is not None:
            fused = [i for i in rest if temperature_only(params[i], x.shape[1])]
            if fused:
                from kernels import dispatch
                dev = logits.device
                inv_t = to_device(dev, [1.0 / params[i].temperature for i in fused], torch.float32)
                if len(fused) == len(params):  # the common batch: no gathers
                    token_ids = dispatch.sample(x, inv_t, batch.keys)
                else:
                    fi = to_device(dev, fused, torch.long)
                    token_ids[fi] = dispatch.sample(x[fi], inv_t, batch.keys[fi])
                done = set(fused)
                rest = [i for i in rest if i not in done]
        if rest:
            rp = [params[i] for i in rest]
            gens = [batch.generators[i] for i in rest]
            _check_generators(rp, gens, rest)
            if len(rest) < len(params):
                ri = to_device(logits.device, rest, torch.long)
                token_ids[ri] = self._race(self._truncate(x[ri], rp).softmax(-1), gens)
            else:  # _truncate works in place; x is still needed only for logprobs
                own = x.clone() if any(p.logprobs for p in params) else x
                token_ids = self._race(self._truncate(own, rp).softmax(-1), gens)
        return self._finish(x, token_ids, params)

    def probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """[B, V] distribution that `sample` draws from (one-hot for greedy rows).
        Consumes no randomness; meant for tests, debugging and speculative decoding."""
        x = self._process(logits, batch)
        out = torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
        rest = [i for i, p in enumerate(batch.params) if not p.greedy]
        if rest:
            ri = torch.tensor(rest, device=x.device)
            out[ri] = self._truncate(x[ri], [batch.params[i] for i in rest]).softmax(-1)
        return out

    @staticmethod
    def _plain_greedy(batch: SamplingBatch) -> bool:
        return batch.allowed is None and all(
            p.greedy and not p.has_penalties and not p.logit_bias for p in batch.params)

    def _process(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Bias, penalties and grammar mask; returns a fresh float32 tensor."""
        x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        _, vocab = x.shape
        dev = x.device
        params = batch.params

        rows, cols, vals = [], [], []
        for i, p in enumerate(params):
            for tok, bias in p.logit_bias.items():
                if tok < vocab:  # the engine refuses ids past the vocabulary; direct callers may pass them
                    rows.append(i); cols.append(tok); vals.append(bias)
        if rows:
            x.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                         torch.tensor(vals, dtype=torch.float32, device=dev), accumulate=True)

        pen = [i for i, p in enumerate(params) if p.has_penalties]
        if pen:
            # Penalties only touch tokens in the history, so work on the sparse
            # (row, token) -> count pairs from torch.unique instead of dense [B, V]
            # count tensors: O(history) rather than O(B * V) per step.
            # The keys are counted on the host, where the histories are; no device value is read back.
            flat = x.view(-1)
            okeys, ocnt = torch.unique(_flat_keys(batch.output_ids, pen, vocab), return_counts=True)
            if any(p.repetition_penalty != 1.0 for p in params):
                rep = torch.tensor([p.repetition_penalty for p in params], device=dev)
                seen = torch.unique(torch.cat([okeys, _flat_keys(batch.prompt_ids, pen, vocab)])).to(dev)
                v, r = flat[seen], rep[seen // vocab]
                # HF/vLLM: shrink positive logits, push negative ones further down.
                flat[seen] = torch.where(v > 0, v / r, v * r)
            if any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params):
                freq = torch.tensor([p.frequency_penalty for p in params], device=dev)
                pres = torch.tensor([p.presence_penalty for p in params], device=dev)
                okeys, ocnt = okeys.to(dev), ocnt.to(dev)
                r = okeys // vocab
                flat[okeys] = flat[okeys] - (freq[r] * ocnt + pres[r])

        if batch.allowed is not None:
            if batch.allowed.shape != x.shape:
                raise ValueError(f"allowed mask {tuple(batch.allowed.shape)} != logits {tuple(x.shape)}")
            # The grammar must allow at least one token per row (EOS at worst),
            # otherwise the row is all -inf and its distribution is undefined.
            x.masked_fill_(~batch.allowed.to(dev, torch.bool), float("-inf"))
        return x

    @staticmethod
    def _truncate(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, top_k, top_p, min_p on the non-greedy rows `x` [R, V], in
        place (callers pass a private copy: at 200k vocab every pass counts).
        Every row's arithmetic depends only on its own params (rows are grouped
        by top_k, and a knob that is off leaves the row bit-identical), which is
        what keeps a seeded row independent of the rest of the batch."""
        vocab, dev = x.shape[1], x.device
        if any(p.temperature != 1.0 for p in params):
            x.div_(torch.tensor([p.temperature for p in params], device=dev)[:, None])
        groups: dict[int, list[int]] = {}  # top_k (vocab = off) -> rows
        for j, p in enumerate(params):
            k = p.top_k if 0 < p.top_k < vocab else vocab
            if k < vocab or p.top_p < 1.0:
                groups.setdefault(k, []).append(j)
        for k, rows in groups.items():
            ri = torch.tensor(rows, device=dev)
            sub = x[ri]
            # topk(k) is far cheaper than sorting a 200k vocab; rows with only
            # top_p need the full stable sort (ties break to the lower id).
            if k < vocab:
                vals, idx = sub.topk(k, dim=-1)
            else:
                vals, idx = sub.sort(dim=-1, descending=True, stable=True)
            ps = [params[j].top_p for j in rows]
            if any(p < 1.0 for p in ps):
                # top_p=1 becomes inf so float rounding of the cumsum cannot cut the tail.
                p_t = torch.tensor([p if p < 1.0 else math.inf for p in ps], device=dev)[:, None]
                sp = vals.softmax(-1)  # over the top-k survivors: top_p sees the renormalised top-k
                # Smallest nucleus: keep a token while the mass ranked above it is < p.
                drop = (sp.cumsum(-1) - sp) >= p_t
                drop[:, 0] = False
                vals = vals.masked_fill(drop, float("-inf"))
            x[ri] = torch.full_like(sub, float("-inf")).scatter_(-1, idx, vals)
        mp = [j for j, p in enumerate(params) if p.min_p > 0]
        if mp:
            # p_i < min_p * p_max  <=>  logit_i - logit_max < log(min_p)
            ri = torch.tensor(mp, device=dev)
            sub = x[ri]
            log_min_p = torch.tensor([math.log(params[j].min_p) for j in mp], device=dev)[:, None]
            x[ri] = sub.masked_fill(sub < sub.max(dim=-1, keepdim=True).values + log_min_p, float("-inf"))
        return x

    def _race(self, probs: torch.Tensor, gens: Sequence[torch.Generator | None]) -> torch.Tensor:
        """Exponential race: argmax(p_i / E_i), E_i ~ Exp(1), is an exact draw from p.
        Each seeded row draws a full-vocab row of noise from its own generator, so
        its stream never depends on batch composition; unseeded rows share one draw."""
        # E = -log(U) is Exp(1); uniform_ + log_ is ~5x faster than exponential_ on CPU.
        q = torch.empty_like(probs)
        shared = [j for j, g in enumerate(gens) if g is None]
        if len(shared) == len(gens):
            q.uniform_(generator=self.generator)
        elif shared:
            q[torch.tensor(shared, device=q.device)] = torch.empty(
                len(shared), q.shape[1], device=q.device).uniform_(generator=self.generator)
        for j, g in enumerate(gens):
            if g is not None:
                q[j].uniform_(generator=g)
        q.log_().neg_()
        # U < 1 so E > 0, but guard anyway: 0/0 would be NaN, which argmax would pick.
        # With E >= tiny, masked tokens (p == 0) score 0 and can never win.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return (probs / q).argmax(-1)

    @staticmethod
    def _finish(x: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> SamplerOutput:
        if not any(p.logprobs for p in params):
            return SamplerOutput(token_ids=token_ids)
        lp = x.float().log_softmax(-1)  # float() copies only bf16 logits, and only when logprobs are asked
        chosen = lp.gather(-1, token_ids[:, None]).squeeze(-1)
        top: list[list[tuple[int, float]]] | None = None
        kmax = max(p.top_logprobs for p in params)
        if kmax > 0:
            vals, ids = (t.tolist() for t in lp.topk(kmax, dim=-1))  # sorted, descending
            # Masked tokens (-inf) are impossible choices and not JSON-encodable.
            top = [[(t, v) for t, v in zip(ids[i][:p.top_logprobs], vals[i][:p.top_logprobs])
                    if v != -math.inf] for i, p in enumerate(params)]
        return SamplerOutput(token_ids=token_ids, logprobs=chosen, top_logprobs=top)
