"""/v1/chat/completions through the official openai SDK, on the random demo model:
structure and validity only, never specific text."""

import json

import jsonschema
import pytest

from .helpers import CHAT_TOOLS, PERSON, TOOL_SCHEMAS, WEATHER

HI = [{"role": "user", "content": "Say hi."}]
SHORT = {"max_reasoning_tokens": 8}


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


def reasoning_run(client, **kw):
    """A response that reasoned: the analysis branch is optional under the grammar, so try seeds."""
    for seed in range(12):
        r = client.chat.completions.create(model="demo", messages=HI, max_tokens=24, seed=seed,
                                           extra_body=SHORT, **kw)
        if extra(r.choices[0].message, "reasoning_content"):
            return r, seed
    pytest.fail("no seed produced reasoning")


def test_chat_non_streaming_with_reasoning(client):
    r, _ = reasoning_run(client)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "demo"
    assert r.created > 0
    [c] = r.choices
    assert c.index == 0 and c.finish_reason in ("stop", "length")
    msg = c.message
    assert msg.role == "assistant" and isinstance(msg.content, str) and msg.tool_calls is None
    reasoning = extra(msg, "reasoning_content")
    assert reasoning and reasoning not in msg.content
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 < u.completion_tokens_details.reasoning_tokens <= u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_chat_streaming_matches_non_streaming(client):
    ref, seed = reasoning_run(client)
    chunks = list(client.chat.completions.create(
        model="demo", messages=HI, max_tokens=24, seed=seed, extra_body=SHORT, stream=True,
        stream_options={"include_usage": True}))
    assert all(ch.id == chunks[0].id and ch.id.startswith("chatcmpl-") for ch in chunks)
    assert all(ch.object == "chat.completion.chunk" and ch.model == "demo" for ch in chunks)
    first, usage_chunk = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    body = chunks[1:-1]
    assert all(ch.usage is None for ch in chunks[:-1])
    reasoning, content, seen_content = [], [], False
    for ch in body:
        d = ch.choices[0].delta
        r = extra(d, "reasoning_content")
        # reasoning never shares a delta with content, and never comes after it
        assert not (r and d.content)
        if r:
            assert not seen_content
            reasoning.append(r)
        if d.content:
            seen_content = True
            content.append(d.content)
    assert body[-1].choices[0].finish_reason == ref.choices[0].finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in body[:-1])
    # same seed, same sampling: the stream assembles to the non-streamed message
    assert "".join(reasoning) == extra(ref.choices[0].message, "reasoning_content")
    assert "".join(content) == ref.choices[0].message.content
    u = usage_chunk.usage
    assert u.completion_tokens == ref.usage.completion_tokens and u.prompt_tokens == ref.usage.prompt_tokens
    assert u.completion_tokens_details.reasoning_tokens == ref.usage.completion_tokens_details.reasoning_tokens > 0


def test_no_reasoning_when_budget_is_zero(client):
    r = client.chat.completions.create(model="demo", messages=HI, max_tokens=8, n=3, seed=1,
                                       reasoning_effort="low", extra_body={"max_reasoning_tokens": 0})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert not extra(c.message, "reasoning_content") and c.message.content
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    assert 3 < r.usage.completion_tokens <= 3 * 8


def test_every_sdk_reasoning_effort_is_served_at_one_of_gpt_oss_three(client, api):
    """The SDK's efforts (none, minimal, low, medium, high, xhigh, max) map onto gpt-oss' low / medium / high:
    the same prompt tokens as that effort; none also reasons not at all."""
    import httpx

    def prompt(effort):
        return httpx.post(f"{api.url}/tokenize", json={"messages": HI, "reasoning_effort": effort}).json()["tokens"]
    assert prompt("none") == prompt("minimal") == prompt("low") != prompt("medium")
    assert prompt("xhigh") == prompt("max") == prompt("high") != prompt("medium")
    r = client.chat.completions.create(model="demo", messages=HI, max_tokens=8, n=3, seed=1, reasoning_effort="none")
    assert r.usage.completion_tokens_details.reasoning_tokens == 0 and all(c.message.content for c in r.choices)
    resp = client.responses.create(model="demo", input="hi", max_output_tokens=8, reasoning={"effort": "none"})
    assert resp.reasoning.effort == "none" and resp.usage.output_tokens_details.reasoning_tokens == 0
    assert [it.type for it in resp.output] == ["message"]
    assert client.responses.create(model="demo", input="hi", max_output_tokens=2,
                                   reasoning={"effort": "xhigh"}).reasoning.effort == "high"


def test_required_tool_call_is_valid(client):
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=CHAT_TOOLS, tool_choice="required", max_tokens=120, seed=3,
                                       parallel_tool_calls=False, extra_body=SHORT)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    [call] = c.message.tool_calls
    assert call.type == "function" and call.id and call.function.name in TOOL_SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])
    assert not c.message.content


def test_named_tool_call_streams_as_deltas(client):
    stream = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Weather?"}], tools=CHAT_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=120, seed=5,
        extra_body=SHORT, stream=True)
    deltas, finish = [], None
    for ch in stream:
        for c in ch.choices:
            assert not c.delta.content  # a forced call: no answer text
            deltas.extend(c.delta.tool_calls or [])
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    head, rest = deltas[0], deltas[1:]
    assert head.id and head.type == "function" and head.function.name == "get_weather"
    assert rest and all(d.id is None and d.function.name is None and d.index == head.index for d in rest)
    args = (head.function.arguments or "") + "".join(d.function.arguments for d in rest)
    jsonschema.validate(json.loads(args), WEATHER)


def test_tool_result_round_trip(client):
    msgs = [{"role": "user", "content": "What time is it?"}]
    r = client.chat.completions.create(model="demo", messages=msgs, tools=CHAT_TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=60, seed=2, extra_body=SHORT)
    msg = r.choices[0].message
    [call] = msg.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}
    turn = {"role": "assistant", "content": None,
            "tool_calls": [{"id": call.id, "type": "function",
                            "function": {"name": call.function.name, "arguments": call.function.arguments}}]}
    if extra(msg, "reasoning_content"):
        turn["reasoning_content"] = extra(msg, "reasoning_content")
    msgs += [turn, {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"time": "12:00"})}]
    r2 = client.chat.completions.create(model="demo", messages=msgs, tools=CHAT_TOOLS, tool_choice="none",
                                        max_tokens=16, extra_body=SHORT)
    c = r2.choices[0]
    assert c.finish_reason in ("stop", "length") and c.message.tool_calls is None
    assert isinstance(c.message.content, str)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens  # the tool turn is in the prompt


def test_json_schema_response_format(client):
    r = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "A person as JSON."}], max_tokens=200, n=2, seed=7,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                "strict": True}},
        extra_body=SHORT)
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_json_object_and_content_parts(client):
    r = client.chat.completions.create(
        model="demo", max_tokens=80, seed=11, response_format={"type": "json_object"},
        messages=[{"role": "system", "content": [{"type": "text", "text": "Reply in JSON."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]}],
        extra_body={"max_reasoning_tokens": 0})
    c = r.choices[0]
    if c.finish_reason == "stop":  # an unbounded object may run out of tokens; if it ended, it is JSON
        assert isinstance(json.loads(c.message.content), dict)
    else:
        assert c.finish_reason == "length" and c.message.content.lstrip().startswith("{")


def test_sampling_params_and_logprobs(client):
    r = client.chat.completions.create(
        model="demo", messages=HI, max_completion_tokens=12, temperature=0.7, top_p=0.9, seed=4,
        frequency_penalty=0.5, presence_penalty=0.2, logit_bias={"1000": 5}, logprobs=True, top_logprobs=3,
        extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "max_reasoning_tokens": 0})
    c = r.choices[0]
    lps = c.logprobs.content
    assert lps, "answer tokens carry logprobs"
    joined = b"".join(bytes(lp.bytes) for lp in lps).decode("utf-8", errors="replace")
    assert joined == c.message.content
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert all(t.logprob <= 0 and isinstance(t.bytes, list) for t in lp.top_logprobs)


def test_stop_string_ends_content(client):
    base = client.chat.completions.create(model="demo", messages=HI, max_tokens=20, seed=9,
                                          extra_body={"max_reasoning_tokens": 0})
    text = base.choices[0].message.content
    assert len(text) > 6
    stop = text[3:6]
    r = client.chat.completions.create(model="demo", messages=HI, max_tokens=20, seed=9, stop=[stop],
                                       extra_body={"max_reasoning_tokens": 0})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.content == text[:text.index(stop)]


def test_routing_by_model(api, client):
    # from quiescence: an earlier test's aborted request may still have a step to finish
    before = {m: api.wait_idle(m)["generated_tokens"] for m in ("demo", "demo-b")}
    r = client.chat.completions.create(model="demo-b", messages=HI, max_tokens=5, extra_body=SHORT)
    assert r.model == "demo-b"
    after = {m: api.engines[m].stats()["generated_tokens"] for m in ("demo", "demo-b")}
    assert after["demo-b"] - before["demo-b"] == 5 and after["demo"] == before["demo"]
