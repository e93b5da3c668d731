"""POST /v1/responses/input_tokens through the openai SDK (`responses.input_tokens.count`): the count is
the usage.input_tokens the same response reports, stored history included."""

import openai
import pytest

from .test_responses import SHORT, TOOLS


def _count(client, **kw) -> int:
    r = client.responses.input_tokens.count(**kw)
    assert r.object == "response.input_tokens"
    return r.input_tokens


def test_the_count_is_the_responses_input_tokens(client):
    shape = dict(input="Weather in Paris?", instructions="Be brief.", tools=TOOLS, reasoning={"effort": "high"})
    r = client.responses.create(model="demo", max_output_tokens=4, extra_body=SHORT, **shape)
    assert _count(client, model="demo", **shape) == r.usage.input_tokens
    assert _count(client, **shape) == r.usage.input_tokens  # model may be left out
    assert _count(client, input="Weather in Paris?") < r.usage.input_tokens  # tools and instructions count

    # history: previous_response_id and conversation count as the response would
    nxt = client.responses.create(model="demo", previous_response_id=r.id, input="And Rome?", max_output_tokens=4,
                                  extra_body=SHORT)
    assert _count(client, previous_response_id=r.id, input="And Rome?") == nxt.usage.input_tokens
    conv = client.conversations.create(items=[{"role": "user", "content": "Hello there"}])
    inc = client.responses.create(model="demo", conversation=conv.id, input="Hi again", max_output_tokens=4,
                                  extra_body=SHORT)
    conv_count = _count(client, conversation=conv.id, input="Next")
    assert conv_count > _count(client, input="Hello there") and conv_count > inc.usage.input_tokens


def test_bad_requests(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.input_tokens.count(model="nope", input="x")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.input_tokens.count(input="x", previous_response_id="resp_never")
    assert e.value.body["code"] == "previous_response_not_found"
