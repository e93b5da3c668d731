"""Constrained decoding driven by a random "model": whatever the logits, the grammar
alone must yield well-formed harmony, valid JSON and the tool calls the request allows.

Needs the o200k vocabulary (offline: TIKTOKEN_ENCODINGS_BASE=/path/to/shared/vocab).
"""
import json

import jsonschema
import pytest
import torch
from openai_harmony import Role

from engine.grammar import (
    CALL, CHANNEL, END, MESSAGE, MODEL_VOCAB_SIZE, RETURN, START, GrammarMatcher,
    GrammarSpec, build_grammar, fill_masks, get_harmony_encoding, get_lltokenizer,
    measure_mask_cost, random_tokens,
)

V = MODEL_VOCAB_SIZE

from tests.schemas import PERSON, WEATHER  # noqa: E402
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                   "b": {"type": "integer", "minimum": -99, "maximum": 99}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [{"name": "get_weather", "parameters": WEATHER}, {"name": "add", "parameters": ADD}]
TOOL_SCHEMAS = {"functions.get_weather": WEATHER, "functions.add": ADD}


@pytest.fixture(scope="module")
def enc():
    get_lltokenizer()  # built once per session (~2 s)
    return get_harmony_encoding()


def generate(spec, n, seed, max_steps=300):
    """Sample `n` completions at once, as a random-weight model would."""
    gen = torch.Generator().manual_seed(seed)
    matchers = [GrammarMatcher.from_spec(spec) for _ in range(n)]
    outs = [[] for _ in range(n)]
    live = list(range(n))
    for _ in range(max_steps):
        if not live:
            break
        tokens = random_tokens(fill_masks([matchers[i] for i in live], V), gen)
        for i, t in zip(live, tokens):
            assert matchers[i].accept(t), matchers[i].error
            outs[i].append(t)
        live = [i for i in live if not matchers[i].is_terminated]
    assert not live, "some runs did not terminate"
    return outs


def content_tokens(tokens, channel_text, enc):
    """Raw tokens of the first message on `channel_text`, between <|message|> and its end."""
    starts = [i for i, t in enumerate(tokens) if t == CHANNEL]
    for s in starts:
        m = tokens.index(MESSAGE, s)
        if enc.decode(tokens[s + 1:m]).startswith(channel_text):
            e = next(i for i in range(m + 1, len(tokens)) if tokens[i] in (END, RETURN, CALL))
            return tokens[m + 1:e]
    return None


def no_specials_in_content(tokens):
    inside = False
    for t in tokens:
        if t == MESSAGE:
            inside = True
        elif t in (END, RETURN, CALL):
            inside = False
        elif inside and t >= 199998:
            return False
    return True


def test_tokenizer_matches_harmony(enc):
    tok = get_lltokenizer()
    assert tok.vocab_size == V
    text = "<|start|>assistant<|channel|>final<|message|>Hi, it's 12345 o'clock!\n\n  ok<|return|>"
    assert tok.tokenize_str(text, parse_special=True) == enc.encode(text, allowed_special="all")
    assert tok.is_special_token(CALL) and not tok.is_special_token(1000)


def test_json_schema_with_reasoning_budget(enc):
    spec = GrammarSpec(response_format={"type": "json_schema", "schema": PERSON},
                       max_reasoning_tokens=16)
    runs = generate(spec, n=20, seed=0)
    saw_analysis = False
    for tokens in runs:
        assert len(tokens) <= 300 and tokens[-1] == RETURN
        msgs = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
        assert msgs[-1].channel == "final" and msgs[-1].recipient is None
        jsonschema.validate(json.loads(msgs[-1].content[0].text), PERSON)
        if len(msgs) == 2:
            saw_analysis = True
            assert msgs[0].channel == "analysis"
            assert len(content_tokens(tokens, "analysis", enc)) <= 16
        else:
            assert len(msgs) == 1
        assert no_specials_in_content(tokens)
    assert saw_analysis


def test_required_tool_call(enc):
    spec = GrammarSpec(tools=TOOLS, tool_choice="required", max_reasoning_tokens=8)
    seen = set()
    for tokens in generate(spec, n=12, seed=1):
        assert tokens[-1] == CALL
        msg = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)[-1]
        assert msg.channel == "commentary" and msg.recipient in TOOL_SCHEMAS
        jsonschema.validate(json.loads(msg.content[0].text), TOOL_SCHEMAS[msg.recipient])
        seen.add(msg.recipient)
    assert seen == set(TOOL_SCHEMAS)


def test_named_tool_choice(enc):
    # OpenAI's nested tool / tool_choice shapes are accepted as well.
    tools = [{"type": "function", "function": t} for t in TOOLS]
    spec = GrammarSpec(tools=tools, tool_choice={"type": "function", "function": {"name": "add"}},
                       max_reasoning_tokens=0)
    for tokens in generate(spec, n=8, seed=2):
        assert tokens[0] == CHANNEL and tokens[-1] == CALL
        msgs = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
        assert len(msgs) == 1 and msgs[0].recipient == "functions.add"
        jsonschema.validate(json.loads(msgs[0].content[0].text), ADD)


def test_tool_choice_none_never_calls(enc):
    spec = GrammarSpec(tools=TOOLS, tool_choice="none", max_reasoning_tokens=4,
                       max_content_tokens=8)
    assert "commentary" not in build_grammar(spec)
    for tokens in generate(spec, n=10, seed=3):
        assert tokens[-1] == RETURN and CALL not in tokens
        msgs = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
        assert all(m.recipient is None for m in msgs) and msgs[-1].channel == "final"


def test_auto_allows_answer_or_call(enc):
    tok = get_lltokenizer()
    m = GrammarMatcher.from_spec(GrammarSpec(tools=TOOLS, tool_choice="auto",
                                             max_reasoning_tokens=0))
    assert m.accept(CHANNEL)
    mask = fill_masks([m], V)[0]
    for word in ("final", "commentary"):
        assert mask[tok.tokenize_str(word)[0]], word
    assert not mask[tok.tokenize_str("analysis")[0]]  # budget 0: no analysis message


def test_harmony_only(enc):
    spec = GrammarSpec(max_reasoning_tokens=8, max_content_tokens=16)
    runs = generate(spec, n=16, seed=4)
    for tokens in runs:
        assert tokens[-1] == RETURN and no_specials_in_content(tokens)
        msgs = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
        assert [m.channel for m in msgs] in (["final"], ["analysis", "final"])
        assert len(content_tokens(tokens, "final", enc)) <= 16
        if len(msgs) == 2:
            assert len(content_tokens(tokens, "analysis", enc)) <= 8
    assert any(START in t for t in runs)


def test_budgets_are_exact(enc):
    # A "model" that never wants to stop: the budget alone must close each message.
    m = GrammarMatcher.from_spec(GrammarSpec(max_reasoning_tokens=16, max_content_tokens=5))
    the = enc.encode(" the")[0]

    def babble():
        n = 0
        while fill_masks([m], V)[0, the]:
            assert m.accept(the)
            n += 1
        return n, fill_masks([m], V)[0].nonzero().flatten().tolist()

    assert all(m.accept(t) for t in enc.encode("<|channel|>analysis<|message|>",
                                                allowed_special="all"))
    assert babble() == (16, [END])
    assert all(m.accept(t) for t in enc.encode(
        "<|end|><|start|>assistant<|channel|>final<|message|>", allowed_special="all"))
    assert babble() == (5, [RETURN])
    assert m.accept(RETURN) and m.is_terminated and not m.is_error


def test_no_constraints_means_no_grammar():
    assert build_grammar(GrammarSpec(harmony=False)) is None
    assert build_grammar(GrammarSpec(harmony=False, tools=TOOLS, tool_choice="none")) is None
    assert GrammarMatcher.from_spec(GrammarSpec(harmony=False)) is None


def test_json_without_harmony(enc):
    spec = GrammarSpec(harmony=False, response_format={"type": "json_schema", "schema": PERSON})
    for tokens in generate(spec, n=6, seed=5):
        jsonschema.validate(json.loads(enc.decode(tokens)), PERSON)


def test_bad_specs_raise():
    with pytest.raises(ValueError):
        build_grammar(GrammarSpec(tool_choice="required"))
    with pytest.raises(ValueError):
        build_grammar(GrammarSpec(tools=TOOLS, tool_choice={"name": "nope"}))
    with pytest.raises(ValueError):
        build_grammar(GrammarSpec(harmony=False, tools=TOOLS, tool_choice="required"))
    with pytest.raises(ValueError):
        build_grammar(GrammarSpec(response_format={"type": "yaml"}))
    with pytest.raises(ValueError):
        build_grammar(GrammarSpec(tools=[{"name": "two words", "parameters": ADD}]))
    # Schema errors surface when the grammar is compiled, as ValueError (-> HTTP 400).
    for schema in ({"$ref": "#/nope"}, {"type": "foo"}):
        spec = GrammarSpec(response_format={"type": "json_schema", "schema": schema})
        with pytest.raises(ValueError):
            GrammarMatcher.from_spec(spec)


def test_rejected_token_marks_error(enc):
    m = GrammarMatcher.from_spec(GrammarSpec())
    assert not m.is_terminated
    assert not m.accept(START)  # the completion must open with <|channel|>
    assert m.is_error and m.is_terminated and m.error
    assert not m.accept(CHANNEL)  # stays broken
    row = fill_masks([m], V)[0]
    assert row.nonzero().flatten().tolist() == [RETURN]  # the engine can still end it
    m2 = GrammarMatcher.from_spec(GrammarSpec())
    assert not m2.accept(10**9)  # out of vocabulary: no exception either
    assert m2.is_error


@pytest.mark.parametrize("budget", [8, None])
def test_rollback(enc, budget):
    # With a budget llguidance can't roll back natively; the matcher replays instead.
    m = GrammarMatcher.from_spec(GrammarSpec(max_reasoning_tokens=budget))
    prefix = enc.encode("<|channel|>analysis<|message|>Let me think", allowed_special="all")
    assert all(m.accept(t) for t in prefix[:3])
    before = fill_masks([m], V)
    assert all(m.accept(t) for t in prefix[3:])
    assert m.rollback(len(prefix) - 3) and m.num_tokens == 3 and not m.is_error
    assert torch.equal(fill_masks([m], V), before)
    assert all(m.accept(t) for t in prefix[3:])  # and it carries on from there
    assert not m.rollback(len(prefix) + 1) and not m.is_error


def test_batch_fill_matches_single(enc):
    gen = torch.Generator().manual_seed(6)
    specs = [GrammarSpec(response_format={"type": "json_schema", "schema": PERSON}),
             GrammarSpec(tools=TOOLS, tool_choice="required"),
             GrammarSpec(max_reasoning_tokens=4, max_content_tokens=4),
             GrammarSpec(response_format={"type": "json_object"}, max_reasoning_tokens=0)]
    matchers = [GrammarMatcher.from_spec(specs[i % len(specs)]) for i in range(8)]
    for i, m in enumerate(matchers):  # walk each to a different state
        for _ in range(3 * i):
            if m.is_terminated:
                break
            row = fill_masks([m], V)[0]
            allowed = row.nonzero().flatten()
            assert m.accept(int(allowed[torch.randint(len(allowed), (1,), generator=gen)]))
    batch = matchers[:4] + [None] + matchers[4:]
    masks = fill_masks(batch, V)
    single = torch.cat([fill_masks([m], V) for m in batch])
    assert masks.dtype == torch.bool and masks.shape == (9, V)
    assert torch.equal(masks, single)
    assert masks[4].all() and not masks[0].all()
    assert torch.equal(fill_masks(batch, V, device="cpu"), masks)
    # Padded model vocabularies: extra ids are never allowed under a grammar.
    wide = fill_masks(batch, V + 64)
    assert torch.equal(wide[:, :V], masks)
    assert wide[4, V:].all() and not wide[[0, 1, 2, 3, 5, 6, 7, 8], V:].any()


def test_mask_cost():
    ms = measure_mask_cost(batch_size=8, steps=40)
    print(f"\ngrammar mask cost: {ms:.3f} ms per token per sequence (batch 8)")
    assert 0 < ms < 50
