"""Errors are OpenAI error JSON with the right status; failures mid-stream end the
stream with an error event and [DONE]; admission control; client disconnects abort."""

import asyncio
import json
import time

import httpx
import openai
import pytest

from .helpers import hold_stream

HI = [{"role": "user", "content": "hi"}]


def sse_events(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        data = [ln[len("data: "):] for ln in block.split("\n") if ln.startswith("data: ")]
        if data:
            out.append(data[0] if data[0] == "[DONE]" else json.loads(data[0]))
    return out


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=HI, max_tokens=2)
    assert e.value.status_code == 404
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")


def test_bad_parameters_400_name_the_param(api, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=HI, temperature=5)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    cases = [
        ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "robot", "content": "x"}]},
         "messages[0].role"),
        ("/v1/chat/completions", {"model": "demo", "messages": HI, "top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {"model": "demo", "messages": HI, "tool_choice": "required"}, "tool_choice"),
        # a union's member is named by its `type` tag: the error is the member the client meant
        ("/v1/chat/completions", {"model": "demo", "messages": HI, "tool_choice": {"type": "allowed_tools"}},
         "tool_choice.allowed_tools"),
        ("/v1/chat/completions", {"model": "demo", "messages": HI, "tool_choice": {"type": "function"}},
         "tool_choice.function"),
        ("/v1/responses", {"model": "demo", "input": "x", "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                                                          "tools": []}}, "tool_choice.tools"),
        ("/v1/chat/completions", {"model": "demo", "messages": HI, "logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/chat/completions", {"model": "demo", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user"}]}, "messages"),
        ("/v1/chat/completions", {"model": "demo", "messages": HI + [{"role": "assistant", "content": None}]},
         "messages"),
        ("/v1/responses", {"model": "demo", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ("/v1/responses", {"model": "demo", "input": []}, "input"),
        # a field named like a tagged union's member ("reasoning" items of `input`) keeps its name
        ("/v1/responses", {"model": "demo", "input": "x", "reasoning": {"effort": "maximal"}}, "reasoning.effort"),
        ("/v1/responses", {"model": "demo", "input": [{"type": "message", "role": "user"}]}, "input[0].content"),
        ("/v1/responses", {"model": "demo", "input": "x", "previous_response_id": "resp_1"},
         "previous_response_id"),  # never stored
        ("/v1/responses", {"model": "demo", "input": "x", "prompt": {"version": "1"}}, "prompt.id"),
        # what this server does not keep is refused, not ignored (the answer would be to another question)
        ("/v1/chat/completions", {"model": "demo", "messages": HI, "functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"model": "demo", "messages": HI, "function_call": "auto"}, "function_call"),
        # int64, as OpenAI's: a larger seed failed the engine step of every request in it
        ("/v1/chat/completions", {"model": "demo", "messages": HI, "seed": 2**64 - 1, "n": 2}, "seed"),
        ("/v1/responses", {"model": "demo", "input": "x", "seed": -2**63 - 1}, "seed"),
        ("/v1/completions", {"model": "demo", "prompt": [[]]}, "prompt"),
        ("/v1/chat/completions", {"model": "demo", "messages": HI, "logit_bias": {"201088": 1}}, "logit_bias"),
        # each entry is host work in every step of the batch the request shares
        ("/v1/completions", {"model": "demo", "prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}},
         "logit_bias"),
        ("/v1/completions", {"model": "demo", "prompt": ["a", ""]}, "prompt"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "n": 0}, "n"),
        ("/v1/chat/completions", {"model": "demo", "messages": HI, "tools": [{"type": "function", "function": {}}]},
         "tools[0].function.name"),
        ("/v1/chat/completions", {"model": "demo", "messages": HI, "response_format": {"type": "json_schema"}},
         "response_format.json_schema"),
        ("/v1/responses", {"model": "demo", "input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
        ("/v1/responses", {"model": "demo", "input": "x", "tools": [{"type": "function", "name": "f"}],
                           "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
    ]
    for path, body, param in cases:
        r = httpx.post(api.url + path, json=body)
        assert r.status_code == 400, (path, body, r.text)
        err = r.json()["error"]
        assert err["param"] == param, (body, err)
        assert err["type"] == "invalid_request_error", (body, err)
        if param == "messages":  # as pydantic's checks of the same body
            assert err["code"] == "invalid_value", (body, err)
        assert "Traceback" not in r.text
    r = httpx.post(api.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(api.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_bodies_that_are_not_text_or_not_objects(api):
    """A lone surrogate escape is valid JSON but not Unicode: harmony and the grammar compiler
    failed on it with messages about their own JSON. Each is a 400 naming where it sits."""
    lone = "\\ud800"  # the six characters of the JSON escape
    cases = [
        ("/v1/chat/completions", '{"model":"demo","messages":[{"role":"user","content":"%s x"}]}',
         "messages[0].content"),
        ("/v1/chat/completions", '{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}],'
                                 '"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":'
                                 '{"enum":["%s"]}}}}', "response_format.json_schema.schema.enum[0]"),
        ("/v1/responses", '{"model":"demo","input":"hi","instructions":"%s"}', "instructions"),
        ("/v1/completions", '{"model":"demo","prompt":"hi","stop":"%s"}', "stop"),
        ("/v1/completions", '{"model":"%s","prompt":"hi"}', "model"),
    ]
    for path, body, param in cases:
        r = httpx.post(api.url + path, content=(body % lone).encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and "surrogate" in err["message"], (body, err)
    # a surrogate pair is one character (an emoji), and fine
    r = httpx.post(api.url + "/v1/completions", timeout=60, headers={"content-type": "application/json"},
                   content=b'{"model":"demo","prompt":"\\ud83d\\ude00","max_tokens":1}')
    assert r.status_code == 200, r.text
    r = httpx.post(api.url + "/v1/chat/completions", content=b'{"model":"demo","messages":"\xff"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json" and "UTF-8" in r.text, r.text
    deep = b'{"model":"demo","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # past json's recursion
    r = httpx.post(api.url + "/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is nested too deeply to parse"
    r = httpx.post(api.url + "/v1/chat/completions", content=b'{"model":"demo"}',
                   headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "Content-Type is 'text/plain'" in r.json()["error"]["message"], r.text


def test_schema_the_grammar_rejects_is_a_400(api):
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    r = httpx.post(api.url + "/v1/chat/completions", timeout=60,
                   json={"model": "demo", "messages": HI, "response_format": rf, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}}]
    r = httpx.post(api.url + "/v1/responses", timeout=60,
                   json={"model": "demo", "input": "hi", "tools": tools, "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text


def test_context_too_long_400(api, client):
    long = [{"role": "user", "content": "hello " * 2000}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=long, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    # streaming too: the refusal comes as a status code before any event
    r = httpx.post(api.url + "/v1/chat/completions",
                   json={"model": "demo", "messages": long, "max_tokens": 4, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="demo", input="hello " * 2000)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="x", max_tokens=5000)
    assert e.value.body["code"] == "context_length_exceeded"
    assert api.wait_idle("demo")["running"] == 0


def test_429_beyond_max_pending(api):
    body = {"model": "limited", "messages": HI, "max_tokens": 400, "stream": True,
            "extra": 1, "max_reasoning_tokens": 0}

    async def main():
        async with httpx.AsyncClient(base_url=api.url, timeout=60) as c:
            release = asyncio.Event()
            started = [asyncio.Event(), asyncio.Event()]
            holders = [asyncio.create_task(hold_stream(c, body, s, release)) for s in started]
            await asyncio.gather(*(s.wait() for s in started))
            rejected = await asyncio.gather(*(c.post("/v1/chat/completions", json={**body, "stream": False})
                                              for _ in range(3)))
            release.set()
            await asyncio.gather(*holders)
            return rejected

    for r in asyncio.run(main()):
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert api.wait_idle("limited")["running"] == 0
    # the slots came back: the model admits again
    r = httpx.post(api.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text


def test_engine_unavailable_503(client):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="overloaded", messages=HI, max_tokens=4, stream=True)
    assert e.value.status_code == 503 and e.value.body["code"] == "engine_overloaded"
    with pytest.raises(openai.InternalServerError) as e:
        client.responses.create(model="down", input="hi")
    assert e.value.status_code == 503 and e.value.body["code"] == "engine_unavailable"
    assert "no route" not in e.value.body["message"]  # internals stay in the server log


def test_engine_failure_mid_stream_ends_with_error_event(api, client):
    flaky = api.engines["flaky"].engine
    flaky.fail_after = 6
    try:
        r = httpx.post(api.url + "/v1/chat/completions", timeout=60,
                       json={"model": "flaky", "messages": HI, "max_tokens": 200, "stream": True})
    finally:
        flaky.fail_after = None
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert events[-2]["error"]["type"] == "server_error" and "Traceback" not in r.text
    assert any("choices" in e for e in events[:-2])  # it did stream before failing
    # the SDK turns the error event into an exception, not a silent end
    flaky.fail_after = 6
    try:
        with pytest.raises(openai.APIError):
            for _ in client.chat.completions.create(model="flaky", messages=HI, max_tokens=200, stream=True):
                pass
        flaky.fail_after = 3
        with pytest.raises(openai.InternalServerError) as e:  # non-streaming: a 503
            client.chat.completions.create(model="flaky", messages=HI, max_tokens=200)
        assert e.value.status_code == 503
    finally:
        flaky.fail_after = None
    # the engine keeps serving afterwards
    ok = client.chat.completions.create(model="flaky", messages=HI, max_tokens=4)
    assert ok.choices[0].finish_reason == "length"


def test_transport_failure_mid_stream(api, client):
    for path, body in [("/v1/chat/completions", {"messages": HI}), ("/v1/responses", {"input": "hi"}),
                       ("/v1/completions", {"prompt": "hi"})]:
        r = httpx.post(api.url + path, timeout=60,
                       json={"model": "dropping", "stream": True, "max_tokens": 100, "max_output_tokens": 100,
                             **body})
        events = sse_events(r.text)
        assert r.status_code == 200 and events[-1] == "[DONE]", path
        assert "error" in events[-2] and events[-2]["error"]["code"] == "engine_error", path
    assert api.engines["dropping"].aborted
    assert api.wait_idle("demo-b")["running"] == 0
    with pytest.raises(openai.APIError):
        for _ in client.responses.create(model="dropping", input="hi", max_output_tokens=100, stream=True):
            pass


def test_client_disconnect_aborts(api):
    body = {"model": "demo", "messages": HI, "max_tokens": 900, "max_reasoning_tokens": 0}
    with httpx.Client(base_url=api.url, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            # Keep the line iterator referenced: dropping a half-read httpx iterator closes
            # the connection, which is the disconnect this test makes on purpose below.
            it = r.iter_lines()
            lines = [next(it) for _ in range(5)]
            time.sleep(0.2)
            s = api.engines["demo"].stats()
            assert s["running"] + s["waiting"] == 1, (s, lines)  # still generating
            r.close()
    t0 = time.time()
    assert api.wait_idle("demo", timeout=5)["running"] == 0
    assert time.time() - t0 < 5
    # non-streaming: the client gives up (read timeout) and the engine stops too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(api.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    s = api.wait_idle("demo", timeout=5)
    assert s["running"] == 0 and s["waiting"] == 0
    assert s["kv_full_used"] == 0
    # every admission slot taken so far (all endpoints, all failure paths) was given back
    t0 = time.time()
    while any(api.app.state.pending.values()) and time.time() - t0 < 5:
        time.sleep(0.05)
    assert not any(api.app.state.pending.values()), api.app.state.pending
