"""Constrained decoding through the whole engine, on the tiny random checkpoint (the
demo model): a model that knows nothing still returns schema-valid JSON, valid tool
calls and well-formed harmony, because the grammar masks every step.

Each scenario runs its requests concurrently in one engine, so the grammar masks
are computed for a batch of matchers in different states.

Needs the o200k vocabulary (offline: TIKTOKEN_ENCODINGS_BASE=/path/to/shared/vocab).
"""
import json
import time

import jsonschema
import pytest
import torch

from engine import harmony
from engine.core import EngineConfig, LLMEngine, output_tokens
from engine.grammar import CALL, END, MESSAGE, RETURN, GrammarSpec, get_lltokenizer
from engine.harmony import ContentDelta, Finished, ReasoningDelta, ToolCallDelta, ToolCallStart
from engine.request import GenerateRequest
from engine.sampler import SamplingParams
from models import load_model

N = 50
MAX_TOKENS = 200

from tests.schemas import PERSON, WEATHER  # noqa: E402
TOOLS = [
    {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER},
    # No parameters: an empty parameter list (harmony renders `() => any`), so only {} fits.
    {"name": "get_time", "description": "The current time"},
]
TOOL_SCHEMAS = {"get_weather": WEATHER, "get_time": {"type": "object", "maxProperties": 0}}

TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Torch's spinning OpenMP workers starve llguidance's mask threads on small hosts.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if TIMINGS:
        print("\nconstrained generation wall time: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    get_lltokenizer()  # built once (~2 s), outside the timings
    return load_model(tiny_ckpt)


class Result:
    """One choice's outputs, as a chat client would assemble them from the events."""

    def __init__(self, outs):
        self.tokens = output_tokens(outs)
        events = [e for o in outs for e in o.events]
        self.reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
        self.content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        starts = [e for e in events if isinstance(e, ToolCallStart)]
        self.calls = [(s.name, "".join(e.arguments for e in events
                                       if isinstance(e, ToolCallDelta) and e.index == s.index))
                      for s in starts]
        [self.finished] = [e for e in events if isinstance(e, Finished)]
        [last] = [o for o in outs if o.finished]
        self.finish_reason, self.error, self.usage = last.finish_reason, last.error, last.usage


def generate(model, prompt, spec, seeds, label):
    engine = LLMEngine(model, EngineConfig())
    reqs = [GenerateRequest(f"{label}-{s}", prompt, SamplingParams(temperature=1.0, seed=s, max_tokens=MAX_TOKENS),
                            harmony=True, grammar=spec) for s in seeds]
    t0 = time.perf_counter()
    for r in reqs:
        engine.add_request(r)
    outs = {r.request_id: [] for r in reqs}
    peak = 0
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
        peak = max(peak, engine.stats()["running"])
    TIMINGS[label] = time.perf_counter() - t0
    assert peak >= min(len(reqs), 32)  # they really ran as one batch
    assert not engine.seqs and engine.blocks.usage()["full_used"] == 0
    return [Result(outs[r.request_id]) for r in reqs]


def message_body(tokens, start):
    """Tokens of the message whose <|message|> is at or after `start`, up to its end token."""
    m = tokens.index(MESSAGE, start)
    e = next(i for i in range(m + 1, len(tokens)) if tokens[i] in (END, RETURN, CALL))
    return tokens[m + 1:e]


def test_json_schema_response_format(model):
    prompt = harmony.render_chat([{"role": "user", "content": "Give me a person as JSON"}], reasoning_effort="low")
    spec = GrammarSpec(response_format={"type": "json_schema", "schema": PERSON}, max_reasoning_tokens=16)
    results = generate(model, prompt, spec, range(N), "json_schema")
    people = set()
    for i, r in enumerate(results):
        assert r.finish_reason == "stop", (i, r.finish_reason, r.error)
        assert r.error is None and r.finished.error is None
        assert len(r.tokens) <= MAX_TOKENS and r.tokens[-1] == RETURN
        assert r.calls == []
        person = json.loads(r.content)
        jsonschema.validate(person, PERSON)
        people.add(json.dumps(person, sort_keys=True))
        if r.reasoning or r.usage.reasoning_tokens:
            # the analysis message (its text at most 16 tokens) came first
            assert len(message_body(r.tokens, 0)) <= 16
    assert len(people) > N // 2  # sampled, not one answer 50 times
    assert any(r.reasoning for r in results)  # the optional analysis branch was taken too


def test_required_tool_call(model):
    prompt = harmony.render_chat([{"role": "user", "content": "What's the weather in Paris?"}],
                                 tools=TOOLS, reasoning_effort="low")
    spec = GrammarSpec(tools=TOOLS, tool_choice="required", max_reasoning_tokens=16)
    results = generate(model, prompt, spec, range(N), "tool_required")
    names = set()
    for i, r in enumerate(results):
        assert r.finish_reason == "tool_calls", (i, r.finish_reason, r.error)
        assert r.error is None and r.content == ""
        assert len(r.tokens) <= MAX_TOKENS and r.tokens[-1] == CALL
        assert len(r.calls) == 1, r.calls
        name, args = r.calls[0]
        assert name in TOOL_SCHEMAS
        parsed = json.loads(args)
        assert isinstance(parsed, dict)
        jsonschema.validate(parsed, TOOL_SCHEMAS[name])
        if name == "get_time":
            assert args == "{}"
        names.add(name)
    assert names == set(TOOL_SCHEMAS)


def test_named_tool_choice(model):
    prompt = harmony.render_chat([{"role": "user", "content": "What's the weather?"}],
                                 tools=TOOLS, reasoning_effort="low")
    spec = GrammarSpec(tools=[{"type": "function", "function": t} for t in TOOLS],
                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                       max_reasoning_tokens=8)
    for i, r in enumerate(generate(model, prompt, spec, range(100, 110), "tool_named")):
        assert r.finish_reason == "tool_calls", (i, r.finish_reason, r.error)
        assert [n for n, _ in r.calls] == ["get_weather"]
        jsonschema.validate(json.loads(r.calls[0][1]), WEATHER)


def test_harmony_structure_only(model):
    prompt = harmony.render_chat([{"role": "user", "content": "Tell me something."}], reasoning_effort="low")
    spec = GrammarSpec(max_reasoning_tokens=8, max_content_tokens=32)
    results = generate(model, prompt, spec, range(200, 220), "harmony_only")
    for i, r in enumerate(results):
        assert r.error is None and r.finished.error is None, (i, r.error)
        assert r.finish_reason == "stop", (i, r.finish_reason)
        assert r.tokens[-1] == RETURN and r.calls == []
        assert r.content, i
        analysis = r.usage.reasoning_tokens > 0
        assert bool(r.reasoning) == analysis, i  # an analysis message carries text
        if analysis:
            assert len(message_body(r.tokens, 0)) <= 8
        final_start = max(j for j, t in enumerate(r.tokens) if t == MESSAGE)
        assert len(r.tokens) - final_start - 2 <= 32  # content tokens between <|message|> and <|return|>
    with_reasoning = sum(bool(r.reasoning) for r in results)
    print(f"\nharmony-only: {with_reasoning}/{len(results)} runs reasoned")
    assert with_reasoning > 0
