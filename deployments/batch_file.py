"""The batch store on disk: a SQLite file it writes through to, so a store replica that restarts
(moved, upgraded, its node replaced) starts with the files and batches it had, and a batch that
was running goes on from its last reported line (its runner's reports now answer None, so the
runner stops; the next claim skips the lines the file holds).

What reaches the file: every file added, expired or deleted, every batch created, cancelled or
finished, and every report's lines (with the batch's counts), each in one transaction; and every webhook
endpoint created, changed or deleted (deployments.webhook_store).
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Iterable, Iterator, Union


class BatchFile:
    """Not thread-safe on its own: MemoryBatchStore calls it under its lock."""

    def __init__(self, path: Union[str, os.PathLike]):
        path = os.fspath(path)
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")  # what a crash can lose is the last writes, never the file
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, meta TEXT NOT NULL, data BLOB NOT "
                        "NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, batch TEXT NOT NULL, tier_cap "
                        "TEXT, output_expires_s INTEGER, principal TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS results (batch TEXT NOT NULL, line INTEGER NOT NULL, ok INTEGER "
                        "NOT NULL, text TEXT NOT NULL, PRIMARY KEY (batch, line))")
        self.db.execute("CREATE TABLE IF NOT EXISTS webhooks (id TEXT PRIMARY KEY, record TEXT NOT NULL)")

    def save_endpoint(self, eid: str, record: dict) -> None:
        self.db.execute("INSERT INTO webhooks (id, record) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET record = "
                        "excluded.record", (eid, json.dumps(record)))

    def drop_endpoint(self, eid: str) -> None:
        self.db.execute("DELETE FROM webhooks WHERE id = ?", (eid,))

    def load_endpoints(self) -> list[dict]:
        """Oldest first."""
        return [json.loads(r) for (r,) in self.db.execute("SELECT record FROM webhooks ORDER BY rowid")]

    def add_files(self, files: Iterable) -> None:
        self.db.executemany("INSERT OR REPLACE INTO files (id, meta, data) VALUES (?, ?, ?)",
                            [(f.id, json.dumps({"filename": f.filename, "purpose": f.purpose,
                                                "created_at": f.created_at, "expires_at": f.expires_at,
                                                "principal": f.principal}),
                              f.data) for f in files])

    def drop_files(self, ids: Iterable[str]) -> None:
        self.db.executemany("DELETE FROM files WHERE id = ?", [(i,) for i in ids])

    def save_batch(self, job, results: Iterable[tuple[int, bool, str]] = (), files: Iterable = (),
                   drop_results: bool = False) -> None:
        """The batch's object, with the lines it just finished, or (finished) its output files instead."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO batches (id, batch, tier_cap, output_expires_s, principal) VALUES (?, ?, ?, "
                            "?, ?) ON CONFLICT (id) DO UPDATE SET batch = excluded.batch",  # its row keeps its place
                            (job.id, json.dumps(job.batch), job.tier_cap, job.output_expires_s, job.principal))
            self.db.executemany("INSERT OR IGNORE INTO results (batch, line, ok, text) VALUES (?, ?, ?, ?)",
                                [(job.id, line, int(ok), text) for line, ok, text in results])
            self.add_files(files)
            if drop_results:
                self.db.execute("DELETE FROM results WHERE batch = ?", (job.id,))

    def load(self) -> tuple[list, list]:
        """(the files, the batch jobs with the results of those still running), oldest first."""
        from .batch_store import BatchJob, StoredFile
        files = [StoredFile(fid, data=bytes(data), **json.loads(meta))
                 for fid, meta, data in self.db.execute("SELECT id, meta, data FROM files ORDER BY rowid")]
        jobs = [BatchJob(json.loads(b), tier_cap=cap, output_expires_s=exp, principal=who)
                for b, cap, exp, who in self.db.execute("SELECT batch, tier_cap, output_expires_s, principal FROM "
                                                        "batches ORDER BY rowid")]
        by_id = {j.id: j for j in jobs}
        for bid, line, ok, text in self._results():
            if bid in by_id:
                by_id[bid].results[line] = (bool(ok), text)
        return files, jobs

    def _results(self) -> Iterator[tuple[str, int, int, str]]:
        yield from self.db.execute("SELECT batch, line, ok, text FROM results")

    def close(self) -> None:
        self.db.close()
