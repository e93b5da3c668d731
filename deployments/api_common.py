"""Pieces every endpoint shares: the OpenAI error type, ids, sampling parameters,
token strings for logprobs, SSE framing and usage blocks."""

from __future__ import annotations

import functools
import json
import math
import re
import secrets
import time
from typing import Any, Optional

from pydantic import ValidationError

from engine.request import SERVICE_TIERS, RequestOutput, Usage
from engine.sampler import SamplingParams

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error the client gets as OpenAI error JSON: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_fields(err: APIError) -> dict:
    """A Responses stream's `error` event fields. They also carry OpenAI's {"error": {...}} object, so SDK
    clients raise instead of ending quietly."""
    return dict(code=err.code, message=err.message, param=err.param, error=err.body()["error"])


# A JSON \u escape of a UTF-16 surrogate: JSON allows a lone one, Unicode text does not.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(v: Any, path: str) -> Optional[str]:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(v, dict):
        for k, x in v.items():
            found = _lone_surrogate(k, path or "body") or _lone_surrogate(x, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(v, list):
        for i, x in enumerate(v):
            found = _lone_surrogate(x, f"{path}[{i}]")
            if found:
                return found
    return None


def check_unicode(raw: bytes) -> None:
    """Refuse a body whose strings hold a lone surrogate escape ("\\ud800"): the harmony
    encoder and the grammar compiler would otherwise fail on it deep inside, with a
    message about their own JSON. A byte scan keeps this free for ordinary bodies."""
    if not _SURROGATE_ESCAPE.search(raw):
        return
    try:
        where = _lone_surrogate(json.loads(raw), "")
    except ValueError:
        return  # not JSON: the body's own validation says so
    if where is not None:
        raise APIError(400, f"{where}: holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair), "
                            "which is not valid Unicode text", param=where, code="invalid_value")


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "none"}  # a plain union's member, after the field
# a tagged union's member, after a list index (Responses input items); elsewhere they are field names
# (ResponsesRequest.reasoning)
_ITEM_TAGS = {"message", "function_call", "function_call_output", "reasoning"}


def loc_to_param(loc) -> Optional[str]:
    """pydantic error location -> OpenAI `param` ("messages[0].content"); union member
    and discriminator tags that pydantic puts in locations are left out."""
    out, prev = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("body", "query", "path") and prev is None:  # where FastAPI found it, not its name
            pass
        elif prev == "query" and isinstance(part, str) and part.endswith("[]"):  # an array, as the SDK sends it
            out += part[:-2]
        elif isinstance(part, str) and not any(c in part for c in "[]'(),") and part not in _TYPE_TAGS \
                and not (part in _ITEM_TAGS and isinstance(prev, int)) \
                and not part[:1].isupper():  # model class names of union members
            out += f".{part}" if out else part
        prev = part
    return out or None


def _member(err: dict) -> Optional[tuple]:
    """The location of the union member (a model class name in the path) an error is in, if any."""
    loc = tuple(err.get("loc", ()))
    for i, part in enumerate(loc):
        if isinstance(part, str) and part[:1].isupper():
            return loc[:i + 1]
    return None


def describe_errors(errors: list) -> tuple[Optional[str], str]:
    """(param, message) of the most specific pydantic error: for a union, the branch
    that got furthest says more than "Input should be a valid string"."""
    # Of a union's members, those whose `type` tag did not match are not what the client meant, when
    # one whose tag matched failed on a field of its own.
    missed = {tuple(e["loc"][:-1]) for e in errors
              if e.get("loc") and e["loc"][-1] == "type" and e.get("type") == "literal_error"}
    members = [(_member(e), e) for e in errors]
    if any(m is not None and m not in missed for m, _ in members):
        errors = [e for m, e in members if m is None or m not in missed]
    err = max(errors, key=lambda x: len(x.get("loc", ()))) if errors else {}
    param = loc_to_param(err.get("loc", ()))
    return param, err.get("msg", "invalid request").removeprefix("Value error, ")  # a validator's own words


def validation_error(e: ValidationError) -> APIError:
    param, msg = describe_errors(e.errors())
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def sampling_params(*, temperature=None, top_p=None, top_k=None, min_p=None, repetition_penalty=None,
                    frequency_penalty=None, presence_penalty=None, logit_bias=None, seed=None, stop=None,
                    max_tokens=None, n=1, logprobs=False, top_logprobs=None, ignore_eos=False) -> SamplingParams:
    kw: dict[str, Any] = dict(
        temperature=1.0 if temperature is None else temperature,
        # top_p=0 means "only the most likely token"; the sampler needs p > 0.
        top_p=1.0 if top_p is None else max(top_p, 1e-9),
        top_k=top_k or 0, min_p=min_p or 0.0,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        frequency_penalty=frequency_penalty or 0.0, presence_penalty=presence_penalty or 0.0,
        logit_bias={int(k): float(v) for k, v in (logit_bias or {}).items()},
        seed=seed, stop=stop or [], max_tokens=max_tokens, n=n, logprobs=bool(logprobs),
        top_logprobs=top_logprobs or 0, ignore_eos=ignore_eos)
    try:
        return SamplingParams(**kw)
    except ValidationError as e:
        raise validation_error(e) from None


# ------------------------------------------------------------------------ tokens


@functools.lru_cache(maxsize=65536)
def token_bytes(token_id: int) -> bytes:
    from engine.harmony import get_encoding
    enc = get_encoding()
    try:
        return bytes(enc._inner.decode_bytes([int(token_id)]))
    except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode
        try:
            return enc.decode([int(token_id)]).encode()
        except Exception:  # noqa: BLE001
            return f"<|token_{token_id}|>".encode()


def token_str(token_id: int) -> str:
    b = token_bytes(token_id)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:  # part of a multi-byte character: OpenAI's "bytes:" notation
        return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


def finite(lp: float) -> float:
    return lp if math.isfinite(lp) else -9999.0


def chat_logprob(entry: dict) -> dict:
    """Engine logprob entry {"token", "logprob", "top"} -> OpenAI chat logprob content item."""
    tid = entry["token"]
    return {"token": token_str(tid), "logprob": finite(entry["logprob"]), "bytes": list(token_bytes(tid)),
            "top_logprobs": [{"token": token_str(t), "logprob": finite(lp), "bytes": list(token_bytes(t))}
                             for t, lp in entry.get("top") or []]}


def answer_logprobs(out: RequestOutput) -> list[dict]:
    """The logprobs of an output's answer tokens, the only ones OpenAI's content logprobs hold: not harmony
    headers, reasoning or tool-call arguments (the engine's parser marks each token)."""
    return [chat_logprob(e) for e in out.logprobs if e.get("answer")]


# --------------------------------------------------------------------- framing


def sse(data: Any, event: Optional[str] = None) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class UsageTotals:
    """Usage over the choices of one or more engine requests."""

    def __init__(self) -> None:
        self.prompt = self.completion = self.reasoning = self.cached = 0
        self.accepted = self.rejected = 0  # prediction tokens (chat `prediction`)

    def add_prompt(self, n_tokens: int) -> None:
        self.prompt += n_tokens

    def add_choice(self, usage: Optional[Usage], tokens_seen: int, first_of_prompt: bool) -> None:
        """`first_of_prompt`: the choice whose usage speaks for its prompt's cache hits."""
        self.completion += usage.completion_tokens if usage else tokens_seen
        self.reasoning += usage.reasoning_tokens if usage else 0
        if usage:
            self.accepted += usage.accepted_prediction_tokens
            self.rejected += usage.rejected_prediction_tokens
        if first_of_prompt and usage:
            self.cached += usage.cached_tokens

    def chat(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion,
                "prompt_tokens_details": {"cached_tokens": self.cached},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning,
                                              "accepted_prediction_tokens": self.accepted,
                                              "rejected_prediction_tokens": self.rejected}}

    def responses(self) -> dict:
        return {"input_tokens": self.prompt, "input_tokens_details": {"cached_tokens": self.cached},
                "output_tokens": self.completion, "output_tokens_details": {"reasoning_tokens": self.reasoning},
                "total_tokens": self.prompt + self.completion}


def engine_failure(out) -> APIError:
    """A choice that ended with finish_reason "error" (the engine failed under it)."""
    return APIError(503, f"the engine failed while generating: {out.error or 'unknown error'}",
                    code="engine_error")


def service_tier(requested: Optional[str]) -> str:
    """The tier a request runs on: fast is priority (OpenAI's fast mode); auto, scale and none run as default
    (the response names it, as OpenAI's)."""
    if requested == "fast":
        return "priority"
    return requested if requested in SERVICE_TIERS else "default"


def tier_priority(requested: Optional[str]) -> int:
    return SERVICE_TIERS[service_tier(requested)]


def stream_chunk(rid: str, obj: str, created: int, body, fingerprint: Optional[str], choices: list[dict],
                 usage=None) -> str:
    """One SSE chunk of a chat or text completion stream (usage only when the client asked)."""
    d = {"id": rid, "object": obj, "created": created, "model": body.model,
         "system_fingerprint": fingerprint, "service_tier": service_tier(body.service_tier), "choices": choices}
    if body.stream_options and body.stream_options.include_usage:
        d["usage"] = usage
    return sse(d)


class ChoiceState:
    """Where one choice of a chat or text completion stands: its finish reason once it has one, the engine's
    usage for it, the tokens it has seen."""

    def __init__(self, index: int):
        self.index = index
        self.finish_reason: Optional[str] = None
        self.usage = None
        self.tokens_seen = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class ChoicesHandler:
    """What the chat and text completion handlers share: a body, choices that say when they are done, and
    a stream's chunks, its end (usage when asked, [DONE]) and its error events."""

    chunk_object: str

    @property
    def stream_requested(self) -> bool:
        return self.body.stream

    def _check_complete(self) -> None:
        if not all(c.done for c in self.choices):
            raise APIError(503, "the engine ended the request before it finished", code="engine_error")

    def _chunk(self, choices: list[dict], usage=None) -> str:
        return stream_chunk(self.id, self.chunk_object, self.created, self.body, self.fingerprint, choices, usage)

    def _stream_end(self) -> list[str]:
        self._check_complete()
        usage = self.body.stream_options and self.body.stream_options.include_usage
        return ([self._chunk([], self.usage.chat())] if usage else []) + [SSE_DONE]

    def error_events(self, err: APIError) -> list[str]:
        return [sse(err.body()), SSE_DONE]


def parse_api_keys(text: str) -> dict[str, str]:
    """Comma-separated keys, each `key` or `key:<tier>` (priority, default or flex): key -> the highest service
    tier its requests run on (a request asking for more runs on that tier, and its response says so)."""
    out = {}
    for entry in (e.strip() for e in text.split(",")):
        key, _, tier = entry.rpartition(":")
        if tier not in SERVICE_TIERS:  # no tier: the whole entry is the key
            key, tier = entry, "priority"
        if key:
            out[key] = tier
    return out


def api_keys_from_env(var: str = "GPTOSS_API_KEYS") -> dict[str, str]:
    """parse_api_keys of the env var (the helm chart fills it from its Secret); empty: no auth."""
    import os
    return parse_api_keys(os.environ.get(var, ""))


def cap_tier(body, requests: list, tier: str) -> None:
    """Runs a request on `tier` at most (its API key's): its engine requests' priority, and the tier its
    response names."""
    cap = SERVICE_TIERS[tier]
    if tier_priority(body.service_tier) < cap:
        body.service_tier = tier
    for r in requests:
        r.priority = max(r.priority, cap)


def who(request) -> Optional[str]:
    """Whose a request's stored objects are: its API key's digest (BearerAuth's `principal`; None without keys).
    Each key sees only its own files, batches, responses, conversations and chat completions."""
    return getattr(request.state, "principal", None)


def principal(key: str) -> str:
    """Whose an object is (uploaded files, batches): a digest of the API key, never the key itself, so a
    store that writes it to disk keeps no secret."""
    import hashlib
    return hashlib.sha256(key.encode()).hexdigest()[:24]


_KEYED = frozenset({"/tokenize", "/detokenize"})  # outside /v1/ (vLLM's paths), still the API's work
PRINCIPAL_HEADER = "x-gptoss-principal"  # whose a loopback request is (a batch's line): heard from internal keys only


async def _unauthorized(scope, receive, send) -> None:
    """401 with OpenAI's error JSON; a WebSocket upgrade gets it too where the server can answer one with a
    response (ASGI's websocket.http.response), and is refused (403) where not."""
    import json
    body = json.dumps(APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                               code="invalid_api_key").body()).encode()
    start = {"status": 401, "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]}
    if scope["type"] == "http":
        await send({"type": "http.response.start", **start})
        return await send({"type": "http.response.body", "body": body})
    await receive()  # websocket.connect
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send({"type": "websocket.http.response.start", **start})
        return await send({"type": "websocket.http.response.body", "body": body})
    await send({"type": "websocket.close", "code": 1008})


class BearerAuth:
    """ASGI middleware: /v1/*, /tokenize and /detokenize need `Authorization: Bearer <one of keys>`; /health
    and /ready stay open for probes. Constant-time comparison, so a key cannot be guessed byte by byte from
    timings."""

    def __init__(self, app, keys: dict[str, str], internal: frozenset = frozenset()):
        """keys: key -> the highest service tier its requests run on (parse_api_keys); the request's scope
        state carries it as `tier_cap`, and the key's digest as `principal`. internal: the app's own keys
        among them (a batch's lines), whose requests act for the principal their PRINCIPAL_HEADER names."""
        self.app, self.keys = app, [(k.encode(), tier, k in internal) for k, tier in keys.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and (scope["path"].startswith("/v1/") or scope["path"] in _KEYED):
            headers = dict(scope.get("headers") or [])
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            tier, internal = next(((t, i) for k, t, i in self.keys if secrets.compare_digest(token.strip(), k)),
                                  (None, False))
            if scheme.lower() != b"bearer" or tier is None:
                return await _unauthorized(scope, receive, send)
            state = scope.setdefault("state", {})
            state["tier_cap"] = tier
            state["principal"] = (headers.get(PRINCIPAL_HEADER.encode(), b"").decode() or None) if internal \
                else principal(token.strip().decode())
        await self.app(scope, receive, send)
