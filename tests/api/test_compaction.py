"""POST /v1/responses/compact through the openai SDK (`client.responses.compact`): a conversation comes back
as its user messages and one sealed compaction item, and the item continues the conversation: the prompt
renders from it on, as the user messages and the summary."""

import json
import time

import openai
import pytest

from deployments.compaction import DIRECTIVE, SUMMARY_NOTE
from deployments.sealed_reasoning import ReasoningSeal, new_key
from engine.core import EngineConfig

from .conftest import own_server

KEY = new_key()
CALL = [{"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": '{"temp_c": 21}'}]
CONVERSATION = [{"role": "user", "content": "Weather in Paris?"}, *CALL,
                {"role": "assistant", "content": "It is 21 C in Paris."},
                {"role": "user", "content": [{"type": "input_text", "text": "And "}, {"type": "input_text",
                                                                                    "text": "tomorrow?"}]}]


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    from deployments.response_store import MemoryResponseStore
    with own_server(tiny_ckpt, "demo", EngineConfig(max_model_len=1024, num_blocks=128), reasoning_key=KEY,
                    response_store=MemoryResponseStore(), api_keys={"a": "priority", "b": "priority"}) as s:
        yield s


def client(srv, key="a"):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=60)


def cap(n: int) -> dict:
    return {"max_output_tokens": n}  # the summary's cap: an extension, so not among the SDK's arguments


def tokens(c, items) -> int:
    return c.responses.input_tokens.count(model="demo", input=items).input_tokens


def test_a_conversation_compacts_to_its_user_messages_and_a_sealed_summary(srv):
    c = client(srv)
    done = c.responses.compact(model="demo", input=CONVERSATION, instructions="Be brief.", extra_body=cap(48))
    assert done.object == "response.compaction" and done.id.startswith("resp_")
    *users, item = [o.model_dump(exclude_none=True) for o in done.output]
    assert [(u["role"], [p["text"] for p in u["content"]]) for u in users] == [
        ("user", ["Weather in Paris?"]), ("user", ["And tomorrow?"])]  # each as one text
    assert item["type"] == "compaction" and item["id"].startswith("cmp_") and item["created_by"] == "demo"
    sealed = json.loads(ReasoningSeal(KEY).open(item["encrypted_content"], None))
    assert sealed["users"] == ["Weather in Paris?", "And tomorrow?"]
    summary = sealed["summary"]
    # the model was asked for the summary after the whole conversation (at low effort): its prompt is exactly that
    asked = c.responses.input_tokens.count(model="demo", input=[*CONVERSATION, {"role": "user", "content": DIRECTIVE}],
                                           instructions="Be brief.", reasoning={"effort": "low"}).input_tokens
    assert done.usage.input_tokens == asked and 0 < done.usage.output_tokens <= 48

    # sent back, the item is its user messages, then the summary; what came before it may be dropped
    nxt = [*users, item, {"role": "user", "content": "Thanks."}]
    plain = [{"role": "user", "content": "Weather in Paris?"}, {"role": "user", "content": "And tomorrow?"},
             {"role": "user", "content": SUMMARY_NOTE + summary}, {"role": "user", "content": "Thanks."}]
    assert tokens(c, nxt) == tokens(c, plain) == tokens(c, [item, {"role": "user", "content": "Thanks."}])
    assert tokens(c, [*CONVERSATION, item, {"role": "user", "content": "Thanks."}]) == tokens(c, plain)
    r = c.responses.create(model="demo", input=nxt, max_output_tokens=4)
    assert r.status in ("completed", "incomplete") and r.usage.input_tokens == tokens(c, plain)
    # compacting again folds the old summary into the new one and keeps every user message
    again = c.responses.compact(model="demo", input=nxt, extra_body=cap(16))
    assert [o.type for o in again.output] == ["message", "message", "message", "compaction"]
    assert json.loads(ReasoningSeal(KEY).open(again.output[-1].encrypted_content, None))["users"] == [
        "Weather in Paris?", "And tomorrow?", "Thanks."]
    redo = c.responses.input_tokens.count(model="demo", input=[*plain, {"role": "user", "content": DIRECTIVE}],
                                          reasoning={"effort": "low"}).input_tokens
    assert again.usage.input_tokens == redo  # it summarised the opened conversation


def test_a_stored_conversation_compacts_for_its_owner_only(srv):
    a, b = client(srv, "a"), client(srv, "b")
    r = a.responses.create(model="demo", input="Remember the number 42.", max_output_tokens=8)
    done = a.responses.compact(model="demo", previous_response_id=r.id, input="What was it?", extra_body=cap(8))
    assert [o.type for o in done.output] == ["message", "message", "compaction"]
    assert [o.content[0].text for o in done.output[:2]] == ["Remember the number 42.", "What was it?"]
    with pytest.raises(openai.BadRequestError) as e:
        b.responses.compact(model="demo", previous_response_id=r.id, extra_body=cap(8))
    assert e.value.body["code"] == "previous_response_not_found"


def test_bad_compactions_get_openai_errors(srv):
    c = client(srv)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.compact(model="demo")
    assert e.value.body["param"] == "input"
    token = c.responses.compact(model="demo", input="hi", extra_body=cap(4)).output[-1].encrypted_content
    for bad in (token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB"),
                ReasoningSeal(new_key()).seal("forged")):
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="demo", input=[{"type": "compaction", "id": "cmp_x", "encrypted_content": bad},
                                                    {"role": "user", "content": "go on"}], max_output_tokens=4)
        assert e.value.body["code"] == "invalid_encrypted_content" and "compaction item cmp_x" in \
            e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.responses.compact(model="nope", input="hi")


def test_a_compaction_item_in_a_conversation_renders_from_its_seal(srv):
    c = client(srv)
    item = c.responses.compact(model="demo", input=CONVERSATION, extra_body=cap(8)).output[-1].model_dump(
        exclude_none=True)
    summary = json.loads(ReasoningSeal(KEY).open(item["encrypted_content"], None))["summary"]
    conv = c.conversations.create(items=[{"role": "developer", "content": "Be brief."},
                                         {"role": "user", "content": "an older question"}])
    c.conversations.items.create(conv.id, items=[{**item, "summary": "IGNORE ME: a summary the client wrote"}])
    listed = list(c.conversations.items.list(conv.id, order="asc"))
    assert [it.type for it in listed] == ["message", "message", "compaction"]
    assert "summary" not in listed[2].model_dump()  # what a client adds beyond the item's fields is not kept
    asked = c.responses.input_tokens.count(model="demo", conversation=conv.id, input="Go on.").input_tokens
    plain = [{"role": "developer", "content": "Be brief."},  # kept; the older question is the item's to carry
             {"role": "user", "content": "Weather in Paris?"}, {"role": "user", "content": "And tomorrow?"},
             {"role": "user", "content": SUMMARY_NOTE + summary}, {"role": "user", "content": "Go on."}]
    assert asked == tokens(c, plain)


LONG_TOOL = [{"type": "function_call", "call_id": "c2", "name": "read_file", "arguments": '{"path": "a.txt"}'},
             {"type": "function_call_output", "call_id": "c2", "output": "lorem ipsum dolor " * 150}]


def test_context_management_compacts_first_and_answers_from_the_compaction(srv):
    """Over compact_threshold the conversation is compacted first: the compaction is the response's first output
    item, the answer's prompt is that item opened, its pass counts in the usage, and the next turn renders from
    it (previous_response_id, or the items sent back)."""
    c = client(srv)
    manage = [{"type": "compaction", "compact_threshold": 200}]
    convo = [{"role": "user", "content": "Summarise a.txt"}, *LONG_TOOL, {"role": "user", "content": "Shorter?"}]
    assert tokens(c, convo) > 200
    r = c.responses.create(model="demo", input=convo, max_output_tokens=6, extra_body={"context_management": manage})
    assert [o.type for o in r.output][:1] == ["compaction"]
    item = r.output[0].model_dump(exclude_none=True)
    answered_from = tokens(c, [item])  # the item opened: the two user messages and the summary
    assert answered_from < tokens(c, convo)
    sealed = json.loads(ReasoningSeal(KEY).open(item["encrypted_content"], None))
    assert sealed["users"] == ["Summarise a.txt", "Shorter?"]
    assert r.usage.input_tokens > answered_from  # the answer's prompt, and the compaction pass's
    # the next turn, chained: the prompt starts at the compaction item
    nxt = c.responses.create(model="demo", previous_response_id=r.id, input="Thanks.", max_output_tokens=2,
                             extra_body={"context_management": [{"type": "compaction", "compact_threshold": 10**6}]})
    resent = [item, *[o.model_dump(exclude_none=True) for o in r.output[1:]], {"role": "user", "content": "Thanks."}]
    assert nxt.usage.input_tokens == tokens(c, resent) and "compaction" not in [o.type for o in nxt.output]
    # a background response compacts the same way, in its run
    bg = c.responses.create(model="demo", input=convo, max_output_tokens=4, background=True,
                            extra_body={"context_management": manage})
    for _ in range(600):
        if (got := c.responses.retrieve(bg.id)).status not in ("queued", "in_progress"):
            break
        time.sleep(0.05)
    assert got.status in ("completed", "incomplete") and got.output[0].type == "compaction"
    # under the threshold nothing is compacted
    small = c.responses.create(model="demo", input="hi", max_output_tokens=2, extra_body={"context_management": manage})
    assert "compaction" not in [o.type for o in small.output]


def test_context_management_streams_the_compaction_first_and_compacts_what_would_not_fit(srv):
    c = client(srv)
    big = [{"role": "user", "content": "Read them all"}, *LONG_TOOL, *[
        {**it, "call_id": f"x{i}"} for i in range(3) for it in LONG_TOOL]]
    with pytest.raises(openai.BadRequestError) as e:  # over the 1,024-token context
        c.responses.create(model="demo", input=big, max_output_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    events = list(c.responses.create(model="demo", input=big, max_output_tokens=4, stream=True,
                                     extra_body={"context_management": [{"type": "compaction"}]}))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.output_item.done"]
    assert events[2].item.type == events[3].item.type == "compaction" and events[2].output_index == 0
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert events[-1].response.output[0].type == "compaction"  # then the answer's items, if 4 tokens made any
    assert [e.sequence_number for e in events] == list(range(len(events)))
