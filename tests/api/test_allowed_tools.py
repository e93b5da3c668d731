"""tool_choice allowed_tools (chat and Responses, through the openai SDK): only the allowed tools are called,
and the prompt is the one every tool gives, so a conversation narrowing its tools keeps its cached prefix."""

import openai
import pytest

from .helpers import CHAT_TOOLS
from .test_responses import SHORT, TOOLS

Q = [{"role": "user", "content": "Weather in Paris, and the time?"}]


def test_chat_calls_only_the_allowed_tools_with_the_full_prompt(client):
    every = client.chat.completions.create(model="demo", messages=Q, tools=CHAT_TOOLS, tool_choice="required",
                                           max_tokens=1, extra_body=SHORT)
    names = set()
    for seed in range(6):
        r = client.chat.completions.create(
            model="demo", messages=Q, tools=CHAT_TOOLS, max_tokens=120, seed=seed, extra_body=SHORT,
            tool_choice={"type": "allowed_tools", "allowed_tools": {
                "mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]}})
        calls = r.choices[0].message.tool_calls or []
        assert r.choices[0].finish_reason != "tool_calls" or calls
        names |= {c.function.name for c in calls}
        assert r.usage.prompt_tokens == every.usage.prompt_tokens  # both tools are still in the prompt
    assert names == {"get_time"}


def test_responses_calls_only_the_allowed_tools_with_the_full_prompt(client):
    names = set()
    for seed in range(6):
        r = client.responses.create(model="demo", input="Weather in Paris, and the time?", tools=TOOLS,
                                    max_output_tokens=120, extra_body={**SHORT, "seed": seed},
                                    tool_choice={"type": "allowed_tools", "mode": "required",
                                                 "tools": [{"type": "function", "name": "get_weather"}]})
        names |= {it.name for it in r.output if it.type == "function_call"}
        assert r.tool_choice.type == "allowed_tools" and r.tool_choice.mode == "required"
    assert names == {"get_weather"}
    assert client.responses.input_tokens.count(
        input="Weather in Paris, and the time?", tools=TOOLS,
        tool_choice={"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "get_time"}]}
    ).input_tokens == r.usage.input_tokens


def test_an_allowed_tool_that_is_not_in_tools_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=Q, tools=CHAT_TOOLS, max_tokens=4, tool_choice={
            "type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
                {"type": "function", "function": {"name": "nope"}}]}})
    assert e.value.body["param"] == "tool_choice" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="demo", input="x", tools=TOOLS, max_output_tokens=4, tool_choice={
            "type": "allowed_tools", "mode": "sometimes", "tools": [{"type": "function", "name": "get_time"}]})
    assert e.value.body["param"].startswith("tool_choice")
