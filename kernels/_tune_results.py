"""kernels.tune's results: one per kernel, shape and batch; the JSON file the launchers read
(kernels.tuned) and the table the run prints."""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Result:
    kernel: str
    shape: str
    label: str
    batch: int
    best: dict | None = None
    best_us: float | None = None
    default: dict | None = None
    default_us: float | None = None
    timed: int = 0
    rejected: list[str] = field(default_factory=list)
    check_err: float | None = None
    check_ok: bool = False
    beaten: bool = False  # a baseline outside the kernels (cuBLAS) was faster: written with config null


def _us(t: float | None) -> str:
    return "-" if t is None else f"{t:.1f} us"


def _fmt(c: dict | None) -> str:
    if not c:
        return "-"
    short = dict(BLOCK_M="M", BLOCK_N="N", BLOCK_K="K", BLOCK_KB="KB", NUM_SPLITS="splits", SPLIT_K="split_k",
                 TAIL_G="tail", num_warps="w", num_stages="s")
    return " ".join(k.lower() if k in ("GEMV", "RS", "DQ", "L2PF") else
                    f"{short.get(k, k)}{'=' if k in ('NUM_SPLITS', 'SPLIT_K', 'TAIL_G') else ''}{v}"
                    for k, v in c.items())


class Store:
    """<out>/<device>.json: entries keyed by (kernel, shape, batch), merged into what the file holds."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        old = json.loads(path.read_text()) if path.exists() else {}
        self.entries = {(e["kernel"], e["shape"], e["batch"]): e for e in old.get("entries", [])}

    def add(self, r: Result, extra: dict) -> None:
        """A beaten result is written too, config null (kernels.tuned: the baseline runs at that batch, and
        a neighbouring bucket's config does not reach over it); its best candidate stays beside it."""
        self.entries[(r.kernel, r.shape, r.batch)] = dict(
            kernel=r.kernel, shape=r.shape, batch=r.batch, config=None if r.beaten else r.best,
            **({"best_candidate": r.best} if r.beaten else {}), us=round(r.best_us, 2),
            default_config=r.default, default_us=None if r.default_us is None else round(r.default_us, 2),
            candidates_timed=r.timed, check_rel_err=r.check_err, **extra, rejected=r.rejected)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        body = dict(self.header, updated=_now(), entries=sorted(self.entries.values(),
                                                                key=lambda e: (e["kernel"], e["shape"], e["batch"])))
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        os.replace(tmp, self.path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def table(rows: list[Result]) -> str:
    head = ("kernel", "shape", "batch", "default us", "best us", "speedup", "best config")
    body = []
    for r in rows:
        sp = f"{r.default_us / r.best_us:.2f}x" if r.default_us and r.best_us else "-"
        cfg = _fmt(r.best) + ("" if r.check_ok or r.best is None else f" (REJECTED: error {r.check_err:.1e})")
        body.append((r.kernel, r.label, str(r.batch), f"{r.default_us:.1f}" if r.default_us else "-",
                     f"{r.best_us:.1f}" if r.best_us else "-", sp, cfg))
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda x: "| " + " | ".join(s.ljust(w) for s, w in zip(x, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])
