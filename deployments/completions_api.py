"""POST /v1/completions: raw text in (no chat template, no harmony parsing, no grammar),
decoded text out. A list of prompts becomes one engine request per prompt; choice
index = prompt index * n + choice."""

from __future__ import annotations

from typing import AsyncIterator, Optional

from engine import harmony
from engine.request import GenerateRequest, RequestOutput

from .api_common import (APIError, ChoicesHandler, ChoiceState, UsageTotals, engine_failure, finite, new_id, now,
                         sampling_params, service_tier, tier_priority, token_str)
from .chat_api import text_of
from .protocol import CompletionRequest


def _prompts(prompt) -> list[tuple[str, list[int]]]:
    """-> [(prompt text, prompt token ids)]."""
    single = isinstance(prompt, str) or (bool(prompt) and all(isinstance(p, int) for p in prompt))
    prompts = [prompt] if single else prompt
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    out = []
    for i, p in enumerate(prompts):
        where = "prompt" if single else f"prompt[{i}]"
        if isinstance(p, str):
            out.append((p, harmony.render_raw(p)))
        else:
            try:
                out.append((harmony.decode(p), list(p)))
            except Exception:  # noqa: BLE001 - ids outside the vocabulary
                raise APIError(400, f"{where} holds token ids outside the vocabulary", param="prompt",
                               code="invalid_value") from None
        if not out[-1][1]:  # the engine would refuse it too, without saying which prompt
            raise APIError(400, f"{where} is empty: it has no tokens", param="prompt", code="invalid_value")
    return out


class _Choice(ChoiceState):
    def __init__(self, index: int, prefix: str):
        super().__init__(index)
        self.text = [prefix]
        self.offset = len(prefix)
        self.lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def feed(self, out: RequestOutput, want_lp: bool) -> tuple[str, Optional[dict]]:
        self.tokens_seen += len(out.token_ids)
        if out.finished and out.finish_reason == "error":
            raise engine_failure(out)
        self.text.append(out.text)
        lp = None
        if want_lp:
            lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for e in out.logprobs:
                s = token_str(e["token"])
                lp["tokens"].append(s)
                lp["token_logprobs"].append(finite(e["logprob"]))
                lp["top_logprobs"].append({token_str(t): finite(v) for t, v in e.get("top") or []})
                lp["text_offset"].append(self.offset)
                self.offset += len(s)
            for k in lp:
                self.lp[k].extend(lp[k])
        if out.finished:
            self.finish_reason = "length" if out.finish_reason == "length" else "stop"
            self.usage = out.usage
        return out.text, lp


class CompletionHandler(ChoicesHandler):
    prompt_param = "prompt"
    chunk_object = "text_completion"
    schema_param = None

    def __init__(self, body: CompletionRequest, fingerprint: Optional[str]):
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        self.body = body
        self.id = new_id("cmpl-")
        self.created = now()
        self.fingerprint = fingerprint
        params = sampling_params(
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty, frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty, logit_bias=body.logit_bias, seed=body.seed,
            stop=[body.stop] if isinstance(body.stop, str) else body.stop, max_tokens=body.max_tokens, n=body.n,
            logprobs=body.logprobs is not None, top_logprobs=body.logprobs, ignore_eos=body.ignore_eos)
        prompts = _prompts(body.prompt)
        prediction = harmony.text_tokens(text_of(body.prediction.content)) if body.prediction else None
        self.requests = [GenerateRequest(f"{self.id}-{i}", ids, params, harmony=False, grammar=None,
                                         hold=not body.stream, priority=tier_priority(body.service_tier),
                                         prediction=prediction, cache_key=body.prompt_cache_key)
                         for i, (_, ids) in enumerate(prompts)]
        self.choices = [_Choice(i * body.n + j, text if body.echo else "")
                        for i, (text, _) in enumerate(prompts) for j in range(body.n)]
        self.usage = UsageTotals()
        for r in self.requests:
            self.usage.add_prompt(len(r.prompt_ids))

    def _feed(self, ri: int, out: RequestOutput):
        ch = self.choices[ri * self.body.n + out.index]
        text, lp = ch.feed(out, self.body.logprobs is not None)
        if ch.finish_reason is not None:
            self.usage.add_choice(ch.usage, ch.tokens_seen, out.index == 0)
        return ch, text, lp

    async def collect(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict:
        async for ri, out in outputs:
            self._feed(ri, out)
        self._check_complete()
        choices = [{"index": c.index, "text": "".join(c.text), "finish_reason": c.finish_reason,
                    "logprobs": c.lp if self.body.logprobs is not None else None} for c in self.choices]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.body.model,
                "system_fingerprint": self.fingerprint, "service_tier": service_tier(self.body.service_tier),
                "choices": choices, "usage": self.usage.chat()}

    async def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        if self.body.echo:
            for c in self.choices:
                yield self._chunk([{"index": c.index, "text": c.text[0], "logprobs": None, "finish_reason": None}])
        async for ri, out in outputs:
            ch, text, lp = self._feed(ri, out)
            if text or lp or ch.finish_reason:
                yield self._chunk([{"index": ch.index, "text": text, "logprobs": lp,
                                    "finish_reason": ch.finish_reason}])
        for event in self._stream_end():
            yield event
