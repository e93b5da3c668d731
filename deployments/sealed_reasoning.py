"""`include: ["reasoning.encrypted_content"]`: a reasoning item's text, sealed for the client to send back.

A client that stores nothing (store: false, or a server without a store) keeps the conversation itself, and
gpt-oss needs the reasoning of a turn that is still calling tools. Such clients (Codex, the Agents SDK) send
reasoning items back with only their `encrypted_content`, as OpenAI's models give them. The seal is Fernet
(AES-128-CBC with an HMAC-SHA256), so what comes back is text this server wrote, unaltered.

The key: env GPTOSS_REASONING_KEY (a Fernet key; `gptoss reasoning-key` prints a new one; the helm chart fills
it from its Secret), the same on every ingress replica so any of them opens what another sealed. Without it,
the app makes one when it is built: sealed content then outlives neither the app nor a redeploy.
"""

from __future__ import annotations

import json
import os
from typing import AsyncIterator, Optional

from cryptography.fernet import Fernet, InvalidToken

from .api_common import APIError, sse

ENV = "GPTOSS_REASONING_KEY"


def new_key() -> str:
    return Fernet.generate_key().decode()


def key_from_env() -> Optional[str]:
    """The key from GPTOSS_REASONING_KEY; None when unset. A malformed key is an error here, at start, not
    a 400 on every request later."""
    key = os.environ.get(ENV, "").strip()
    if not key:
        return None
    check_key(key)
    return key


def check_key(key: str) -> None:
    try:
        Fernet(key.encode())
    except (ValueError, TypeError):
        raise ValueError(f"{ENV} is not a Fernet key (32 url-safe base64-encoded bytes); "
                         "make one with `gptoss reasoning-key`") from None


class ReasoningSeal:
    def __init__(self, key: Optional[str] = None):
        self._f = Fernet((key or new_key()).encode())

    def seal(self, text: str) -> str:
        return self._f.encrypt(text.encode()).decode()

    def seal_items(self, items: list[dict]) -> list[dict]:
        """Output items with each reasoning item's text sealed (those sealed already stay as they are)."""
        return [{**it, "encrypted_content": self.seal("".join(p["text"] for p in it.get("content") or []))}
                if it["type"] == "reasoning" and not it.get("encrypted_content") else it for it in items]

    def seal_event(self, event: str) -> str:
        """A stored stream's SSE event with its reasoning items sealed: the finished item
        (`response.output_item.done`) and the Response object's output (`response.completed` and the
        other ends), as a stream created with `include` has them."""
        if '"reasoning"' not in event:
            return event
        head, _, data = event.partition("data: ")
        ev = json.loads(data)
        if ev.get("type") == "response.output_item.done":
            ev["item"] = self.seal_items([ev["item"]])[0]
        elif isinstance(ev.get("response"), dict) and ev["response"].get("output"):
            ev["response"] = {**ev["response"], "output": self.seal_items(ev["response"]["output"])}
        return sse(ev, head[len("event: "):].strip() or None)

    async def seal_events(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        async for ev in events:
            yield self.seal_event(ev)

    def open(self, token: str, item_id: Optional[str], kind: str = "reasoning") -> str:
        try:
            return self._f.decrypt(token.encode()).decode()
        except (InvalidToken, ValueError, UnicodeDecodeError):
            # OpenAI's code for the same case; most often the key changed (a restart without GPTOSS_REASONING_KEY)
            raise APIError(400, f"the encrypted content of {kind} item {item_id or '(no id)'} could not be "
                                "verified: it was sealed with another key or altered", param="input",
                           code="invalid_encrypted_content") from None
