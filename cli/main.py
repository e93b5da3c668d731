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


def check_vocabulary() -> None:
    """Harmony needs the o200k vocabulary for every prompt: fail now, with the fix, rather than with
    harmony's traceback in generate or a 500 for each request in serve (offline machines need a copy)."""
    from cli.generate import UsageError
    from engine import harmony
    try:
        harmony.get_encoding()
    except Exception as e:
        where = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        hint = (f"TIKTOKEN_ENCODINGS_BASE={where} does not hold it" if where else
                "offline? download o200k_base.tiktoken and set TIKTOKEN_ENCODINGS_BASE to its folder")
        raise UsageError(f"cannot load harmony's o200k vocabulary ({hint}): {e}") from None


def check_model(path: Path, tp: int, ep: int, attn_dp: bool) -> None:
    """The checkpoint's config and the parallel layout, checked before anything starts: a bad --model, --tp
    or --ep is the user's, answered with the flag's name rather than with a rank's traceback."""
    from cli.generate import UsageError
    from models.config import ConfigError, load_config
    from models.weights import CheckpointError
    from models.weights import resolve_layout as resolve_checkpoint
    from parallel.layout import LayoutError, resolve_layout
    try:
        cfg = load_config(resolve_checkpoint(path)[0])
    except (ConfigError, CheckpointError) as e:
        raise UsageError(f"--model: {e}") from None
    try:
        resolve_layout(cfg, tp, ep, attn_dp=attn_dp)
    except LayoutError as e:
        raise UsageError(str(e)) from None


def cmd_checkpoint_make(args) -> int:
    from models.checkpoint import PRESETS, make_checkpoint, spec_bytes, tensor_specs

    if args.dry_run:
        cfg = PRESETS[args.preset]
        total = sum(spec_bytes(shape, kind) for _, _, shape, kind, _, _ in tensor_specs(cfg, args.experts))
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
    except OSError as e:  # not a directory, no permission, a full disk
        print(f"gptoss checkpoint make: OUT: cannot write to '{e.filename or args.out}' ({e.strerror or e})",
              file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {args.preset} ({args.format}, {args.experts} experts, seed {args.seed}) to {out}: "
          f"{size / 1e9:.3f} GB in {time.time() - t0:.1f} s")
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

    from cli import batch, generate, serve
    generate.add_parser(sub)
    batch.add_parser(sub)
    serve.add_parsers(sub)
    from cli import dashboards
    dashboards.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cli.generate import UsageError
    from models.config import ConfigError
    from models.weights import CheckpointError
    from parallel.replies import WorkerError
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError, UsageError) as e:
        print(f"gptoss {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the shell's convention, without Python's traceback
        print(f"gptoss {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except WorkerError as e:  # not the user's input: a rank failed (its traceback goes to the log)
        import logging
        logging.getLogger("gptoss").debug("rank failure", exc_info=True)
        print(f"gptoss {args.cmd}: a rank worker failed: {e.summary}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
