"""POST /tokenize and /detokenize (vLLM's shape): a chat counts the tokens /v1/chat/completions reports as its
prompt, a raw prompt the tokens /v1/completions does, and ids come back as the text they were."""

import httpx

from .helpers import CHAT_TOOLS

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris? 日本"}]


def test_a_chat_counts_what_chat_completions_reports(client, api):
    r = client.chat.completions.create(model="demo", messages=MSGS, tools=CHAT_TOOLS, reasoning_effort="high",
                                       max_tokens=1)
    got = httpx.post(f"{api.url}/tokenize", json={"model": "demo", "messages": MSGS, "tools": CHAT_TOOLS,
                                                  "reasoning_effort": "high"}).json()
    assert got["count"] == len(got["tokens"]) == r.usage.prompt_tokens
    fewer = httpx.post(f"{api.url}/tokenize", json={"messages": MSGS}).json()  # no tools, default effort
    assert fewer["count"] < got["count"]
    back = httpx.post(f"{api.url}/detokenize", json={"tokens": got["tokens"]}).json()["prompt"]
    assert "Weather in Paris? 日本" in back and "get_weather" in back and back.startswith("<|start|>system")


def test_a_raw_prompt_counts_what_completions_reports(client, api):
    text = "Once upon a time <|start|>"
    c = client.completions.create(model="demo", prompt=text, max_tokens=1)
    got = httpx.post(f"{api.url}/tokenize", json={"prompt": text}).json()
    assert got["count"] == c.usage.prompt_tokens
    assert httpx.post(f"{api.url}/detokenize", json={"tokens": got["tokens"]}).json() == {"prompt": text}


def test_bad_requests_name_the_field(api):
    for path, body, param in [("/tokenize", {"prompt": "x", "messages": MSGS}, None),
                              ("/tokenize", {}, None),
                              ("/tokenize", {"prompt": "x", "model": "nope"}, "model"),
                              ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
                              ("/detokenize", {"tokens": [5, 10**7]}, "tokens"),
                              ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens")]:
        r = httpx.post(f"{api.url}{path}", json=body)
        assert r.status_code in (400, 404), (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param, (body, err)
        if param is None:
            assert "exactly one of `prompt` and `messages`" in err["message"]
