"""/v1/completions (raw prompts, no chat template), /v1/models, /health, /ready, /openapi.json."""

import httpx


def test_completion_non_streaming(client):
    r = client.completions.create(model="demo", prompt="The capital of France is", max_tokens=8, seed=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "demo"
    [c] = r.choices
    assert c.index == 0 and c.finish_reason == "length" and isinstance(c.text, str)
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 5
    assert r.usage.total_tokens == 13


def test_completion_prompt_list_and_echo(client):
    r = client.completions.create(model="demo", prompt=["Hello", "Goodbye, cruel"], n=2, max_tokens=4, echo=True,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text.startswith("Hello") for c in r.choices[:2])
    assert all(c.text.startswith("Goodbye, cruel") for c in r.choices[2:])
    assert r.usage.completion_tokens == 16


def test_completion_streaming(client):
    chunks = list(client.completions.create(model="demo", prompt=[1000, 2000, 3000], max_tokens=6, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 6 and usage.usage.prompt_tokens == 3
    body = chunks[:-1]
    assert all(ch.object == "text_completion" and ch.id == body[0].id for ch in body)
    assert body[-1].choices[0].finish_reason == "length"
    ref = client.completions.create(model="demo", prompt=[1000, 2000, 3000], max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    greedy = list(client.completions.create(model="demo", prompt=[1000, 2000, 3000], max_tokens=6,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in greedy) == ref.choices[0].text


def test_completion_streaming_several_prompts(client):
    """Two engine requests merged into one stream; choices keep their indices."""
    chunks = list(client.completions.create(model="demo", prompt=["One", "Two three"], n=2, max_tokens=5,
                                            stream=True, temperature=0, extra_body={"ignore_eos": True}))
    texts, finish = {}, {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "length", 1: "length", 2: "length", 3: "length"}
    ref = client.completions.create(model="demo", prompt=["One", "Two three"], n=2, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [texts[i] for i in range(4)] == [c.text for c in ref.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: both choices of a prompt agree


def test_models_health_ready(api, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["demo", "demo-b", "limited", "flaky", "dropping", "overloaded", "down"]
    assert client.models.retrieve("demo-b").id == "demo-b"
    assert httpx.get(f"{api.url}/health").status_code == 200
    assert httpx.get(f"{api.url}/ready").status_code == 200
    api.ready_state["ready"] = False
    try:
        r = httpx.get(f"{api.url}/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    finally:
        api.ready_state["ready"] = True


def test_openapi_describes_the_endpoints(api):
    spec = httpx.get(f"{api.url}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health", "/ready"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "ResponsesRequest", "ErrorResponse"):
        assert name in schemas, name
    chat = schemas["ChatCompletionRequest"]["properties"]
    for field in ("messages", "tools", "tool_choice", "response_format", "reasoning_effort", "max_reasoning_tokens",
                  "stream_options", "logprobs", "top_logprobs", "max_completion_tokens"):
        assert field in chat, field
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ChatCompletionRequest")
