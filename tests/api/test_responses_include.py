"""`include` and `top_logprobs` on /v1/responses through the openai SDK: the answer tokens' logprobs in
output_text parts and stream deltas, and reasoning sealed in `encrypted_content` for a client that stores
nothing and sends it back."""

import openai
import pytest

from deployments.protocol import ResponsesRequest
from deployments.responses_api import ResponseBuilder
from deployments.sealed_reasoning import ReasoningSeal, check_key, new_key

from .test_responses import SHORT, TOOLS

LOGPROBS = ["message.output_text.logprobs"]


def _text_of(lps) -> str:
    return b"".join(bytes(lp.bytes) for lp in lps).decode("utf-8")


def _with_reasoning(client, **kw):
    """A response whose output holds a reasoning item and then a message (seed by seed)."""
    for seed in range(16):
        r = client.responses.create(model="demo", input="Say hi.", max_output_tokens=40,
                                    extra_body={**SHORT, "seed": seed}, **kw)
        kinds = [it.type for it in r.output]
        if kinds == ["reasoning", "message"] and r.output[1].content[0].text:
            return r
    raise AssertionError("no seed gave reasoning and a message")


def test_answer_logprobs_cover_exactly_the_answer_text(client):
    r = _with_reasoning(client, include=LOGPROBS, top_logprobs=3)
    assert r.top_logprobs == 3
    part = r.output[1].content[0]
    assert part.logprobs, "answer tokens carry logprobs"
    # reasoning and the harmony headers around the answer are not in them
    assert _text_of(part.logprobs) == part.text
    for lp in part.logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert [t.logprob for t in lp.top_logprobs] == sorted((t.logprob for t in lp.top_logprobs), reverse=True)

    # top_logprobs alone asks for them too; neither: none
    alone = client.responses.create(model="demo", input="Say hi.", max_output_tokens=40, top_logprobs=1,
                                    extra_body={**SHORT, "seed": 0})
    msgs = [it for it in alone.output if it.type == "message" and it.content[0].text]
    assert all(len(lp.top_logprobs) == 1 for m in msgs for lp in m.content[0].logprobs)
    assert all(_text_of(m.content[0].logprobs) == m.content[0].text for m in msgs)
    plain = client.responses.create(model="demo", input="Say hi.", max_output_tokens=40,
                                    extra_body={**SHORT, "seed": 0})
    assert all(c.logprobs == [] for it in plain.output if it.type == "message" for c in it.content)


def test_streamed_logprobs_come_with_their_deltas(client):
    for seed in range(16):
        events = list(client.responses.create(model="demo", input="Say hi.", max_output_tokens=40, stream=True,
                                              include=LOGPROBS, top_logprobs=2, extra_body={**SHORT, "seed": seed}))
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        if deltas:
            break
    assert deltas
    for d in deltas:  # each delta's tokens spell that delta
        assert _text_of(d.logprobs) == d.delta
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert [lp.token for lp in done.logprobs] == [lp.token for d in deltas for lp in d.logprobs]
    added = [e for e in events if e.type == "response.content_part.added" and e.part.type == "output_text"]
    assert added and added[0].part.logprobs == []  # the part as it was when it was added
    final = events[-1].response
    msg = [it for it in final.output if it.type == "message"][0]
    assert [lp.logprob for lp in msg.content[0].logprobs] == [lp.logprob for lp in done.logprobs]


def _first_turn(client, **kw):
    """A turn that reasons, then calls a tool (seed by seed): its reasoning belongs in the next prompt."""
    for seed in range(24):
        r = client.responses.create(model="demo", input="Weather in Paris?", tools=TOOLS, tool_choice="required",
                                    max_output_tokens=120, extra_body={**SHORT, "seed": seed}, **kw)
        if [it.type for it in r.output] == ["reasoning", "function_call"] and r.output[0].content[0].text:
            return r
    raise AssertionError("no seed gave reasoning and a call")


def _next_turn(client, r, reasoning: dict | None):
    call = r.output[1]
    items = [{"role": "user", "content": "Weather in Paris?"}]
    if reasoning is not None:
        items.append({"type": "reasoning", "id": r.output[0].id, **reasoning})
    items += [{"type": "function_call", "id": call.id, "call_id": call.call_id, "name": call.name,
               "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}]
    return client.responses.create(model="demo", input=items, tools=TOOLS, tool_choice="none", store=False,
                                   max_output_tokens=8, extra_body={**SHORT, "seed": 2})


def test_sealed_reasoning_goes_back_to_the_model_without_a_store(client):
    r = _first_turn(client, store=False, include=["reasoning.encrypted_content"])
    rs = r.output[0]
    text = rs.content[0].text
    assert rs.encrypted_content and text and text not in rs.encrypted_content
    # as Codex sends it back: no content, only the sealed text (and an empty summary)
    sealed = _next_turn(client, r, {"summary": [], "encrypted_content": rs.encrypted_content})
    plain = _next_turn(client, r, {"summary": [], "content": [{"type": "reasoning_text", "text": text}]})
    without = _next_turn(client, r, None)
    assert sealed.usage.input_tokens == plain.usage.input_tokens > without.usage.input_tokens

    # not asked for: not there
    assert _first_turn(client, store=False).output[0].encrypted_content is None


def test_sealed_reasoning_is_streamed_with_the_item(client):
    for seed in range(24):
        events = list(client.responses.create(model="demo", input="Say hi.", stream=True, max_output_tokens=40,
                                              include=["reasoning.encrypted_content"],
                                              extra_body={**SHORT, "seed": seed}))
        done = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "reasoning"]
        if done:
            break
    assert done and done[0].encrypted_content
    assert events[-1].response.output[0].encrypted_content == done[0].encrypted_content


def test_altered_or_foreign_sealed_reasoning_is_a_400(client):
    r = _first_turn(client, store=False, include=["reasoning.encrypted_content"])
    token = r.output[0].encrypted_content
    foreign = ReasoningSeal(new_key()).seal(r.output[0].content[0].text)
    for bad in (token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB"), foreign, "not-a-token"):
        with pytest.raises(openai.BadRequestError) as e:
            _next_turn(client, r, {"summary": [], "encrypted_content": bad})
        body = e.value.body
        assert body["code"] == "invalid_encrypted_content" and body["param"] == "input"
        assert r.output[0].id in body["message"]


def test_the_sealed_prompt_is_the_plain_one_token_for_token():
    seal = ReasoningSeal()
    text = "The user wants the weather; call get_weather. 日本"
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"location": "P"}'}
    out = {"type": "function_call_output", "call_id": "call_1", "output": "{}"}

    def prompt(reasoning: dict) -> list[int]:
        body = ResponsesRequest(model="demo", input=[{"role": "user", "content": "Weather?"},
                                                     {"type": "reasoning", "summary": [], **reasoning}, call, out])
        return ResponseBuilder(body, seal=seal).requests[0].prompt_ids

    assert prompt({"encrypted_content": seal.seal(text)}) == prompt(
        {"content": [{"type": "reasoning_text", "text": text}]})


def test_include_values_are_checked(api):
    import httpx
    r = httpx.post(f"{api.url}/v1/responses", json={"model": "demo", "input": "x", "include": ["reasoning.summary"]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("include")
    r = httpx.post(f"{api.url}/v1/responses", json={"model": "demo", "input": "x", "top_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_a_malformed_key_is_named():
    check_key(new_key())
    with pytest.raises(ValueError, match="GPTOSS_REASONING_KEY"):
        check_key("short")


def test_a_stored_response_is_read_back_with_its_reasoning_sealed(client, api):
    r = _with_reasoning(client)
    assert r.output[0].encrypted_content is None
    got = client.responses.retrieve(r.id, include=["reasoning.encrypted_content"])
    sealed = got.output[0].encrypted_content
    assert sealed and client.responses.retrieve(r.id).output[0].encrypted_content is None
    # what it holds goes back into a prompt as the plain text does
    n = [client.responses.input_tokens.count(input=[{"role": "user", "content": "Say hi."}, {
        "type": "reasoning", "summary": [], **part}, {"type": "function_call", "call_id": "c1", "name": "get_weather",
                                                      "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "{}"}]).input_tokens
         for part in ({"encrypted_content": sealed},
                      {"content": [{"type": "reasoning_text", "text": r.output[0].content[0].text}]})]
    assert n[0] == n[1]
    import httpx
    bad = httpx.get(f"{api.url}/v1/responses/{r.id}", params={"include[]": "reasoning.summary"})
    assert bad.status_code == 400 and "include" in bad.json()["error"]["param"]


def test_a_resumed_background_stream_seals_its_reasoning_when_the_get_asks(client):
    """A background stream created without `include`, resumed with include[]=reasoning.encrypted_content:
    the finished reasoning item and the final Response carry it sealed, as a stream created with it would;
    every other event is as stored."""
    for seed in range(24):
        events = list(client.responses.create(model="demo", input="Say hi.", stream=True, background=True,
                                              max_output_tokens=40, extra_body={**SHORT, "seed": seed}))
        if any(e.type == "response.output_item.done" and e.item.type == "reasoning" for e in events):
            break
    rid = events[0].response.id
    plain = list(client.responses.retrieve(rid, stream=True, starting_after=0))
    sealed = list(client.responses.retrieve(rid, stream=True, starting_after=0,
                                            include=["reasoning.encrypted_content"]))
    assert [e.type for e in sealed] == [e.type for e in plain] == [e.type for e in events[1:]]
    done = [(p, s) for p, s in zip(plain, sealed)
            if s.type == "response.output_item.done" and s.item.type == "reasoning"]
    assert done and done[0][0].item.encrypted_content is None
    token = done[0][1].item.encrypted_content
    assert token and done[0][1].item.content == done[0][0].item.content
    assert sealed[-1].response.output[0].encrypted_content and plain[-1].response.output[0].encrypted_content is None
    changed = [p.type for p, s in zip(plain, sealed) if p != s]
    assert set(changed) <= {"response.output_item.done", "response.completed", "response.incomplete"}, changed
    # the seal opens to the item's text: it goes back into a prompt (before a call, so it is kept) as that text
    call = [{"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "{}"}]
    n = [client.responses.input_tokens.count(input=[{"role": "user", "content": "Say hi."}, {
        "type": "reasoning", "summary": [], **part}, *call]).input_tokens
         for part in ({"encrypted_content": token}, {"content": [{"type": "reasoning_text",
                                                                  "text": done[0][0].item.content[0].text}]},
                      {"content": [{"type": "reasoning_text", "text": ""}]})]
    assert n[0] == n[1] > n[2]
