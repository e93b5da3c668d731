"""/v1/responses through the openai SDK: output items, the streaming event sequence,
function calls, multi-turn agent input and real usage."""

import json

import jsonschema

from .helpers import PERSON, TOOL_SCHEMAS, WEATHER

TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": WEATHER},
         {"type": "function", "name": "get_time", "description": "The current time", "parameters": None}]
SHORT = {"max_reasoning_tokens": 8}


def check_usage(u, reasoned: bool):
    assert u.input_tokens > 0 and u.output_tokens > 0
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0
    assert (u.output_tokens_details.reasoning_tokens > 0) == reasoned


def test_non_streaming_text(client):
    for seed in range(12):  # until one run takes the (optional) reasoning branch
        r = client.responses.create(model="demo", input="Say hi.", max_output_tokens=24,
                                    reasoning={"effort": "low"}, extra_body={**SHORT, "seed": seed})
        if r.output[0].type == "reasoning":
            break
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "demo"
    assert r.status in ("completed", "incomplete")
    kinds = [it.type for it in r.output]
    assert kinds == ["reasoning", "message"]
    rs, msg = r.output
    assert rs.id.startswith("rs_") and rs.content[0].type == "reasoning_text" and rs.content[0].text
    assert msg.role == "assistant" and msg.content[0].type == "output_text"
    assert r.output_text == msg.content[0].text and rs.content[0].text not in r.output_text
    check_usage(r.usage, reasoned=True)
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_function_call_and_multi_turn_input(client):
    r = client.responses.create(model="demo", input="Weather in Paris?", tools=TOOLS, tool_choice="required",
                                max_output_tokens=120, extra_body={**SHORT, "seed": 1})
    assert r.status == "completed"
    calls = [it for it in r.output if it.type == "function_call"]
    assert len(calls) == 1 and r.output[-1] is calls[0]
    call = calls[0]
    assert call.id.startswith("fc_") and call.call_id and call.name in TOOL_SCHEMAS
    jsonschema.validate(json.loads(call.arguments), TOOL_SCHEMAS[call.name])
    check_usage(r.usage, reasoned=r.output[0].type == "reasoning")

    # A coding agent's next turn: the earlier items sent back, plus the tool's output.
    history = [{"role": "user", "content": "Weather in Paris?"}]
    for it in r.output:
        if it.type == "reasoning":
            history.append({"type": "reasoning", "id": it.id, "summary": [],
                            "content": [{"type": "reasoning_text", "text": it.content[0].text}]})
        else:
            history.append({"type": "function_call", "id": it.id, "call_id": it.call_id, "name": it.name,
                            "arguments": it.arguments, "status": "completed"})
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'})
    r2 = client.responses.create(model="demo", input=history, tools=TOOLS, tool_choice="none",
                                 instructions="Answer briefly.", max_output_tokens=32, extra_body=SHORT)
    assert r2.status in ("completed", "incomplete")
    assert r2.output and r2.output[-1].type == "message"
    assert r2.usage.input_tokens > r.usage.input_tokens


def test_unknown_call_id_is_a_400(client):
    import openai
    try:
        client.responses.create(model="demo", input=[
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "function_call_output", "call_id": "nope", "output": "x"}], max_output_tokens=4)
    except openai.BadRequestError as e:
        assert e.body["param"] == "input" and "nope" in e.body["message"]
    else:
        raise AssertionError("expected a 400")


def test_structured_output(client):
    r = client.responses.create(model="demo", input="A person as JSON.", max_output_tokens=200,
                                text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                                                 "strict": True}},
                                extra_body={**SHORT, "seed": 2})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), PERSON)
    assert r.text.format.type == "json_schema"


def test_streaming_event_sequence(client):
    events = list(client.responses.create(model="demo", input="Weather?", tools=TOOLS,
                                          tool_choice={"type": "function", "name": "get_weather"},
                                          max_output_tokens=120, stream=True, extra_body={**SHORT, "seed": 4}))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.usage is None
    final = events[-1].response
    assert final.status == "completed" and final.id == events[0].response.id and final.id.startswith("resp_")

    # every item is opened, filled and closed in order
    added = [e for e in events if e.type == "response.output_item.added"]
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [e.output_index for e in added] == [e.output_index for e in done] == list(range(len(final.output)))
    assert [e.item.id for e in done] == [it.id for it in final.output]
    assert final.output[-1].type == "function_call" and final.output[-1].name == "get_weather"

    call = final.output[-1]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [args_done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas and "".join(deltas) == args_done.arguments == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    if final.output[0].type == "reasoning":
        text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        [rdone] = [e for e in events if e.type == "response.reasoning_text.done"]
        assert text and text == rdone.text == final.output[0].content[0].text
        assert types.index("response.content_part.added") < types.index("response.reasoning_text.delta")
    check_usage(final.usage, reasoned=final.output[0].type == "reasoning")


def test_streaming_text_events(client):
    events = list(client.responses.create(model="demo", input="Hello", max_output_tokens=12, stream=True,
                                          extra_body={"max_reasoning_tokens": 0}))
    types = [e.type for e in events]
    order = ["response.created", "response.in_progress", "response.output_item.added",
             "response.content_part.added", "response.output_text.delta", "response.output_text.done",
             "response.content_part.done", "response.output_item.done"]
    assert [t for t in dict.fromkeys(types) if t in order] == order
    assert types[-1] in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    [tdone] = [e for e in events if e.type == "response.output_text.done"]
    final = events[-1].response
    assert text == tdone.text == final.output_text
    if final.status == "incomplete":
        assert final.incomplete_details.reason == "max_output_tokens"
    assert final.usage.output_tokens == 12 or final.status == "completed"
