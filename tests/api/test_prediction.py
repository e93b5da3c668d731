"""Predicted Outputs through the openai SDK: `prediction` never changes what comes back, only how many tokens a
step makes; usage counts the accepted and rejected prediction tokens."""

import openai
import pytest

HI = [{"role": "user", "content": "Write a short poem."}]
GREEDY = {"temperature": 0, "max_completion_tokens": 60}


def details(r):
    d = r.usage.completion_tokens_details
    return d.accepted_prediction_tokens, d.rejected_prediction_tokens


def answer(client, **kw):
    """A greedy answer with some content (the random model may close the turn at once: try seeds)."""
    for effort in ("low", "medium", "high"):
        r = client.chat.completions.create(model="demo", messages=HI, reasoning_effort=effort,
                                           extra_body={"max_reasoning_tokens": 8}, **GREEDY, **kw)
        if len(r.choices[0].message.content or "") > 20:
            return r, effort
    pytest.fail("no greedy answer with content")


def test_chat_with_its_own_answer_as_prediction(client):
    r, effort = answer(client)
    text = r.choices[0].message.content
    assert details(r) == (0, 0)
    kw = dict(model="demo", messages=HI, reasoning_effort=effort, extra_body={"max_reasoning_tokens": 8}, **GREEDY)
    p = client.chat.completions.create(prediction={"type": "content", "content": text}, **kw)
    assert p.choices[0].message.content == text and p.choices[0].finish_reason == r.choices[0].finish_reason
    assert p.usage.completion_tokens == r.usage.completion_tokens
    accepted, rejected = details(p)
    assert accepted >= len(text) // 8 and rejected <= accepted
    # streamed, with the prediction as content parts and edited in the middle
    edited = text[:len(text) // 2] + " (an edit) " + text[len(text) // 2:]
    chunks = list(client.chat.completions.create(
        prediction={"type": "content", "content": [{"type": "text", "text": edited}]}, stream=True,
        stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert details(chunks[-1])[0] > 0


def test_completions_take_a_prediction_too(client):
    kw = dict(model="demo", prompt="Once upon a time", max_tokens=40, temperature=0,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    text = r.choices[0].text
    kw["extra_body"] = {"ignore_eos": True, "prediction": {"type": "content", "content": text}}
    p = client.completions.create(**kw)
    assert p.choices[0].text == text
    assert p.usage.completion_tokens_details.accepted_prediction_tokens > 20
    s = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert s == text


def test_a_malformed_prediction_is_a_400_naming_it(client):
    for bad in ({"type": "text", "content": "x"}, {"type": "content"}, "just a string",
                {"type": "content", "content": "word " * 2000}):  # longer than the model's context
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="demo", messages=HI, prediction=bad, max_tokens=2)
        assert e.value.body["param"].startswith("prediction"), bad
