"""`gptoss` command line: checkpoints, generation, serving."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def demo_dir() -> Path:
    """Where `--model demo` lives: the tiny random checkpoint, built on first use."""
    return Path(os.environ.get("GPTOSS_CACHE", Path.home() / ".cache" / "gptoss")) / "demo-tiny-seed0"


def resolve_model(spec: str) -> Path:
    if spec != "demo":
        return Path(spec)
    d = demo_dir()
    if not (d / "config.json").exists():
        from models.checkpoint import make_checkpoint
        print(f"building the demo checkpoint (preset tiny, random weights) in {d}", file=sys.stderr)
        make_checkpoint(d, "tiny", "hf", "mxfp4", seed=0, overwrite=True)
    return d


def cmd_checkpoint_make(args) -> int:
    from models.checkpoint import PRESETS, logical_tensors, make_checkpoint

    if args.dry_run:
        cfg = PRESETS[args.preset]
        total = 0
        for name, layer, t in logical_tensors(cfg.model_copy(update={"num_hidden_layers": 1,
                                                                     "layer_types": cfg.layer_types[:1]}),
                                              args.seed, args.experts):
            n = t.numel() * t.element_size()
            total += n if layer is None else n * cfg.num_hidden_layers
        print(f"preset {args.preset}: {cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts, "
              f"{total / 1e9:.2f} GB of tensors ({args.experts} experts)")
        return 0
    t0 = time.time()
    try:
        out = make_checkpoint(args.out, args.preset, args.format, args.experts, args.seed,
                              shard_bytes=int(args.shard_gb * 2**30), overwrite=args.force)
    except FileExistsError as e:
        print(f"gptoss checkpoint make: OUT: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {args.preset} ({args.format}, {args.experts} experts, seed {args.seed}) to {out}: "
          f"{size / 1e9:.3f} GB in {time.time() - t0:.1f} s")
    return 0


def _greedy(model, prompt: list[int], max_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decode over the paged-cache forward, one sequence (the engine does many)."""
    import torch

    from models.attention import KVCache, PagedMetadata

    cfg, bs = model.config, 16
    nblocks = (len(prompt) + max_tokens) // bs + 2
    cache = KVCache.allocate(cfg.num_hidden_layers, [nblocks] * cfg.num_hidden_layers, bs,
                             cfg.num_key_value_heads, cfg.head_dim, model.dtype)
    table = torch.arange(1, nblocks).unsqueeze(0)  # block 0 is the null block
    groups = ["all"] * cfg.num_hidden_layers
    out, new, ctx = [], list(prompt), 0
    while len(out) < max_tokens:
        pos = torch.arange(ctx, ctx + len(new))
        slots = table[0, pos // bs] * bs + pos % bs
        ctx += len(new)
        meta = PagedMetadata(cache, torch.tensor([0, len(new)]), torch.tensor([ctx]),
                             {"all": table}, {"all": slots}, groups)
        h = model(torch.tensor(new), pos, meta)
        tok = int(model.compute_logits(h[-1:]).argmax(-1))
        out.append(tok)
        if tok in stop:
            break
        new = [tok]
    return out


def cmd_serve(args) -> int:
    import torch

    from models import load_model

    path = resolve_model(args.model)
    print("HTTP serving arrives with the Ray Serve deployments; until then `serve` runs the most real job "
          "available: a greedy harmony generation through the model.", file=sys.stderr)
    model = load_model(path, dtype=torch.float32)
    try:
        from openai_harmony import (Conversation, HarmonyEncodingName, Message, Role, SystemContent,
                                    load_harmony_encoding)
        enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # no vocab offline
        print(f"gptoss serve: cannot load the harmony encoding ({e}); set TIKTOKEN_ENCODINGS_BASE", file=sys.stderr)
        return 1
    convo = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
        Message.from_role_and_content(Role.USER, args.prompt),
    ])
    prompt = enc.render_conversation_for_completion(convo, Role.ASSISTANT)
    t0 = time.time()
    toks = _greedy(model, prompt, args.max_tokens, set(enc.stop_tokens_for_assistant_actions()))
    dt = time.time() - t0
    print(f"model: {path}")
    print(f"prompt ({len(prompt)} tokens): {enc.decode(prompt)!r}")
    print(f"completion ({len(toks)} tokens, {len(toks) / dt:.1f} tok/s): {enc.decode(toks)!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptoss", description="Serve OpenAI's gpt-oss models.")
    sub = p.add_subparsers(dest="cmd", required=True)

    ck = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="ckcmd", required=True)
    mk = ck.add_parser("make", help="write a random checkpoint in the real formats")
    mk.add_argument("out", help="output directory")
    mk.add_argument("--preset", default="tiny", choices=["tiny", "small", "gpt-oss-20b", "gpt-oss-120b"])
    mk.add_argument("--format", default="hf", choices=["hf", "original", "both"],
                    help="hf: Hugging Face layout; original: OpenAI's original/ layout; both: HF root + original/")
    mk.add_argument("--experts", default="mxfp4", choices=["mxfp4", "bf16"])
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--shard-gb", type=float, default=2.0, help="target shard size in GiB")
    mk.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
    mk.add_argument("--dry-run", action="store_true", help="print the size without writing")
    mk.set_defaults(fn=cmd_checkpoint_make)

    sv = sub.add_parser("serve", help="serve the OpenAI API")
    sv.add_argument("--model", default="demo", help="checkpoint directory, or 'demo'")
    sv.add_argument("--prompt", default="What is the capital of France?")
    sv.add_argument("--max-tokens", type=int, default=32)
    sv.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models.config import ConfigError
    from models.weights import CheckpointError
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError) as e:
        print(f"gptoss {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
