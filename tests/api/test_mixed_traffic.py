"""Random mixed traffic, eight requests at a time: every endpoint, streaming or not, with tools,
structured output, n > 1, logprobs, penalties, reasoning budgets and background Responses (polled, or
streamed then resumed) in one batch. The invariants hold for every request whatever else shares its
steps: a 200, a stream that ends as its protocol says, output that keeps its grammar, and an engine
that is idle afterwards."""

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema

from .helpers import PERSON, TOOL_SCHEMAS, WEATHER

TOOLS = [{"name": "get_weather", "parameters": WEATHER}, {"name": "get_time"}]


def _sampling(rnd: random.Random) -> dict:
    knobs = {"temperature": [0, 0.7, 1.5], "top_p": [0.5, 1], "top_k": [5, 50], "min_p": [0.1],
             "seed": [1, -3], "frequency_penalty": [1.0], "presence_penalty": [-1.0],
             "repetition_penalty": [1.3], "logit_bias": [{"13": 5}, {"100": -100}]}
    return {k: rnd.choice(v) for k, v in knobs.items() if rnd.random() < 0.3}


def _chat(rnd: random.Random) -> dict:
    b = {"messages": [{"role": "user", "content": rnd.choice(["hi", "tell me", ""])}],
         "max_tokens": rnd.choice([1, 8, 40]), "n": rnd.choice([1, 1, 3]), "max_reasoning_tokens": 6,
         **_sampling(rnd)}
    r = rnd.random()
    if r < 0.35:
        b["tools"] = [{"type": "function", "function": t} for t in TOOLS]
        b["tool_choice"] = rnd.choice(["auto", "required", "none",
                                       {"type": "function", "function": {"name": "get_time"}}])
        b["parallel_tool_calls"] = rnd.choice([True, False])
        b["max_tokens"] = 120
    elif r < 0.55:
        b["response_format"] = rnd.choice([
            {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}])
    if rnd.random() < 0.3:
        b["logprobs"], b["top_logprobs"] = True, rnd.choice([0, 3])
    if rnd.random() < 0.3:
        b["reasoning_effort"] = rnd.choice(["low", "high"])
    return b


def _responses(rnd: random.Random) -> dict:
    b = {"input": rnd.choice(["hi", [{"role": "user", "content": "x"}]]), "max_output_tokens": rnd.choice([2, 16]),
         "max_reasoning_tokens": 6}
    if rnd.random() < 0.4:
        b["tools"] = [{"type": "function", **t} for t in TOOLS]
        b["tool_choice"], b["max_output_tokens"] = rnd.choice(["auto", "required", "none"]), 120
    elif rnd.random() < 0.4:
        b["text"] = {"format": rnd.choice([{"type": "json_object"},
                                           {"type": "json_schema", "name": "p", "schema": PERSON}])}
    return b


def _completions(rnd: random.Random) -> dict:
    b = {"prompt": rnd.choice(["hi", ["a", "b"], [1, 2, 3]]), "max_tokens": rnd.choice([1, 10]),
         "n": rnd.choice([1, 2]), "echo": rnd.choice([True, False]), **_sampling(rnd)}
    if rnd.random() < 0.4:
        b["logprobs"] = rnd.choice([0, 2])
    return b


PATHS = {_chat: "/v1/chat/completions", _responses: "/v1/responses", _completions: "/v1/completions"}


def _requests(n: int, seed: int) -> list[tuple[str, dict]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        make = rnd.choice([_chat, _chat, _responses, _completions])
        body = {"model": "demo", "stream": rnd.choice([True, False]), **make(rnd)}
        if body["stream"] and make is not _responses and rnd.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        if make is _responses and len(out) % 2:
            body["background"] = True  # polled to its end below; a stream is resumed below too
        out.append((PATHS[make], body))
    return out


def _choices_expected(path: str, b: dict) -> int:
    p = b.get("prompt")
    prompts = len(p) if isinstance(p, list) and isinstance(p[0], str) else 1  # a list of texts, or one prompt
    return b.get("n", 1) * prompts


def _check_stream(path: str, b: dict, text: str) -> None:
    if path == "/v1/responses":
        events = [ln[len("event: "):] for ln in text.splitlines() if ln.startswith("event: ")]
        assert events[0] == "response.created" and events[-1] in ("response.completed", "response.incomplete")
        return
    assert text.rstrip().endswith("data: [DONE]")
    chunks = [json.loads(ln[len("data: "):]) for ln in text.splitlines() if ln.startswith("data: {")]
    assert not any("error" in ch for ch in chunks)  # an error event (the model may well write "error")
    finishes = [c["index"] for ch in chunks for c in ch.get("choices", []) if c.get("finish_reason")]
    assert sorted(finishes) == list(range(_choices_expected(path, b)))
    if (b.get("stream_options") or {}).get("include_usage"):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def _check_chat(b: dict, body: dict) -> None:
    assert len(body["choices"]) == b["n"]
    fmt = (b.get("response_format") or {}).get("type")
    for c in body["choices"]:
        m = c["message"]
        if fmt and c["finish_reason"] == "stop":
            out = json.loads(m["content"])
            if fmt == "json_schema":
                jsonschema.validate(out, PERSON)
        if b.get("tool_choice") == "required" or isinstance(b.get("tool_choice"), dict):
            assert c["finish_reason"] in ("tool_calls", "length")
        if c["finish_reason"] == "tool_calls":
            assert b.get("tools") and b.get("tool_choice") != "none"
            calls = m["tool_calls"]
            assert calls and (b.get("parallel_tool_calls", True) or len(calls) == 1)
            for t in calls:
                jsonschema.validate(json.loads(t["function"]["arguments"]), TOOL_SCHEMAS[t["function"]["name"]])


def _check_response(b: dict, body: dict) -> None:
    assert body["status"] in ("completed", "incomplete")
    calls = [it for it in body["output"] if it["type"] == "function_call"]
    if calls:
        assert b.get("tools") and b.get("tool_choice") != "none"
    fmt = ((b.get("text") or {}).get("format") or {}).get("type")
    if fmt and body["status"] == "completed" and body["output_text"]:
        out = json.loads(body["output_text"])
        if fmt == "json_schema":
            jsonschema.validate(out, PERSON)


def test_mixed_concurrent_traffic_keeps_every_invariant(api):
    reqs = _requests(60, seed=20261126)
    assert sum(bool(b.get("background")) and not b["stream"] for _, b in reqs) >= 2
    assert sum(bool(b.get("background")) and b["stream"] for _, b in reqs) >= 2
    assert any(p == "/v1/responses" and b["stream"] and not b.get("background") for p, b in reqs)

    def run(pb):
        path, b = pb
        with httpx.Client(base_url=api.url, timeout=120) as c:
            r = c.post(path, json=b)
            t0 = time.time()
            while b.get("background") and not b["stream"] and r.status_code == 200 \
                    and r.json()["status"] == "in_progress" and time.time() - t0 < 120:
                time.sleep(0.05)
                r = c.get(f"{path}/{r.json()['id']}")
            if b.get("background") and b["stream"] and r.status_code == 200:
                chunks = r.text.split("\n\n")[:-1]
                rid = json.loads(chunks[0].split("data: ", 1)[1])["response"]["id"]
                again = c.get(f"{path}/{rid}", params={"stream": "true", "starting_after": 2})
                assert again.status_code == 200 and again.text.split("\n\n")[:-1] == chunks[3:], (b, again.text)
        return path, b, r.status_code, r.text

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(run, reqs))
    for path, b, status, text in results:
        assert status == 200, (path, b, text[:500])
        try:
            if b["stream"]:
                _check_stream(path, b, text)
            elif path == "/v1/chat/completions":
                _check_chat(b, json.loads(text))
            elif path == "/v1/responses":
                _check_response(b, json.loads(text))
            else:
                assert len(json.loads(text)["choices"]) == _choices_expected(path, b)
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            # the tail too: a stream's first chunks are alike, what broke is near its end
            shown = text if len(text) <= 2400 else f"{text[:600]} ... {text[-1800:]}"
            raise AssertionError(f"{path} {json.dumps(b)} -> {shown}") from e
    s = api.wait_idle("demo")
    assert s["running"] == 0 and s["waiting"] == 0 and s["kv_full_used"] == 0
