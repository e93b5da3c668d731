"""Stored prompts (Responses' `prompt`) through the openai SDK, on a server given two templates: a response
naming one starts from the same tokens as one that sends the filled-in text itself."""

import openai
import pytest

from .conftest import own_server

PROMPTS = [
    {"id": "support", "instructions": "You answer questions about {{product}}.",
     "input": [{"role": "user", "content": "My account is {{ account }}."}]},
    {"id": "support", "version": "2", "instructions": "Be brief about {{product}}."},
]


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    from cluster.config import ServeConfig
    from deployments.response_store import MemoryResponseStore
    from engine.core import EngineConfig
    templates = ServeConfig(prompts=PROMPTS).prompts  # as `gptoss serve --prompts` and the helm values give them
    with own_server(tiny_ckpt, "m", EngineConfig(max_model_len=1024, num_blocks=128), prompts=templates,
                    response_store=MemoryResponseStore(max_entries=16)) as srv:
        yield srv


def test_a_stored_prompt_is_its_filled_in_text(server):
    client = server.client()
    kw = dict(model="m", max_output_tokens=16, store=False)
    r = client.responses.create(input="Where is my order?", instructions="Answer in French.",
                                prompt={"id": "support", "version": "1",
                                        "variables": {"product": "gizmos", "account": {"type": "input_text",
                                                                                       "text": "A-17"}}}, **kw)
    same = client.responses.create(
        instructions="You answer questions about gizmos.\n\nAnswer in French.",
        input=[{"role": "user", "content": "My account is A-17."},
               {"role": "user", "content": "Where is my order?"}],
        **kw)
    assert r.usage.input_tokens == same.usage.input_tokens
    assert r.prompt.id == "support" and r.prompt.version == "1"
    assert r.instructions == "You answer questions about gizmos.\n\nAnswer in French."
    counted = client.responses.input_tokens.count(model="m", input="Where is my order?",
                                                  instructions="Answer in French.",
                                                  extra_body={"prompt": {"id": "support", "version": "1", "variables": {
                                                      "product": "gizmos", "account": "A-17"}}})
    assert counted.input_tokens == r.usage.input_tokens
    # no version: the one listed last
    latest = client.responses.create(input="Hi", prompt={"id": "support", "variables": {"product": "gizmos"}}, **kw)
    v2 = client.responses.create(input="Hi", instructions="Be brief about gizmos.", **kw)
    assert latest.usage.input_tokens == v2.usage.input_tokens and latest.prompt.version is None


def test_a_prompt_it_cannot_fill_is_refused_naming_what(server):
    client = server.client()
    cases = [({"id": "nope"}, openai.NotFoundError, "prompt.id"),
             ({"id": "support", "version": "9", "variables": {"product": "x"}}, openai.NotFoundError,
              "prompt.version"),
             ({"id": "support", "version": "1", "variables": {"product": "x"}}, openai.BadRequestError,
              "prompt.variables"),  # account missing
             ({"id": "support", "variables": {"product": "x", "prodcut": "y"}}, openai.BadRequestError,
              "prompt.variables")]  # a typo is not silently ignored
    messages = []
    for prompt, err, param in cases:
        with pytest.raises(err) as e:
            client.responses.create(model="m", input="Hi", prompt=prompt, max_output_tokens=4)
        assert e.value.body["param"] == param, prompt
        messages.append(e.value.body["message"])
    assert "missing account" in messages[2] and "prodcut" in messages[3]


def test_truncation_keeps_a_stored_prompts_messages(server):
    """truncation="auto" drops the conversation's oldest turns, never the template's messages before them
    (its user message here): the response is the longest tail of whole turns that fits after them."""
    from deployments.protocol import ResponsesRequest
    from deployments.responses_api import ResponseBuilder

    from .test_conversations import _turns
    client = server.client()
    items = [*_turns(8), {"role": "user", "content": "Which turn?"}]
    prompt = {"id": "support", "version": "1", "variables": {"product": "gizmos", "account": "A-17"}}
    r = client.responses.create(model="m", input=items, prompt=prompt, truncation="auto", max_output_tokens=16,
                                store=False, extra_body={"max_reasoning_tokens": 0})
    template = {"role": "user", "content": "My account is A-17."}

    def prompt_len(kept: list[dict]) -> int:
        req = ResponsesRequest(model="m", input=kept, instructions="You answer questions about gizmos.")
        return len(ResponseBuilder(req).requests[0].prompt_ids)
    tails = [[template, *items[2 * k:]] for k in range(9)]
    fitting = [prompt_len(t) for t in tails if prompt_len(t) + 16 <= 1024]
    assert prompt_len(tails[0]) + 16 > 1024 and r.usage.input_tokens == fitting[0]
