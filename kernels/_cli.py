"""argparse types the kernel and benchmark tools share, so a bad value is refused by argparse with its flag's
name (exit 2) rather than found later as a traceback or, worse, measured: `--batches 0`, `--models nope`."""

from __future__ import annotations

import argparse


def counts(none_ok: bool = False):
    """'1,8,64' -> [1, 8, 64]: positive integers, comma separated. none_ok: a list of extras, where '' and 0
    say "none" (bench.gpu's --pdl-batches '')."""
    minimum = 0 if none_ok else 1

    def parse(s: str) -> list[int]:
        try:
            out = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            out = None
        if out is None or (not out and not none_ok) or (out and min(out) < minimum):
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, comma separated, not {s!r}")
        return out
    parse.__name__ = "counts"
    return parse


def presets(s: str) -> list[str]:
    """'gpt-oss-120b,tiny' -> the checkpoint presets named (models.checkpoint.PRESETS)."""
    from models.checkpoint import PRESETS
    out = [x for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in PRESETS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(bad) or '(none)'} (choose from "
                                         f"{', '.join(PRESETS)})")
    return out


def one_of(allowed: tuple[str, ...]):
    """'moe,attn' -> {'moe', 'attn'}, each one of `allowed`."""
    def parse(s: str) -> set[str]:
        out = {x for x in s.split(",") if x.strip()}
        bad = sorted(out - set(allowed))
        if bad or not out:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or '(none)'} (choose from {', '.join(allowed)})")
        return out
    parse.__name__ = "one_of"
    return parse
