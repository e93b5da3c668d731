"""Responses over a WebSocket through the openai SDK (`client.responses.connect()`): a turn streams what a
streamed POST does; a connection continues its own store=false responses by id; lanes (`stream_id`) run at
once and FIFO each; `generate: false` prefills; steering queues input for a successor; errors are error events
on a connection that stays open; the connection's time limit closes it once its work is done."""

import json
import threading
import time

import openai
import pytest

from cluster.config import WebSocketConfig
from engine.core import EngineConfig

from .conftest import own_server
from .test_responses import SHORT, TOOLS

FINAL = ("response.completed", "response.incomplete", "response.failed")
pytestmark = pytest.mark.timeout(120)  # a wrong server leaves the SDK's iteration waiting: fail, not hang


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    from deployments.response_store import MemoryResponseStore
    with own_server(tiny_ckpt, "demo", EngineConfig(max_model_len=1024, num_blocks=128),
                    response_store=MemoryResponseStore(), api_keys={"a": "priority", "b": "priority"}) as s:
        yield s


def client(srv, key="a"):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=60)


def create(conn, **fields):
    conn.send({"type": "response.create", "model": "demo", **SHORT, **fields})


def until(conn, done=lambda ev: ev.type in FINAL) -> list:
    """Events up to and including the first `done` one, or the first error (a turn ends there)."""
    events = []
    for ev in conn:
        events.append(ev)
        if done(ev) or ev.type == "error":
            return events
    raise AssertionError(f"the connection closed after {[e.type for e in events]}")


def test_a_turn_streams_as_a_post_does_and_store_false_turns_continue_on_the_connection(srv):
    c = client(srv)
    post = [ev.type for ev in c.responses.create(model="demo", input="Hi", max_output_tokens=6, stream=True,
                                                 store=False, extra_body={**SHORT, "seed": 3})]
    with c.responses.connect() as conn:
        create(conn, input="Hi", max_output_tokens=6, store=False, seed=3)
        first = until(conn)
        assert [ev.type for ev in first] == post  # the same events, in the same order
        assert [ev.sequence_number for ev in first] == list(range(len(first)))
        r1 = first[-1].response
        assert r1.store is False and r1.previous_response_id is None and r1.output
        create(conn, input="And then?", max_output_tokens=6, store=False, previous_response_id=r1.id)
        r2 = until(conn)[-1].response
    assert r2.previous_response_id == r1.id and r2.status in ("completed", "incomplete")
    # the turn's prompt is the whole conversation, sent over HTTP in full
    history = [{"role": "user", "content": "Hi"}, *[it.model_dump(exclude_none=True) for it in r1.output],
               {"role": "user", "content": "And then?"}]
    assert r2.usage.input_tokens == c.responses.input_tokens.count(model="demo", input=history).input_tokens
    assert r2.usage.input_tokens_details.cached_tokens > 0  # the first turn's prefix
    # nothing was stored: another connection (or HTTP) cannot continue it
    with c.responses.connect() as conn:
        create(conn, input="x", max_output_tokens=2, previous_response_id=r2.id)
        (err,) = until(conn)
    assert err.type == "error" and err.status == 400 and err.error.code == "previous_response_not_found"


def test_a_stored_turn_continues_from_the_store_and_only_for_its_key(srv):
    with client(srv).responses.connect() as conn:
        create(conn, input="Hi", max_output_tokens=4)
        r1 = until(conn)[-1].response
        assert r1.store is True
    assert client(srv).responses.retrieve(r1.id).id == r1.id
    with client(srv, "b").responses.connect() as conn:  # another key's connection
        create(conn, input="x", max_output_tokens=2, previous_response_id=r1.id)
        (err,) = until(conn)
        assert err.error.code == "previous_response_not_found"
        create(conn, input="x", max_output_tokens=2, model="nope")
        (err,) = until(conn)
        assert (err.status, err.error.code, err.error.param) == (404, "model_not_found", "model")
    with client(srv).responses.connect() as conn:
        create(conn, input="More", max_output_tokens=4, previous_response_id=r1.id)
        r2 = until(conn)[-1].response
    assert r2.previous_response_id == r1.id and [it.id for it in client(srv).responses.input_items.list(r2.id)]


def test_lanes_run_at_once_and_in_order_each(srv):
    with client(srv).responses.connect() as conn:
        for sid in ("a", "b", "a"):
            create(conn, input=f"lane {sid}", max_output_tokens=24, store=False, stream_id=sid)
        events = until(conn, lambda ev, n=[0]: ev.type in FINAL and (n.__setitem__(0, n[0] + 1) or n[0] == 3))
    assert all(ev.stream_id in ("a", "b") for ev in events)
    created = [(ev.stream_id, ev.response.id) for ev in events if ev.type == "response.created"]
    ended = [(ev.stream_id, ev.response.id) for ev in events if ev.type in FINAL]
    assert sorted(sid for sid, _ in created) == ["a", "a", "b"]
    # lane a's second response starts only after its first ended; b ran beside a's first
    a1, a2 = [rid for sid, rid in created if sid == "a"]
    types = [(ev.type, ev.response.id) for ev in events if ev.type in ("response.created", *FINAL)]
    assert types.index(("response.created", a2)) > min(i for i, (t, rid) in enumerate(types) if rid == a1 and
                                                        t in FINAL)
    b = [i for i, (t, rid) in enumerate(types) if rid == created[[s for s, _ in created].index("b")][1]]
    a1_end = next(i for i, (t, rid) in enumerate(types) if rid == a1 and t in FINAL)
    assert b[0] < a1_end  # b was created before a's first ended
    assert len(ended) == 3


def test_a_fork_on_another_lane_waits_for_the_response_it_continues(srv):
    c = client(srv)
    with c.responses.connect() as conn:
        create(conn, input="Tell me a long story.", max_output_tokens=120, store=False, stream_id="a")
        first = until(conn, lambda ev: ev.type == "response.created")[-1].response
        create(conn, input="Shorter.", max_output_tokens=4, store=False, stream_id="b",
               previous_response_id=first.id)
        events = until(conn, lambda ev: ev.type in FINAL and ev.stream_id == "b")
    ended = next(i for i, ev in enumerate(events) if ev.type in FINAL and ev.stream_id == "a")
    fork = next(i for i, ev in enumerate(events) if ev.type == "response.created" and ev.stream_id == "b")
    assert ended < fork  # the fork started once the story had ended
    story, r = events[ended].response, events[-1].response
    history = [{"role": "user", "content": "Tell me a long story."},
               *[it.model_dump(exclude_none=True) for it in story.output], {"role": "user", "content": "Shorter."}]
    assert r.previous_response_id == first.id
    assert r.usage.input_tokens == c.responses.input_tokens.count(model="demo", input=history).input_tokens


def test_generate_false_prefills_a_turn_without_output(srv):
    c = client(srv)
    tools_prompt = dict(instructions="You are a weather bot.", tools=TOOLS)
    with c.responses.connect() as conn:
        create(conn, input="Weather in Oslo?", generate=False, store=False, **tools_prompt)
        created, done = until(conn)
        assert (created.type, done.type) == ("response.created", "response.completed")
        warm = done.response
        assert warm.output == [] and warm.usage.output_tokens == 0
        asked = c.responses.input_tokens.count(model="demo", input="Weather in Oslo?", **tools_prompt)
        assert warm.usage.input_tokens == asked.input_tokens
        create(conn, input="And in Rome?", previous_response_id=warm.id, max_output_tokens=4, store=False,
               **tools_prompt)
        r = until(conn)[-1].response
    assert r.previous_response_id == warm.id
    full = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "user", "content": "And in Rome?"}]
    assert r.usage.input_tokens == c.responses.input_tokens.count(model="demo", input=full, **tools_prompt).input_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 32  # the prefilled prompt's blocks


def test_bad_events_get_error_events_and_the_connection_goes_on(srv):
    with client(srv).responses.connect() as conn:
        conn.send_raw("{not json")
        (err,) = until(conn)
        assert (err.status, err.error.code) == (400, "invalid_json")
        conn.send_raw(json.dumps({"type": "response.cancel"}))
        (err,) = until(conn)
        assert err.error.param == "type" and "response.cancel" in err.error.message
        create(conn, input="x", background=True, stream_id="s")
        (err,) = until(conn)
        assert (err.error.param, err.stream_id) == ("background", "s")
        create(conn, input="x", max_output_tokens=-1)
        (err,) = until(conn)
        assert err.status == 400 and err.error.param == "max_output_tokens"
        create(conn, input=5, previous_response_id="resp_x")
        (err,) = until(conn)
        assert err.status == 400 and err.error.param.startswith("input")
        create(conn, input="x", generate=False, conversation="conv_x")
        (err,) = until(conn)
        assert err.status == 400 and err.error.param == "generate"
        create(conn, input="still here", max_output_tokens=2, store=False)
        assert until(conn)[-1].type in FINAL
    with pytest.raises(Exception, match="401"):
        with client(srv, "wrong").responses.connect() as conn:
            create(conn, input="x")
            until(conn)


def test_a_client_that_goes_away_mid_stream_aborts_its_response(srv):
    story = dict(input="Tell me a long story.", max_output_tokens=300, store=False, seed=5)
    full = client(srv).responses.create(model="demo", **{k: v for k, v in story.items() if k != "seed"},
                                        extra_body={**SHORT, "seed": 5})
    assert full.status == "incomplete"  # left alone, it runs to its cap
    before = srv.wait_idle("demo")["generated_tokens"]
    with client(srv).responses.connect() as conn:
        create(conn, **story)
        until(conn, lambda ev: ev.type == "response.output_text.delta" or ev.type in FINAL)
    stats = srv.wait_idle("demo")
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["generated_tokens"] - before < 150


def test_steering_starts_a_successor_with_the_queued_input(srv):
    c = client(srv)
    with c.responses.connect() as conn:
        create(conn, input="Write a poem.", max_output_tokens=200, store=False, instructions="Be terse.",
               stream_id="main")
        created = until(conn, lambda ev: ev.type == "response.created")[-1].response
        conn.response.steer(previous_response_id=created.id, input="Make it about the sea.")
        conn.response.steer(previous_response_id="resp_unknown", input="x")
        conn.response.steer(previous_response_id=created.id, input=[{"role": "assistant", "content": "x"}])
        events = until(conn, lambda ev: ev.type in FINAL and ev.response.id != created.id)
        conn.response.steer(previous_response_id=created.id, input="late")  # it has ended
        (late,) = until(conn, lambda ev: ev.type.startswith("response.steer"))
    assert late.error.code == "response_already_completed" and late.steer.input == "late"
    kinds = [ev.type for ev in events]
    accepted = [ev for ev in events if ev.type == "response.steer.accepted"]
    failed = {ev.error.code: ev for ev in events if ev.type == "response.steer.failed"}
    assert len(accepted) == 1 and accepted[0].steer.previous_response_id == created.id
    assert accepted[0].stream_id == "main" and set(failed) == {"response_not_found", "invalid_input"}
    assert failed["invalid_input"].steer.input[0]["role"] == "assistant"  # handed back as sent
    first_end = next(i for i, ev in enumerate(events) if ev.type in FINAL)
    successor = next(ev.response for ev in events[first_end:] if ev.type == "response.created")
    assert kinds.count("response.created") == 1 and successor.previous_response_id == created.id
    assert successor.instructions == "Be terse." and events[-1].stream_id == "main"
    first = events[first_end].response
    history = [{"role": "user", "content": "Write a poem."}, *[it.model_dump(exclude_none=True) for it in first.output],
               {"role": "user", "content": "Make it about the sea."}]
    assert events[-1].response.usage.input_tokens == c.responses.input_tokens.count(
        model="demo", input=history, instructions="Be terse.").input_tokens
    with c.responses.connect() as conn:
        conn.response.steer(previous_response_id=created.id, input="late")
        (ev,) = until(conn, lambda ev: ev.type.startswith("response.steer"))
        assert ev.error.code == "response_not_found"  # another connection does not know it


def test_steering_ends_a_response_at_its_next_item_boundary(srv):
    c = client(srv)
    poem = dict(input="Write a poem.", max_output_tokens=300, store=False, reasoning={"effort": "high"},
                max_reasoning_tokens=150, seed=3)
    full = c.responses.create(model="demo", **{k: v for k, v in poem.items() if k not in ("max_reasoning_tokens",
                                                                                           "seed")},
                              extra_body={"max_reasoning_tokens": 150, "seed": 3})
    assert [it.type for it in full.output] == ["reasoning", "message"]  # left alone: it reasons, then answers
    with c.responses.connect() as conn:
        create(conn, **poem)
        created = until(conn, lambda ev: ev.type == "response.created")[-1].response
        conn.response.steer(previous_response_id=created.id, input="Make it rhyme.")
        events = until(conn, lambda ev: ev.type in FINAL and ev.response.id != created.id)
    first = next(ev for ev in events if ev.type in FINAL).response
    assert first.id == created.id and first.status == "incomplete" and first.incomplete_details.reason == "steered"
    assert [it.type for it in first.output] == ["reasoning"] and first.usage is None  # cut after its reasoning
    assert first.output[0].content[0].text == full.output[0].content[0].text
    before_end = events[:next(i for i, ev in enumerate(events) if ev.type in FINAL)]
    assert [ev.type for ev in before_end].count("response.output_item.added") == 1  # the message never started
    successor = events[-1].response
    history = [{"role": "user", "content": "Write a poem."}, first.output[0].model_dump(exclude_none=True),
               {"role": "user", "content": "Make it rhyme."}]
    assert successor.previous_response_id == created.id
    assert successor.usage.input_tokens == c.responses.input_tokens.count(
        model="demo", reasoning={"effort": "high"}, input=history).input_tokens


def test_steering_a_response_that_calls_a_tool_waits_for_its_output(srv):
    c = client(srv)
    call = dict(tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"}, store=False, seed=1)
    with c.responses.connect() as conn:
        create(conn, input="Weather in Paris?", max_output_tokens=120, **call)
        created = until(conn, lambda ev: ev.type == "response.created")[-1].response
        conn.response.steer(previous_response_id=created.id, input="In Celsius, please.")
        events = until(conn, lambda ev: ev.type == "response.steer.pending")
        done = next(ev.response for ev in events if ev.type in FINAL)
        (fc,) = [it for it in done.output if it.type == "function_call"]
        pending = events[-1]
        assert [r.model_dump() for r in pending.required_input] == [
            {"type": "function_call_output", "call_id": fc.call_id, "name": fc.name}]
        assert events.index(pending) > events.index(next(ev for ev in events if ev.type in FINAL))
        output = {"type": "function_call_output", "call_id": fc.call_id, "output": '{"temp_c": 21}'}
        create(conn, input=[output], previous_response_id=done.id, max_output_tokens=4, tools=TOOLS, store=False)
        r = until(conn)[-1].response
    history = [{"role": "user", "content": "Weather in Paris?"},
               *[it.model_dump(exclude_none=True) for it in done.output],
               {"role": "user", "content": "In Celsius, please."}, output]
    assert r.usage.input_tokens == c.responses.input_tokens.count(model="demo", input=history,
                                                                  tools=TOOLS).input_tokens


def test_a_connection_closes_at_its_time_limit_once_its_work_is_done(tiny_ckpt):
    from observability.metrics import BY_NAME, MetricsRecorder
    rec = MetricsRecorder("prometheus")

    def open_now():
        return rec.registry.get_sample_value(BY_NAME["gptoss_websocket_connections"].exported_name(), {})
    with own_server(tiny_ckpt, "demo", EngineConfig(max_model_len=512, num_blocks=64), metrics=rec,
                    websockets=WebSocketConfig(max_minutes=0.05)) as s:  # 3 s
        assert open_now() == 0
        with client(s).responses.connect() as conn:
            create(conn, input="x", max_output_tokens=2, store=False)  # the connection is open once it answers
            until(conn)
            assert open_now() == 1
            create(conn, input="Tell me a long story.", max_output_tokens=120, store=False)
            events = until(conn, lambda ev: False)
            assert events[-2].type in FINAL  # the running response finished first
            assert events[-1].error.code == "websocket_connection_limit_reached"
            t0 = time.time()
            with pytest.raises(Exception):
                until(conn)  # then the server closes it
            assert time.time() - t0 < 10
        t0 = time.time()
        while open_now() and time.time() - t0 < 10:
            time.sleep(0.05)
        assert open_now() == 0
    with own_server(tiny_ckpt, "demo", EngineConfig(max_model_len=512, num_blocks=64),
                    websockets=WebSocketConfig(max_minutes=0)) as s:  # off: no WebSocket route
        with pytest.raises(Exception):
            with client(s).responses.connect() as conn:
                create(conn, input="x")
                until(conn)
    assert threading.active_count() < 50


def test_a_response_that_fails_mid_stream_fails_its_steering_and_the_connection_goes_on(api):
    flaky = api.engines["flaky"].engine
    flaky.fail_after = 12
    try:
        with api.client().responses.connect() as conn:
            create(conn, model="flaky", input="Write a poem.", max_output_tokens=200, store=False,
                   max_reasoning_tokens=0)  # one message item: no boundary to end at before the failure
            created = until(conn, lambda ev: ev.type == "response.created")[-1].response
            conn.response.steer(previous_response_id=created.id, input="Shorter.")
            events = []
            for ev in conn:
                events.append(ev)
                if ev.type == "response.steer.failed":
                    break
            flaky.fail_after = None
            create(conn, input="Still there?", max_output_tokens=2, store=False)
            assert until(conn)[-1].type in FINAL
    finally:
        flaky.fail_after = None
    kinds = [ev.type for ev in events]
    assert "response.steer.accepted" in kinds and ("error" in kinds or "response.failed" in kinds)
    assert events[-1].error.code == "response_not_active" and events[-1].steer.input == "Shorter."
    assert kinds.index("response.steer.failed") > max(i for i, k in enumerate(kinds) if k in ("error", *FINAL))
