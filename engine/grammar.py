"""Constrained decoding for gpt-oss: harmony structure, JSON schemas and tool calls.

A request's constraints (`GrammarSpec`) become one llguidance lark grammar over the
whole completion that follows the rendered prompt's trailing `<|start|>assistant`:

    [<|channel|>analysis<|message|>THOUGHTS<|end|><|start|>assistant]
    <|channel|>final<|message|>ANSWER<|return|>
  | <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGS<|call|>

`GrammarMatcher` tracks one request; `fill_masks` computes the allowed-token masks
of a whole batch in one parallel llguidance call.
"""
from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Sequence

import llguidance
import torch
from llguidance.tiktoken import lltokenizer_from_encoding
from llguidance.torch import fill_next_token_bitmask_par

MODEL_VOCAB_SIZE = 201088
RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL = (
    200002, 200003, 200005, 200006, 200007, 200008, 200012)
_NAMED_SPECIALS = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", RETURN: "<|return|>",
    CONSTRAIN: "<|constrain|>", CHANNEL: "<|channel|>", START: "<|start|>",
    END: "<|end|>", MESSAGE: "<|message|>", CALL: "<|call|>",
}
_FIRST_SPECIAL = 199998
# o200k's pre-tokenization regex (tiktoken_ext.openai_public.o200k_base); llguidance
# needs it to tokenize forced text the same way the model's tokenizer would.
_O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# Random or badly-behaved models otherwise emit JSON whitespace forever; lenient keeps
# schemas with keywords llguidance doesn't implement usable instead of failing the request.
_JSON_OPTIONS = {"whitespace_flexible": False, "lenient": True}
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@functools.lru_cache(maxsize=1)
def get_harmony_encoding():
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def _mergeable_ranks() -> dict[bytes, int]:
    # Ask harmony (via the call its own decode() makes) rather than reading the
    # .tiktoken file, so we see exactly the vocabulary it loaded, wherever from.
    inner = get_harmony_encoding()._inner
    return {bytes(inner.decode_bytes([i])): i for i in range(_FIRST_SPECIAL)}


@functools.lru_cache(maxsize=1)
def get_lltokenizer() -> llguidance.LLTokenizer:
    """llguidance tokenizer for o200k_harmony (~2 s to build, so cached).

    tiktoken itself isn't needed: lltokenizer_from_encoding only reads a few
    attributes, which a namespace supplies. EOS is `<|return|>`, so once a grammar
    is complete the only token it allows is one the engine already stops on.
    """
    specials = {_NAMED_SPECIALS.get(i, f"<|reserved_{i}|>"): i
                for i in range(_FIRST_SPECIAL, MODEL_VOCAB_SIZE)}
    shim = SimpleNamespace(_mergeable_ranks=_mergeable_ranks(), _special_tokens=specials,
                           _pat_str=_O200K_PATTERN, eot_token=RETURN)
    return lltokenizer_from_encoding(shim, n_vocab=MODEL_VOCAB_SIZE, eos_token=RETURN)


@functools.lru_cache(maxsize=1)
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()


# ---------------------------------------------------------------------------- spec


@dataclass
class GrammarSpec:
    """What a request constrains. Field shapes follow the OpenAI chat API.

    response_format: None | {"type": "text"} | {"type": "json_object"}
        | {"type": "json_schema", "schema": {...}} (the API's nested
        {"json_schema": {"schema": ...}} form is accepted too).
    tools: [{"name", "parameters"}] or [{"type": "function", "function": {...}}].
    tool_choice: "none" | "auto" | "required" | {"name": X} | {"function": {"name": X}}.
    max_reasoning_tokens: cap on analysis text tokens; 0 forbids the analysis message.
    max_content_tokens: cap on free-text final answers (not on JSON ones).
    harmony: constrain the whole output to harmony structure; without it only a
        response_format can be enforced, and the output is then the bare JSON.
    """
    response_format: dict | None = None
    tools: list[dict] = field(default_factory=list)
    tool_choice: str | dict = "auto"
    max_reasoning_tokens: int | None = None
    max_content_tokens: int | None = None
    harmony: bool = True


def _json_schema(response_format: dict | None) -> dict | None:
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        inner = response_format.get("json_schema", response_format)
        schema = inner.get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs a 'schema' object")
        return schema
    raise ValueError(f"unsupported response_format type {kind!r}")


def _json_rule(schema: dict) -> str:
    schema = {**schema, "x-guidance": {**schema.get("x-guidance", {}), **_JSON_OPTIONS}}
    return "%json " + json.dumps(schema)


def _normalize_tools(tools: Sequence[dict]) -> list[tuple[str, dict]]:
    out = []
    for t in tools:
        t = t.get("function", t)
        name = t.get("name")
        # Harmony ends the recipient at whitespace or a special token, so anything
        # beyond OpenAI's name charset (plus '.') could not round-trip through a parse.
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise ValueError(f"invalid tool name {name!r}")
        # OpenAI: omitting parameters defines a function with an empty parameter list
        # (harmony renders it as `() => any`), so its arguments can only be {}.
        out.append((name, t.get("parameters") or _NO_PARAMETERS))
    return out


def _selected_tools(spec: GrammarSpec) -> tuple[list[tuple[str, dict]], bool]:
    """(tools the model may call, whether a final answer is allowed)."""
    tools, choice = _normalize_tools(spec.tools), spec.tool_choice
    if choice == "none" or (choice == "auto" and not tools):
        return [], True
    if choice == "auto":
        return tools, True
    if choice == "required":
        if not tools:
            raise ValueError("tool_choice 'required' but no tools given")
        return tools, False
    if isinstance(choice, dict):
        name = choice.get("function", choice).get("name")
        picked = [t for t in tools if t[0] == name]
        if not picked:
            raise ValueError(f"tool_choice names unknown tool {name!r}")
        return picked[:1], False
    raise ValueError(f"unsupported tool_choice {choice!r}")


def _text_rule(name: str, max_tokens: int | None) -> str:
    # A regex can't match special tokens, so free text can never smuggle in a header.
    attr = f"[max_tokens={int(max_tokens)}]" if max_tokens is not None else ""
    return f"{name}{attr}: /(?s:.*)/"


def build_grammar(spec: GrammarSpec) -> str | None:
    """Lark grammar (llguidance dialect) for `spec`, or None when nothing is constrained."""
    schema = _json_schema(spec.response_format)
    calls, allow_final = _selected_tools(spec)
    if not spec.harmony:
        if calls and not allow_final:
            raise ValueError("forcing a tool call needs harmony structure")
        return None if schema is None else f"start: {_json_rule(schema)}\n"

    replies, rules = [], []
    if allow_final:
        replies.append("final")
        rules.append('final: <|channel|> "final" <|message|> answer <|return|>')
        if schema is None:
            rules.append(_text_rule("answer", spec.max_content_tokens))
        else:
            rules.append(f"answer: {_json_rule(schema)}")
    for i, (name, params) in enumerate(calls):
        # Same header the model is trained on: recipient after the channel, one space
        # before <|constrain|>. Alternatives differ before the JSON starts, so the
        # parser knows which schema applies by the time arguments begin.
        header = json.dumps(f"commentary to=functions.{name} ")
        replies.append(f"call{i}")
        rules.append(f'call{i}: <|channel|> {header} <|constrain|> "json" <|message|> args{i} <|call|>')
        rules.append(f"args{i}: {_json_rule(params)}")

    budget = spec.max_reasoning_tokens
    if budget is not None and budget <= 0:
        top = ["start: reply"]
    else:
        top = ['start: reply | analysis <|start|> "assistant" reply',
               'analysis: <|channel|> "analysis" <|message|> thought <|end|>',
               _text_rule("thought", budget)]
    return "\n".join(top + ["reply: " + " | ".join(replies)] + rules) + "\n"


# --------------------------------------------------------------------------- matcher


@functools.lru_cache(maxsize=128)
def _compiled(grammar: str) -> llguidance.LLMatcher:
    # Compiling (lexer + JSON schemas) dominates matcher creation; requests with the
    # same constraints share one pristine matcher and each gets a deep copy.
    m = llguidance.LLMatcher(get_lltokenizer(), llguidance.LLMatcher.grammar_from_lark(grammar),
                             log_level=0)
    if m.is_error():
        raise ValueError(f"invalid grammar: {m.get_error()}")
    return m


class GrammarMatcher:
    """Grammar state of one request. Never raises on model output: a rejected token
    puts it in an error state (is_error), after which it only allows `<|return|>`."""

    def __init__(self, grammar: str):
        self.grammar = grammar
        self._m = _compiled(grammar).deep_copy()
        self._error: str | None = None
        self._tokens: list[int] = []
        # llguidance can't roll back through max_tokens lexemes, and a refused
        # rollback breaks the matcher for good; such grammars replay instead.
        self._native_rollback = "max_tokens=" not in grammar and "stop=" not in grammar

    @classmethod
    def from_spec(cls, spec: GrammarSpec) -> GrammarMatcher | None:
        grammar = build_grammar(spec)
        return None if grammar is None else cls(grammar)

    def accept(self, token_id: int) -> bool:
        if self.is_error:
            return False
        try:
            ok = self._m.consume_token(int(token_id))
        except Exception as e:  # e.g. an id outside the vocabulary
            ok, self._error = False, f"token {token_id}: {e}"
        if ok:
            self._tokens.append(int(token_id))
        elif self._error is None:
            self._error = self._m.get_error() or f"token {token_id} rejected"
        return ok

    def rollback(self, num_tokens: int) -> bool:
        """Undo the last accepted tokens (speculative decoding); not out of an error.

        Grammars with token budgets are rebuilt from the accepted history, which
        costs O(history) instead of O(num_tokens).
        """
        if self.is_error or not 0 <= num_tokens <= len(self._tokens):
            return False
        if num_tokens == 0:
            return True
        keep = self._tokens[:len(self._tokens) - num_tokens]
        if self._native_rollback:
            ok = self._m.rollback(num_tokens)
        else:
            self._m = _compiled(self.grammar).deep_copy()
            ok = self._m.consume_tokens(keep)
        if ok:
            self._tokens = keep
        else:
            self._error = self._m.get_error() or "rollback failed"
        return ok

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, from the first, the grammar would accept in turn (consuming none)."""
        return 0 if self.is_error or not tokens else self._m.validate_tokens(tokens)

    def reset(self) -> None:
        self._m = _compiled(self.grammar).deep_copy()
        self._error = None
        self._tokens = []

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def is_terminated(self) -> bool:
        """Grammar complete (or broken): nothing but EOS may follow."""
        return self.is_error or self._m.is_stopped()

    @property
    def is_error(self) -> bool:
        return self._error is not None or self._m.is_error()

    @property
    def error(self) -> str:
        return self._error or self._m.get_error()


def fill_bitmask(matchers: Sequence[GrammarMatcher | None],
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed masks, int32 [B, ceil(V/32)], bit t%32 of word t//32 = token t allowed.

    One llguidance call computes all rows on its thread pool with the GIL released.
    Unconstrained rows are all ones. Small enough (25 KB/row) to ship to the GPU
    and unpack there.
    """
    words = (get_lltokenizer().vocab_size + 31) // 32
    if out is None:
        out = torch.empty((len(matchers), words), dtype=torch.int32)
    work = []
    for i, gm in enumerate(matchers):
        # Row by row on purpose: one whole-tensor fill_ wakes torch's OpenMP pool,
        # whose spinning threads then starve llguidance's workers on small hosts (10x).
        if gm is None:
            out[i] = -1
        elif gm.is_error:  # llguidance may not know about our own errors: allow only EOS
            out[i] = 0
            out[i, RETURN // 32] = 1 << (RETURN % 32)
        else:
            work.append((gm._m, i))
    if work:
        fill_next_token_bitmask_par(_executor(), work, out)
    return out


@functools.lru_cache(maxsize=None)
def _byte_lut(device: torch.device) -> torch.Tensor:
    # Entry k is an int64 whose 8 bytes are the bools of k's bits, so one gather per
    # mask byte writes 8 bools at once (little-endian, as on every torch device).
    bools = (torch.arange(256).unsqueeze(1) >> torch.arange(8)).bitwise_and(1).bool()
    return bools.contiguous().view(torch.int64).flatten().to(device)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int,
                   unconstrained: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [B, W] -> bool [B, vocab_size], on the bitmask's device.

    Ids beyond the tokenizer (vocab padding) are disallowed except in rows
    flagged `unconstrained`.
    """
    b, w = bitmask.shape
    idx = bitmask.contiguous().view(torch.uint8).flatten().int()
    bits = _byte_lut(bitmask.device).index_select(0, idx).view(torch.bool).view(b, w * 32)
    if vocab_size <= w * 32:
        return bits[:, :vocab_size]
    pad = torch.zeros((b, vocab_size - w * 32), dtype=torch.bool, device=bitmask.device)
    if unconstrained is not None:
        pad[unconstrained] = True
    return torch.cat([bits, pad], dim=1)


def fill_packed(matchers: Sequence[GrammarMatcher | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 [B, W] packed masks, bool [B] rows without a matcher): what crosses to the sampler."""
    bitmask = fill_bitmask(matchers)
    # A row with nothing allowed would turn softmax into NaN; end such a sequence instead.
    empty = ~bitmask.ne(0).any(dim=1)
    if bool(empty.any()):
        bitmask[empty, RETURN // 32] = 1 << (RETURN % 32)
    return bitmask, torch.tensor([m is None for m in matchers], dtype=torch.bool)


def fill_draft_masks(gm: GrammarMatcher, draft: list[int], bitmask: torch.Tensor, row: int) -> None:
    """Rows row+1 .. row+len(draft) of packed masks: the grammar's after draft[:1], draft[:2], ... (row holds
    its mask now). On a copy of the matcher; the draft is one it accepts (GrammarMatcher.valid_prefix)."""
    m = gm._m.deep_copy()
    for k, t in enumerate(draft, 1):
        if not m.consume_token(int(t)):
            raise ValueError(f"draft token {t} is not one the grammar accepts")
        fill_next_token_bitmask_par(_executor(), [(m, row + k)], bitmask)
        if not bool(bitmask[row + k].ne(0).any()):  # as fill_packed: never a row with nothing allowed
            bitmask[row + k, RETURN // 32] = 1 << (RETURN % 32)


def fill_masks(matchers: Sequence[GrammarMatcher | None], vocab_size: int,
               device: torch.device | str | None = None) -> torch.Tensor:
    """bool [B, vocab_size], True = allowed; rows with no matcher are all True.

    With `device`, only the packed mask (1/8 of the bytes) crosses to it and the
    unpacking runs there, off the CPU that llguidance needs.
    """
    bitmask, free = fill_packed(matchers)
    if device is not None:
        bitmask, free = bitmask.to(device), free.to(device)
    return unpack_bitmask(bitmask, vocab_size, free)


def random_tokens(mask: torch.Tensor, generator: torch.Generator) -> list[int]:
    """One token per row from softmax(randn*3) restricted to `mask`: a random-weight
    model, for tests and measurements (inverse CDF; torch.multinomial over 200k
    columns is far slower)."""
    weights = torch.randn(mask.shape, generator=generator).mul_(3).exp_().mul_(mask)
    cdf = weights.cumsum_(-1)
    u = torch.rand((mask.shape[0], 1), generator=generator) * cdf[:, -1:] * (1 - 1e-6)
    return torch.searchsorted(cdf, u, right=True)[:, 0].tolist()


def measure_mask_cost(batch_size: int, steps: int, spec: GrammarSpec | None = None,
                      seed: int = 0) -> float:
    """Milliseconds of grammar work (mask fill + unpack + accept) per token per
    sequence, driving `batch_size` matchers with random logits for `steps` steps.

    Torch runs single-threaded meanwhile: the random sampling here stands in for
    GPU work, and torch's spinning OpenMP threads would otherwise be measured as
    llguidance slowness on hosts with few cores.
    """
    if spec is None:
        spec = GrammarSpec(response_format={"type": "json_schema", "schema": {
            "type": "object", "properties": {"a": {"type": "string", "maxLength": 16},
                                             "b": {"type": "integer"}},
            "required": ["a", "b"]}}, max_reasoning_tokens=16)
    grammar = build_grammar(spec)
    if grammar is None:
        return 0.0
    gen = torch.Generator().manual_seed(seed)
    matchers = [GrammarMatcher(grammar) for _ in range(batch_size)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fill_masks(matchers, MODEL_VOCAB_SIZE)  # warm-up: first mask builds lexer states
        spent = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            mask = fill_masks(matchers, MODEL_VOCAB_SIZE)
            spent += time.perf_counter() - t0
            tokens = random_tokens(mask, gen)
            t0 = time.perf_counter()
            for gm, tok in zip(matchers, tokens):
                gm.accept(tok)
                if gm.is_terminated:
                    gm.reset()
            spent += time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return spent * 1000.0 / (steps * batch_size)
