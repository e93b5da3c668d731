"""engine.harmony: rendering must match openai_harmony's own rendering of the
equivalent conversation; parsing must be split-invariant and never raise."""

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(Path(__file__).resolve().parents[3] / "shared" / "vocab"))

from openai_harmony import (  # noqa: E402
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)

from engine.harmony import (  # noqa: E402
    ChatMessage,
    ContentDelta,
    Finished,
    FunctionTool,
    HarmonyInputError,
    OutputParser,
    ReasoningDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    assistant_stop_tokens,
    decode,
    get_encoding,
    render_chat,
    render_raw,
)

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"location": {"type": "string", "description": "City"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["location"],
}
TOOLS = [
    FunctionTool(name="get_weather", description="Get the weather", parameters=WEATHER_SCHEMA),
    FunctionTool(name="now"),
]


@pytest.fixture(scope="module")
def enc():
    return get_encoding()


def _sys(effort=ReasoningEffort.MEDIUM):
    return Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(effort))


def _asst(text, channel):
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def _user(text):
    return Message.from_role_and_content(Role.USER, text)


def _lib(enc, msgs):
    return enc.render_conversation_for_completion(Conversation.from_messages(msgs), Role.ASSISTANT)


def _call(args, name="get_weather"):
    return (
        _asst(args, "commentary").with_recipient(f"functions.{name}").with_content_type("<|constrain|>json")
    )


def _result(text, name="get_weather"):
    return (
        Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
        .with_channel("commentary")
        .with_recipient("assistant")
    )


def _lib_tools():
    return DeveloperContent.new().with_function_tools(
        [ToolDescription.new("get_weather", "Get the weather", WEATHER_SCHEMA), ToolDescription.new("now", "")]
    )


# ---------------------------------------------------------------- rendering


def test_plain_user_turn(enc):
    got = render_chat([ChatMessage(role="user", content="Hello!")])
    assert got == _lib(enc, [_sys(), _user("Hello!")])
    text = decode(got)
    assert text.endswith("<|start|>user<|message|>Hello!<|end|><|start|>assistant")
    assert "Reasoning: medium" in text and "Current date" not in text
    assert got == render_chat([{"role": "user", "content": "Hello!"}])  # dicts accepted, deterministic


def test_system_and_developer_become_developer_instructions(enc):
    got = render_chat([
        ChatMessage(role="system", content="Be terse."),
        ChatMessage(role="developer", content="Answer in French."),
        ChatMessage(role="user", content="Hi"),
    ])
    dev = DeveloperContent.new().with_instructions("Be terse.\n\nAnswer in French.")
    assert got == _lib(enc, [_sys(), Message.from_role_and_content(Role.DEVELOPER, dev), _user("Hi")])
    text = decode(got)
    assert "<|start|>developer<|message|># Instructions\n\nBe terse.\n\nAnswer in French." in text
    assert text.count("<|start|>system") == 1


def test_tools_in_developer_message(enc):
    got = render_chat(
        [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"}],
        tools=[t.model_dump() for t in TOOLS],
    )
    dev = _lib_tools().with_instructions("Use tools.")
    assert got == _lib(enc, [_sys(), Message.from_role_and_content(Role.DEVELOPER, dev), _user("Weather in Paris?")])
    text = decode(got)
    assert "namespace functions {" in text and "type get_weather = (_: {" in text and "type now = () => any;" in text
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text


def test_earlier_turn_analysis_dropped_by_library(enc):
    msgs = [
        ChatMessage(role="user", content="2+2?"),
        ChatMessage(role="assistant", reasoning_content="Simple sum.", content="4"),
        ChatMessage(role="user", content="3+3?"),
    ]
    got = render_chat(msgs)
    # The library itself drops the analysis here: same tokens with it included.
    full = [_sys(), _user("2+2?"), _asst("Simple sum.", "analysis"), _asst("4", "final"), _user("3+3?")]
    assert got == _lib(enc, full)
    assert "Simple sum." not in decode(got)
    assert "<|channel|>final<|message|>4<|end|>" in decode(got)


def test_multi_turn_with_tool_round_trip(enc):
    msgs = [
        ChatMessage(role="user", content="2+2?"),
        ChatMessage(role="assistant", reasoning_content="Old thought.", content="4"),
        ChatMessage(role="user", content="3+3?"),
        ChatMessage(role="assistant", reasoning_content="Older thought two.", content="6"),
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(
            role="assistant",
            reasoning_content="Need the weather tool.",
            tool_calls=[ToolCall(id="call_a", name="get_weather", arguments='{"location": "Paris"}')],
        ),
        ChatMessage(role="tool", tool_call_id="call_a", content='{"temp": 21}'),
    ]
    got = render_chat(msgs, tools=TOOLS)
    expected = [
        _sys(), Message.from_role_and_content(Role.DEVELOPER, _lib_tools()),
        _user("2+2?"), _asst("4", "final"), _user("3+3?"), _asst("6", "final"),
        _user("Weather in Paris?"), _asst("Need the weather tool.", "analysis"),
        _call('{"location": "Paris"}'), _result('{"temp": 21}'),
    ]
    assert got == _lib(enc, expected)
    text = decode(got)
    # Finished turns lose their reasoning, the pending tool turn keeps it.
    assert "Old thought." not in text and "Older thought two." not in text
    assert "<|channel|>analysis<|message|>Need the weather tool.<|end|>" in text
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json'
            '<|message|>{"location": "Paris"}<|call|>') in text
    assert text.endswith(
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 21}<|end|><|start|>assistant'
    )


def test_tool_turn_then_final_then_new_question(enc):
    msgs = [
        ChatMessage(role="user", content="Time?"),
        ChatMessage(role="assistant", reasoning_content="Call now.", content="Checking.",
                    tool_calls=[ToolCall(id="c1", name="now", arguments="")]),
        ChatMessage(role="tool", name="now", content="12:00"),
        ChatMessage(role="assistant", reasoning_content="Got it.", content="It is noon."),
        ChatMessage(role="user", content="Thanks"),
    ]
    got = render_chat(msgs, tools=TOOLS)
    expected = [
        _sys(), Message.from_role_and_content(Role.DEVELOPER, _lib_tools()), _user("Time?"),
        _asst("Checking.", "commentary"), _call("{}", "now"), _result("12:00", "now"),
        _asst("It is noon.", "final"), _user("Thanks"),
    ]
    assert got == _lib(enc, expected)


@pytest.mark.parametrize("effort", ["low", "high"])
def test_reasoning_effort_and_date(enc, effort):
    got = render_chat([ChatMessage(role="user", content="x")], reasoning_effort=effort,
                      conversation_start_date="2025-08-01", knowledge_cutoff="2024-06")
    lib_effort = {"low": ReasoningEffort.LOW, "high": ReasoningEffort.HIGH}[effort]
    sysc = SystemContent.new().with_reasoning_effort(lib_effort).with_conversation_start_date("2025-08-01")
    assert got == _lib(enc, [Message.from_role_and_content(Role.SYSTEM, sysc), _user("x")])
    system = decode(got).split("<|end|>")[0]
    assert f"Reasoning: {effort}" in system and "Current date: 2025-08-01" in system


@pytest.mark.parametrize(
    "msgs, match",
    [
        ([{"role": "robot", "content": "x"}], "role"),
        ([ChatMessage.model_construct(role="robot", content="x")], "unknown role"),
        ([{"role": "user", "content": "x", "reasoning_content": "y"}], "reasoning_content"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "r"}], "nope"),
        ([{"role": "user", "content": "x"},
          {"role": "assistant", "tool_calls": [{"id": "c", "name": "f", "arguments": "{bad"}]}], "not valid JSON"),
        # only an assistant turn may go without text, and then it says something else
        ([{"role": "user"}], r"^messages\[0\]: a user message needs content$"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c"}], "a tool message needs content"),
        ([{"role": "user", "content": "x"}, {"role": "assistant"}],
         "an assistant message needs content, tool_calls or reasoning_content"),
    ],
)
def test_invalid_input(msgs, match):
    with pytest.raises(HarmonyInputError, match=match):
        render_chat(msgs)
    assert issubclass(HarmonyInputError, ValueError)


def test_invalid_effort():
    with pytest.raises(HarmonyInputError):
        render_chat([{"role": "user", "content": "x"}], reasoning_effort="max")


def test_raw_and_decode(enc):
    text = "<|start|>user<|message|>hi<|end|><|start|>assistant"
    toks = render_raw(text)
    assert toks[0] == enc.encode("<|start|>", allowed_special="all")[0]
    assert decode(toks) == text
    assert set(assistant_stop_tokens()) == {200002, 200012}


# ------------------------------------------------------------------ parsing

TOOL_STREAM = ('<|channel|>analysis<|message|>User wants Paris weather; call the tool. 日本 🦜<|end|>'
               '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json'
               '<|message|>{"location": "Paris", "unit": "c"}<|call|>')
FINAL_STREAM = ('<|channel|>analysis<|message|>Two plus two is four.<|end|>'
                '<|start|>assistant<|channel|>final<|message|>The answer is **4** — é.<|return|>')


def _ids(i):
    return f"call_{i}"


def _run(tokens, split, reason="stop"):
    p = OutputParser(id_factory=_ids)
    events = []
    i = 0
    for n in split:
        events += p.feed(tokens[i:i + n])
        i += n
    assert i >= len(tokens)
    events += p.finish(reason)
    return p, events


def _summary(events):
    kinds = []
    for e in events:
        if not kinds or kinds[-1] != type(e).__name__:
            kinds.append(type(e).__name__)
    return (
        "".join(e.text for e in events if isinstance(e, ReasoningDelta)),
        "".join(e.text for e in events if isinstance(e, ContentDelta)),
        "".join(e.arguments for e in events if isinstance(e, ToolCallDelta)),
        [(e.index, e.id, e.name) for e in events if isinstance(e, ToolCallStart)],
        kinds,
        events[-1],
    )


def _splits(n):
    rng = random.Random(1234)
    out = [[k] * (n // k + 1) for k in range(1, 8)]
    out.append([rng.randint(1, 9) for _ in range(n)])
    out.append([n])
    return out


@pytest.mark.parametrize("stream", [TOOL_STREAM, FINAL_STREAM])
def test_split_invariance(enc, stream):
    tokens = enc.encode(stream, allowed_special="all")
    results = [_summary(_run(tokens, s)[1]) for s in _splits(len(tokens))]
    assert all(r == results[0] for r in results)


def test_tool_call_stream(enc):
    p, events = _run(enc.encode(TOOL_STREAM, allowed_special="all"), [1] * 200)
    reasoning, content, args, starts, kinds, last = _summary(events)
    assert reasoning == "User wants Paris weather; call the tool. 日本 🦜" == p.reasoning
    assert content == "" == p.content
    assert json.loads(args) == {"location": "Paris", "unit": "c"}
    assert starts == [(0, "call_0", "get_weather")]
    assert kinds == ["ReasoningDelta", "ToolCallStart", "ToolCallDelta", "Finished"]
    assert last == Finished("tool_calls", None)
    assert p.tool_calls == [("call_0", "get_weather", '{"location": "Paris", "unit": "c"}')]
    assert p.is_done


def test_final_stream_and_reasoning_tokens(enc):
    tokens = enc.encode(FINAL_STREAM, allowed_special="all")
    p, events = _run(tokens, [3] * 100)
    assert p.reasoning == "Two plus two is four."
    assert p.content == "The answer is **4** — é."
    assert _summary(events)[4] == ["ReasoningDelta", "ContentDelta", "Finished"]
    assert events[-1] == Finished("stop", None)
    analysis = enc.encode("<|channel|>analysis<|message|>Two plus two is four.<|end|>", allowed_special="all")
    assert p.reasoning_tokens == len(analysis)


def test_reasoning_tokens_mid_stream(enc):
    p = OutputParser()
    head = enc.encode("<|channel|>analysis<|message|>thinking hard", allowed_special="all")
    p.feed(head)
    assert p.reasoning_tokens == len(head) and not p.is_done
    p.feed(enc.encode("<|end|><|start|>assistant<|channel|>final<|message|>ok", allowed_special="all"))
    assert p.reasoning_tokens == len(head) + 1


def test_finish_reasons(enc):
    def finish(text, reason):
        p = OutputParser()
        p.feed(enc.encode(text, allowed_special="all"))
        return p.finish(reason)[0].finish_reason

    assert finish("<|channel|>final<|message|>cut off", "length") == "length"
    assert finish("<|channel|>final<|message|>done<|end|>", "stop") == "stop"
    assert finish("<|channel|>final<|message|>done<|return|>", "length") == "stop"
    assert finish(TOOL_STREAM, "stop") == "tool_calls"
    assert finish("<|channel|>final<|message|>x", "abort") == "abort"
    # <|call|> closing something that is not a tool call is just a stop.
    assert finish("<|channel|>final<|message|>x<|call|>", "stop") == "stop"


def test_finish_is_idempotent_and_feed_after_done_ignored(enc):
    p = OutputParser()
    p.feed(enc.encode("<|channel|>final<|message|>a<|return|>", allowed_special="all"))
    assert p.is_done
    assert p.feed(enc.encode("more text", allowed_special="all")) == []
    assert p.content == "a"
    assert len(p.finish("stop")) == 1 and p.finish("stop") == []


def test_preamble_and_multiple_tool_calls(enc):
    text = ('<|channel|>commentary<|message|>Let me check.<|end|>'
            '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"location": "A"}<|end|>'
            '<|start|>assistant<|channel|>commentary to=functions.now <|constrain|>json<|message|>{}<|call|>')
    p, events = _run(enc.encode(text, allowed_special="all"), [2] * 100)
    assert p.content == "Let me check."
    assert p.tool_calls == [("call_0", "get_weather", '{"location": "A"}'), ("call_1", "now", "{}")]
    assert sorted({e.index for e in events if isinstance(e, ToolCallDelta)}) == [0, 1]
    assert _summary(events)[4] == ["ContentDelta", "ToolCallStart", "ToolCallDelta", "ToolCallStart",
                                   "ToolCallDelta", "Finished"]
    assert events[-1] == Finished("tool_calls", None)


PREAMBLE_STREAM = ('<|channel|>commentary<|message|>Let me check 日本.<|end|>'
                   '<|start|>assistant<|channel|>commentary to=functions.now <|constrain|>json<|message|>{}<|call|>')


@pytest.mark.parametrize("stream", [FINAL_STREAM, TOOL_STREAM, PREAMBLE_STREAM])
def test_answer_tokens_are_exactly_the_answer_text(enc, stream):
    # what content logprobs cover: answer (final or preamble) text, not headers, end tokens, reasoning or arguments
    tokens = enc.encode(stream, allowed_special="all")
    p = OutputParser(id_factory=_ids)
    answer = []
    for t in tokens:
        p.feed([t])
        if p.last_in_answer:
            answer.append(t)
    assert (enc.decode_utf8(answer) if answer else "") == p.content


def test_default_call_ids_unique_per_parser(enc):
    ids = []
    for _ in range(2):
        p = OutputParser()
        p.feed(enc.encode(TOOL_STREAM, allowed_special="all"))
        ids.append(p.tool_calls[0].id)
    assert all(i.startswith("call_0_") for i in ids) and ids[0] != ids[1]


MALFORMED = [
    # (stream, text parsed before the error)
    ("<|channel|>analysis<|message|>think<|end|>garbage where a header belongs", "think"),
    ("<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>bogus<|message|>x<|end|>", "think"),
    ("<|channel|>analysis<|message|>think <|start|>assistant<|channel|>final<|message|>x<|return|>", "think "),
    ("<|channel|>analysis<|message|>think<|channel|>final<|message|>x<|return|>", "think"),
    ("<|channel|>final<|return|>", ""),
    ("<|channel|>analysis<|message|>think<|end|><|end|>", "think"),
    ("<|channel|>analysis<|message|>think<|end|><|start|>user<|message|>hi<|end|>", "think"),
    ("<|channel|>analysis<|message|>think<|end|><|start|>functions.x to=assistant<|channel|>commentary<|message|>r", "think"),
    ("<|message|>no channel<|return|>", ""),
]


@pytest.mark.parametrize("stream, before", MALFORMED)
def test_malformed_output_never_raises(enc, stream, before):
    tokens = enc.encode(stream, allowed_special="all")
    for split in ([1] * len(tokens), [len(tokens)]):
        p, events = _run(tokens, split, reason="stop")
        assert isinstance(events[-1], Finished) and events[-1].error
        assert events[-1].finish_reason == "stop"
        assert p.reasoning == before and p.is_done
        assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == before


def test_malformed_keeps_tool_call_and_odd_tokens(enc):
    tokens = enc.encode('<|channel|>commentary to=functions.now <|constrain|>json<|message|>{"a"', allowed_special="all")
    p = OutputParser(id_factory=_ids)
    p.feed(tokens)
    p.feed([-5, 10**9])
    assert p.finish("length")[0].error
    assert p.tool_calls == [("call_0", "now", '{"a"')]


def test_runaway_header_is_an_error(enc):
    p = OutputParser()
    p.feed(enc.encode("word " * 300, allowed_special="all"))
    assert p.is_done and "header" in p.finish("length")[0].error
