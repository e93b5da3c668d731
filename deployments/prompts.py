"""Stored prompts: Responses' `prompt: {"id", "version", "variables"}`, from the operator's templates
(`serve.prompts`, `gptoss serve --prompts FILE`, cluster.config.PromptTemplate).

A template's instructions come before the request's own `instructions` (one developer message), and its
messages before the conversation (stored history, then `input`). Like `instructions`, a prompt is per
request: a continued response names it again to have it. Every `{{name}}` in a template must be given in
`variables` (text, or an input_text part), and every variable must be one the template uses: a typo is a
400, not a silently unfilled prompt.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from .api_common import APIError
from .protocol import InputMessage, PromptRef
from .responses_api import item_dicts

_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class PromptTemplates:
    def __init__(self, templates: Sequence = ()):
        self.versions: dict[str, dict] = {}  # id -> {version: template}, in listed order (the last is current)
        for t in templates:
            self.versions.setdefault(t.id, {})[t.version] = t

    def resolve(self, ref: PromptRef) -> tuple[Optional[str], list[dict]]:
        """-> (the template's instructions, its messages as input item dicts), variables filled."""
        versions = self.versions.get(ref.id)
        if versions is None:
            raise APIError(404, f"no stored prompt with id '{ref.id}'" + (
                f" (this server has {', '.join(sorted(self.versions))})" if self.versions else
                " (this server has none: see serve.prompts)"), param="prompt.id", code="prompt_not_found")
        version = ref.version if ref.version is not None else list(versions)[-1]
        t = versions.get(version)
        if t is None:
            raise APIError(404, f"prompt '{ref.id}' has no version '{version}' (it has {', '.join(versions)})",
                           param="prompt.version", code="prompt_not_found")
        texts = [t.instructions or "", *(m.content for m in t.input)]
        wanted = {name for text in texts for name in _VAR.findall(text)}
        given = {k: v if isinstance(v, str) else v.text for k, v in (ref.variables or {}).items()}
        missing, unknown = sorted(wanted - set(given)), sorted(set(given) - wanted)
        if missing or unknown:
            why = f"missing {', '.join(missing)}" if missing else f"not in the prompt: {', '.join(unknown)}"
            raise APIError(400, f"prompt '{ref.id}' version '{version}' variables: {why}",
                           param="prompt.variables", code="invalid_value")

        def fill(text: str) -> str:
            return _VAR.sub(lambda m: given[m.group(1)], text)
        messages = item_dicts([InputMessage(role=m.role, content=fill(m.content)) for m in t.input])
        return (fill(t.instructions) if t.instructions else None), messages

    def apply(self, body):
        """-> (the body with the prompt's instructions before its own, the prompt's messages) for a body
        naming a prompt; (body, []) otherwise."""
        if body.prompt is None:
            return body, []
        instructions, messages = self.resolve(body.prompt)
        joined = "\n\n".join(x for x in (instructions, body.instructions) if x) or None
        return body.model_copy(update={"instructions": joined}), messages
