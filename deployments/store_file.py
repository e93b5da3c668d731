"""The response store on disk: a SQLite file (one row a record, its JSON) that the store
writes through to, so a store replica that restarts (moved, upgraded, its node replaced)
starts with the responses and conversations it had (the least recently written evicted
first).

What reaches the file: every put (a response as it starts and as it ends), conversation
edit, delete and eviction. A background run's progress in between (deployments.background)
stays in memory: it is rewritten every FLUSH_S, and the run's final put carries it all. A
response that was running when the whole app stopped is read back as it started.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from typing import Iterable, Iterator, Union

_FIELDS = ("size", "beat", "saved")  # the store's own bookkeeping, not the record


def _row(rec) -> tuple[str, str, str]:
    d = {k: v for k, v in dataclasses.asdict(rec).items() if k not in _FIELDS}
    return rec.id, rec.kind, json.dumps(d)


def _record(kind: str, data: str):
    from .response_store import RECORD_KINDS
    return RECORD_KINDS[kind](**json.loads(data))


class StoreFile:
    """The records of one MemoryResponseStore, in a SQLite file. Not thread-safe on its own: the
    store calls it under its lock."""

    def __init__(self, path: Union[str, os.PathLike]):
        path = os.fspath(path)
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # WAL: a write appends rather than rewriting pages; NORMAL: what a crash can lose is the last
        # writes, never the file
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS records (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
                        "kind TEXT NOT NULL, data TEXT NOT NULL)")
        self._seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]

    def save(self, rec) -> None:
        """Writes `rec` as the most recent record."""
        self._seq += 1
        rid, kind, data = _row(rec)
        self.db.execute("INSERT OR REPLACE INTO records (id, seq, kind, data) VALUES (?, ?, ?, ?)",
                        (rid, self._seq, kind, data))

    def drop(self, rids: Iterable[str]) -> None:
        self.db.executemany("DELETE FROM records WHERE id = ?", [(r,) for r in rids])

    def load(self) -> Iterator:
        """The records, least recently written first."""
        for kind, data in self.db.execute("SELECT kind, data FROM records ORDER BY seq"):
            yield _record(kind, data)

    def close(self) -> None:
        self.db.close()
