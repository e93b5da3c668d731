"""Types that cross the engine's boundaries: requests in, per-step outputs out,
the scheduler's decision, and the errors a request gets before any compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


from .grammar import GrammarMatcher, GrammarSpec
from .harmony import OutputParser
from .kv_cache import SeqBlocks
from .prediction import DraftProposer
from .sampler import SamplingParams
from .stop import StopChecker


class EngineError(Exception):
    """A request the engine refuses; `status`/`code` (and `param`, the request field at fault,
    when it is not the prompt) map onto an OpenAI error."""
    status = 400
    code = "invalid_value"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(EngineError):
    code = "context_length_exceeded"

    def __init__(self, message: str, limit: int | None = None):
        super().__init__(message)
        self.limit = limit  # the tokens a prompt and its completion may take together (max_model_len)


class EngineOverloadedError(EngineError):
    status = 503
    code = "engine_overloaded"


# the API's service_tier names for GenerateRequest.priority (lower first)
SERVICE_TIERS = {"priority": -1, "default": 0, "flex": 1}


def tier_name(priority: int) -> str:
    return next((k for k, v in SERVICE_TIERS.items() if v == priority), str(priority))


@dataclass
class GenerateRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    # chat requests parse their output as harmony; raw completions decode text
    harmony: bool = True
    grammar: GrammarSpec | None = None
    # the consumer needs no per-step stream (a non-streaming API call): after each choice's first
    # output (its time to first token) the rest arrives merged, as one finished output
    hold: bool = False
    # service tier: lower runs first, and may take a running lower tier's place (engine.scheduler)
    priority: int = 0
    # a predicted output, as tokens of the output it predicts (engine.prediction): drafts verified each step
    prediction: list[int] | None = None
    # the API's prompt_cache_key: the router keeps requests with the same key and prefix on one replica group
    # (deployments.router); requests with other keys route independently of them
    cache_key: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    accepted_prediction_tokens: int = 0  # draft tokens (engine.prediction) the output kept
    rejected_prediction_tokens: int = 0  # draft tokens computed and dropped


@dataclass
class RequestOutput:
    """What one step produced for one choice (index) of one request."""
    request_id: str
    index: int
    token_ids: list[int]
    events: list[Any] = field(default_factory=list)   # harmony events (engine.harmony)
    text: str = ""                                      # raw completions: decoded delta
    # {"token", "logprob", "top": [(id, lp)]}, and with harmony "answer": the token is answer text
    logprobs: list[dict] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage | None = None
    queue_time: float | None = None  # on the final output: arrival to first scheduled step, seconds


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one choice as one (what a consumer that fell behind gets)."""
    return RequestOutput(a.request_id, a.index, a.token_ids + b.token_ids, a.events + b.events, a.text + b.text,
                         a.logprobs + b.logprobs, b.finished, b.finish_reason, b.error, b.usage, b.queue_time)


@dataclass(eq=False)
class Sequence:
    """One choice of one request, as the scheduler and engine track it.

    Compared by identity: it is an entity, and the scheduler's membership tests
    (`seq in running`) must not compare every field of every sequence, every step."""
    req: GenerateRequest
    index: int
    tokens: list[int]
    prompt_len: int
    arrival: int
    num_computed: int = 0
    cached_tokens: int = 0      # prompt tokens served from the prefix cache at first admission
    admitted: bool = False
    blocks: SeqBlocks = field(default_factory=SeqBlocks)
    matcher: GrammarMatcher | None = None
    parser: OutputParser | None = None
    stop: StopChecker | None = None
    text_sent: int = 0          # raw mode: output tokens whose text was already emitted
    wait_for: "Sequence | None" = None  # n > 1: siblings wait for the first prefill, then share its blocks
    finished: bool = False
    finish_reason: str | None = None
    # Overlapped scheduling: tokens sampled by a step still on the device (at most one when the
    # scheduler runs), the row of that step's sampled ids holding the newest, and where the
    # sequence must stop (prompt + max_tokens, max_model_len), so that a step whose pending token
    # is known to end it is not scheduled.
    pending: int = 0
    pending_row: int = -1
    max_len: int | None = None
    t_arrival: float = 0.0          # time.monotonic() at add_request
    t_scheduled: float | None = None  # first admission into the running batch
    # Predicted outputs (engine.prediction): the tokens proposed to follow the last one, computed with it
    # in the next step and kept as far as sampling agrees; `verifying` of them are in the step in flight.
    proposer: DraftProposer | None = None
    draft: list[int] = field(default_factory=list)
    verifying: int = 0
    accepted_draft: int = 0
    rejected_draft: int = 0

    @property
    def priority(self) -> int:
        return self.req.priority

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def to_compute(self) -> int:
        return len(self.tokens) + self.pending - self.num_computed

    @property
    def ends_with_pending(self) -> bool:
        """The token on the device is this sequence's last (its length cap): no step needs scheduling."""
        return self.pending > 0 and self.max_len is not None and len(self.tokens) + self.pending >= self.max_len


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int
    draft: int = 0  # of num_tokens, the sequence's draft tokens (engine.prediction) after its own

    @property
    def samples(self) -> bool:
        return self.seq.num_computed + self.num_tokens - self.draft == len(self.seq.tokens) + self.seq.pending


@dataclass
class SchedulerOutput:
    items: list[ScheduledSeq]
    preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items)
