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


def at_least(minimum: int):
    """One integer, at least `minimum`."""
    def parse(s: str) -> int:
        try:
            n = int(s)
        except ValueError:
            n = None
        if n is None or n < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, not {s!r}")
        return n
    parse.__name__ = "at_least"
    return parse


def tp_x_ep(s: str) -> tuple[int, int]:
    """'2x4' -> (2, 4): a local group's tensor- and expert-parallel sizes."""
    try:
        tp, ep = (int(x) for x in s.lower().split("x"))
    except ValueError:
        tp = ep = 0
    if tp < 1 or ep < 1:
        raise argparse.ArgumentTypeError(f"expected TPxEP, two positive integers such as 2x2, not {s!r}")
    return tp, ep
