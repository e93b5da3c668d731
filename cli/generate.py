"""`gptoss generate`: one chat request through the engine, harmony in and out."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """A bad flag value; the message names the flag."""


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="run one chat request through the engine")
    g.add_argument("--model", default="demo", help="checkpoint directory, or 'demo'")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="a user message")
    src.add_argument("--messages", help="JSON file: a list of chat messages (OpenAI shape)")
    g.add_argument("--reasoning-effort", default="medium", choices=["low", "medium", "high"])
    g.add_argument("--max-reasoning-tokens", type=int, help="reasoning budget (grammar-enforced)")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--json-schema", help="JSON file: schema the final answer must match")
    g.add_argument("--tools", help="JSON file: a list of function tools (OpenAI shape)")
    g.add_argument("--tool-choice", default="auto", help="auto | required | none | a tool's name")
    g.add_argument("--no-grammar", action="store_true", help="do not constrain output to harmony structure")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size for attention (local rank processes)")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel size (local rank processes)")
    g.add_argument("--attn-dp", action="store_true",
                   help="attention data parallelism: the ep/tp attention groups each serve their own sequences")
    g.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="what the KV cache stores: the model's dtype (auto), or float8 e4m3 (fp8)")
    g.add_argument("--gpu", action="store_true",
                   help="run on CUDA: bf16 with MXFP4 experts through the Triton kernels (one GPU per rank)")
    g.set_defaults(fn=run)


def build_parser_defaults(**overrides) -> argparse.Namespace:
    """The generate flags' defaults, with overrides (used by `serve` until HTTP lands)."""
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="cmd"))
    ns = p.parse_args(["generate"])
    for k, v in overrides.items():
        setattr(ns, k, v)
    return ns


def _load_json(path: str, flag: str):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{flag}: no such file '{path}'") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag}: '{path}' is not valid JSON ({e})") from None


def build_request(args):
    from pydantic import ValidationError

    from engine import harmony
    from engine.grammar import GrammarMatcher, GrammarSpec
    from engine.request import GenerateRequest
    from engine.sampler import SamplingParams

    if args.messages:
        messages = _load_json(args.messages, "--messages")
        if not isinstance(messages, list):
            raise UsageError("--messages: expected a JSON list of messages")
    else:
        messages = [{"role": "user", "content": args.prompt or "What is the capital of France?"}]
    tools = _load_json(args.tools, "--tools") if args.tools else []
    if not isinstance(tools, list):
        raise UsageError("--tools: expected a JSON list of tools")
    fn_tools = [t.get("function", t) for t in tools]
    names = [t.get("name") for t in fn_tools]
    choice = args.tool_choice
    if choice not in ("auto", "required", "none"):
        if choice not in names:
            raise UsageError(f"--tool-choice: '{choice}' is not one of the tools "
                             f"({', '.join(map(str, names)) or 'none given'})")
        choice = {"name": choice}
    elif choice == "required" and not tools:
        raise UsageError("--tool-choice: 'required' needs --tools")
    rf = None
    if args.json_schema:
        rf = {"type": "json_schema", "schema": _load_json(args.json_schema, "--json-schema")}
    try:
        prompt = harmony.render_chat(messages, tools=fn_tools or None, reasoning_effort=args.reasoning_effort)
    except (harmony.HarmonyInputError, ValueError) as e:
        raise UsageError(f"--messages: {e}") from None
    if args.max_reasoning_tokens is not None and args.max_reasoning_tokens < 0:
        raise UsageError(f"--max-reasoning-tokens: {args.max_reasoning_tokens} is negative (0 forbids reasoning)")
    grammar = None
    if not args.no_grammar or rf or choice != "auto" or args.max_reasoning_tokens is not None:
        grammar = GrammarSpec(response_format=rf, tools=fn_tools if choice != "none" else [], tool_choice=choice,
                              max_reasoning_tokens=args.max_reasoning_tokens, harmony=True)
        try:  # compiled now (and cached for the engine): a schema llguidance rejects is the flag's fault
            GrammarMatcher.from_spec(grammar)
        except ValueError as e:
            raise UsageError(f"{'--json-schema' if rf else '--tools'}: {str(e).splitlines()[0]}") from None
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                max_tokens=args.max_tokens)
    except ValidationError as e:
        err = e.errors()[0]
        raise UsageError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    return GenerateRequest("cli-0", prompt, params, harmony=True, grammar=grammar)


def collect(outs) -> dict:
    from engine import harmony
    reasoning, content, calls, res = [], [], {}, {"finish_reason": None, "usage": None, "error": None}
    for o in outs:
        for ev in o.events:
            if isinstance(ev, harmony.ReasoningDelta):
                reasoning.append(ev.text)
            elif isinstance(ev, harmony.ContentDelta):
                content.append(ev.text)
            elif isinstance(ev, harmony.ToolCallStart):
                calls[ev.index] = {"id": ev.id, "name": ev.name, "arguments": ""}
            elif isinstance(ev, harmony.ToolCallDelta):
                calls[ev.index]["arguments"] += ev.arguments
        if o.finished:
            u = o.usage
            res.update(finish_reason=o.finish_reason, error=o.error,
                       usage=u and {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                                    "reasoning_tokens": u.reasoning_tokens})
    return {"reasoning": "".join(reasoning), "content": "".join(content),
            "tool_calls": [calls[k] for k in sorted(calls)], **res}


def run(args) -> int:
    import torch

    from cli.main import check_model, check_vocabulary, resolve_model
    from engine.core import EngineConfig, build_engine
    from engine.request import EngineError

    check_vocabulary()
    req = build_request(args)
    path = resolve_model(args.model)
    check_model(path, args.tp, args.ep, args.attn_dp)
    if args.gpu and not torch.cuda.is_available():
        raise UsageError("--gpu: no CUDA device on this machine")
    runtime = dict(dtype=torch.bfloat16, device="cuda", keep_mxfp4=True) if args.gpu else dict(dtype=torch.float32)
    engine = build_engine(path, EngineConfig(kv_cache_dtype=args.kv_cache_dtype), args.tp, args.ep,
                          attn_dp=args.attn_dp, **runtime)
    t0 = time.time()
    try:
        outs = engine.generate([req])[req.request_id]
    except EngineError as e:
        raise UsageError(f"--max-tokens/--prompt: {e}") from None
    finally:
        engine.shutdown()
    res = collect(outs)
    if args.json:
        print(json.dumps(res))
    else:
        n = res["usage"]["completion_tokens"] if res["usage"] else 0
        print(f"[reasoning] {res['reasoning']}")
        print(f"[content]   {res['content']}")
        for c in res["tool_calls"]:
            print(f"[tool call] {c['name']}({c['arguments']})")
        print(f"[finish]    {res['finish_reason']}; {n} tokens in {time.time() - t0:.2f} s", file=sys.stderr)
    return 0
