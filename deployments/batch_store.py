"""What the Files and Batch APIs keep: uploaded files, batch jobs and their results.

One MemoryBatchStore serves the whole app: in-process for a plain `build_app`, and in the
Ray Serve app a single-replica deployment (BatchStoreServer) that every ingress replica
reaches through BatchStoreClient. Its records are small and its calls are dict work, so
one replica is no bottleneck; keeping them in one place is what lets any ingress replica
answer for any file or batch, and lets a batch outlive the replica that ran it.

A batch is run by one ingress replica at a time (deployments.batch_runner): it `claim`s
the job, `report`s each finished line (the report is also its heartbeat), and `finish`es
it. A job whose runner has not reported for `lost_s` (its replica died or was scaled
away) is free to claim again, and the new runner skips the lines already done, so a
batch survives the loss of its runner without running a line twice to completion.

Memory is bounded by `max_bytes` over file contents and results: an upload that would
pass it is refused (the client deletes what it no longer needs); results are always
kept, so a running batch never loses work to the bound.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from .api_common import new_id, now

RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
ENDED = ("completed", "failed", "expired", "cancelled")
ANY = "*"  # the principal of a call that may see every object (the runner); never an API key's digest


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int = field(default_factory=now)
    expires_at: Optional[int] = None
    principal: Optional[str] = None  # the uploading API key's digest (api_common.principal); None: no keys

    def object(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "expires_at": self.expires_at, "filename": self.filename, "purpose": self.purpose,
                "status": "processed", "status_details": None}


@dataclass
class BatchJob:
    batch: dict  # the Batch object as clients see it
    tier_cap: Optional[str] = None  # the creating API key's highest service tier (None: no keys)
    output_expires_s: Optional[int] = None  # the output files' lifetime (None: until deleted)
    principal: Optional[str] = None  # the creating API key's digest: only it sees the batch and its files
    results: dict[int, tuple[bool, str]] = field(default_factory=dict)  # input line -> (succeeded, output line)
    owner: Optional[str] = None  # the runner holding it
    beat: float = 0.0  # the store's clock at the owner's last report

    @property
    def id(self) -> str:
        return self.batch["id"]


def new_batch(input_file_id: str, endpoint: str, model: Optional[str], total: int, metadata: Optional[dict],
              errors: list[dict], window_s: int = 86_400) -> dict:
    """A Batch object: in_progress, or failed with `errors` (the input did not validate)."""
    t = now()
    b = {"id": new_id("batch_"), "object": "batch", "endpoint": endpoint, "model": model, "errors": None,
         "input_file_id": input_file_id, "completion_window": "24h", "status": "in_progress",
         "output_file_id": None, "error_file_id": None, "created_at": t, "in_progress_at": t,
         "expires_at": t + window_s, "finalizing_at": None, "completed_at": None, "failed_at": None,
         "expired_at": None, "cancelling_at": None, "cancelled_at": None,
         "request_counts": {"total": total, "completed": 0, "failed": 0}, "metadata": metadata,
         "usage": {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
                   "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}}
    if errors:
        b.update(status="failed", in_progress_at=None, failed_at=t, errors={"object": "list", "data": errors})
    return b


def add_usage(total: dict, usage: dict) -> None:
    """Adds one response's usage (Chat/Completions' or Responses' names) to a batch's."""
    got_in = usage.get("input_tokens", usage.get("prompt_tokens", 0)) or 0
    got_out = usage.get("output_tokens", usage.get("completion_tokens", 0)) or 0
    details_in = usage.get("input_tokens_details") or usage.get("prompt_tokens_details") or {}
    details_out = usage.get("output_tokens_details") or usage.get("completion_tokens_details") or {}
    total["input_tokens"] += got_in
    total["output_tokens"] += got_out
    total["total_tokens"] += got_in + got_out
    total["input_tokens_details"]["cached_tokens"] += details_in.get("cached_tokens") or 0
    total["output_tokens_details"]["reasoning_tokens"] += details_out.get("reasoning_tokens") or 0


class MemoryBatchStore:
    """Thread-safe (a Serve replica may call it from several threads); what it returns are copies, so no
    caller reads a batch while a report changes it."""

    def __init__(self, max_bytes: int = 1 << 30, lost_s: float = 30.0, path: Optional[str] = None):
        """path: a SQLite file the store writes through to and starts from (deployments.batch_file)."""
        self.max_bytes, self.lost_s = max_bytes, lost_s
        self.files: dict[str, StoredFile] = {}  # insertion order = creation order
        self.jobs: dict[str, BatchJob] = {}
        self.bytes = 0
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            from .batch_file import BatchFile
            self._file = BatchFile(path)
            files, jobs = self._file.load()
            self.files = {f.id: f for f in files}
            self.jobs = {j.id: j for j in jobs}
            self.bytes = sum(len(f.data) for f in files) + sum(len(t) for j in jobs for _, t in j.results.values())
        from .webhook_store import EndpointBook
        self.webhooks = EndpointBook(self._file)

    def webhook(self, name: str, *args):
        """An EndpointBook call (deployments.webhook_store): the webhook endpoints live here too."""
        with self._lock:
            return getattr(self.webhooks, name)(*args)

    # ---------------------------------------------------------------- files
    def add_file(self, f: StoredFile) -> bool:
        """Stores `f`; False when it would pass the byte budget."""
        with self._lock:
            self._sweep()
            if self.bytes + len(f.data) > self.max_bytes:
                return False
            self.files[f.id] = f
            self.bytes += len(f.data)
            if self._file is not None:
                self._file.add_files([f])
            return True

    def _sweep(self) -> None:
        t = now()
        gone = [f for f in self.files.values() if f.expires_at is not None and f.expires_at <= t]
        for f in gone:
            del self.files[f.id]
            self.bytes -= len(f.data)
        if gone and self._file is not None:
            self._file.drop_files(f.id for f in gone)

    @staticmethod
    def _sees(principal: Optional[str], obj) -> bool:
        """Whether `principal` may see `obj`: its own, or (ANY) every one. Others' are not found, so an id
        shows nothing of another key's objects, not even that they exist."""
        return principal == ANY or obj.principal == principal

    def _get_file(self, fid: str, principal: Optional[str]) -> Optional[StoredFile]:
        self._sweep()
        f = self.files.get(fid)
        return f if f is not None and self._sees(principal, f) else None

    def file(self, fid: str, principal: Optional[str] = ANY) -> Optional[dict]:
        with self._lock:
            f = self._get_file(fid, principal)
            return None if f is None else f.object()

    def content(self, fid: str, principal: Optional[str] = ANY) -> Optional[bytes]:
        with self._lock:
            f = self._get_file(fid, principal)
            return None if f is None else f.data

    def list_files(self, purpose: Optional[str] = None, principal: Optional[str] = ANY) -> list[dict]:
        """Oldest first."""
        with self._lock:
            self._sweep()
            return [f.object() for f in self.files.values()
                    if (purpose is None or f.purpose == purpose) and self._sees(principal, f)]

    def delete_file(self, fid: str, principal: Optional[str] = ANY) -> Optional[str]:
        """None: deleted; "missing"; or the id of a running batch that reads it (not deleted)."""
        with self._lock:
            if self._get_file(fid, principal) is None:
                return "missing"
            user = next((j.id for j in self.jobs.values()
                         if j.batch["input_file_id"] == fid and j.batch["status"] in RUNNING), None)
            if user is not None:
                return user
            self.bytes -= len(self.files.pop(fid).data)
            if self._file is not None:
                self._file.drop_files([fid])
            return None

    # -------------------------------------------------------------- batches
    def add_batch(self, job: BatchJob) -> None:
        with self._lock:
            self.jobs[job.id] = job
            self._save(job)

    def _save(self, job: BatchJob, results=(), files=(), finished: bool = False) -> None:
        if self._file is not None:
            self._file.save_batch(job, results, files, drop_results=finished)

    def batch(self, bid: str, principal: Optional[str] = ANY) -> Optional[dict]:
        with self._lock:
            job = self.jobs.get(bid)
            return copy.deepcopy(job.batch) if job is not None and self._sees(principal, job) else None

    def list_batches(self, principal: Optional[str] = ANY) -> list[dict]:
        """Oldest first."""
        with self._lock:
            return [copy.deepcopy(j.batch) for j in self.jobs.values() if self._sees(principal, j)]

    def cancel(self, bid: str, principal: Optional[str] = ANY) -> Optional[dict]:
        """Marks a running batch `cancelling`; its runner stops and finishes it. One nobody runs is
        cancelled at once."""
        with self._lock:
            job = self.jobs.get(bid)
            if job is None or not self._sees(principal, job):
                return None
            b = job.batch
            if b["status"] in ("validating", "in_progress"):
                b.update(status="cancelling", cancelling_at=now())
                if not self._held(job):
                    self._finish(job, "cancelled")
                else:
                    self._save(job)
            return copy.deepcopy(b)

    def _held(self, job: BatchJob) -> bool:
        return job.owner is not None and time.monotonic() - job.beat < self.lost_s

    def claim(self, owner: str) -> Optional[tuple[dict, list[int], Optional[str], Optional[str]]]:
        """The oldest running batch nobody holds, now held by `owner`: (its Batch object, the input lines
        already done, the tier cap its lines run under, whose it is); None when there is none."""
        with self._lock:
            for job in self.jobs.values():
                if job.batch["status"] in ("in_progress", "cancelling") and not self._held(job):
                    job.owner, job.beat = owner, time.monotonic()
                    return copy.deepcopy(job.batch), sorted(job.results), job.tier_cap, job.principal
            return None

    def release(self, bid: str, owner: str) -> None:
        """`owner` stops running `bid` (its replica is shutting down): another may claim it at once."""
        with self._lock:
            job = self.jobs.get(bid)
            if job is not None and job.owner == owner:
                job.owner = None

    def report(self, bid: str, owner: str, results: list[tuple[int, bool, str, dict]]) -> Optional[str]:
        """Lines `owner` finished: (input line, succeeded, output line, usage). Returns the batch's status
        (`cancelling`: stop), or None when `owner` no longer holds it (it was presumed lost): the
        caller stops, and what it reported is kept."""
        with self._lock:
            job = self.jobs.get(bid)
            if job is None or job.batch["status"] not in RUNNING:
                return None
            b, new = job.batch, []
            for line, ok, text, usage in results:
                if line in job.results:
                    continue  # a runner presumed lost finished it too: the first one counts
                job.results[line] = (ok, text)
                new.append((line, ok, text))
                self.bytes += len(text)
                b["request_counts"]["completed" if ok else "failed"] += 1
                add_usage(b["usage"], usage)
            if new:
                self._save(job, new)
            if job.owner != owner:
                return None
            job.beat = time.monotonic()
            return b["status"]

    def finish(self, bid: str, owner: str, status: str, error: Optional[dict] = None) -> Optional[dict]:
        """Ends `owner`'s run of `bid` as `status` (completed, cancelled, expired, failed with `error`), and
        writes its output and error files."""
        with self._lock:
            job = self.jobs.get(bid)
            if job is None or job.owner != owner:
                return None
            if job.batch["status"] == "cancelling" and status == "completed":
                status = "cancelled"  # cancelled as its last lines finished
            if error is not None:
                job.batch["errors"] = {"object": "list", "data": [error]}
            self._finish(job, status)
            return copy.deepcopy(job.batch)

    def _finish(self, job: BatchJob, status: str) -> None:
        b, t = job.batch, now()
        b["finalizing_at"] = t
        name, made = {True: "output", False: "error"}, []
        self.bytes -= sum(len(text) for _, text in job.results.values())  # from here the files hold them
        for ok in (True, False):
            lines = [text for _, (good, text) in sorted(job.results.items()) if good is ok]
            if lines:
                f = StoredFile(new_id("file-"), f"{b['id']}_{name[ok]}.jsonl", "batch_output",
                               ("\n".join(lines) + "\n").encode(), created_at=t,
                               expires_at=t + job.output_expires_s if job.output_expires_s else None,
                               principal=job.principal)
                self.files[f.id] = f  # past the budget if need be: a batch's results are never dropped
                self.bytes += len(f.data)
                made.append(f)
                b["output_file_id" if ok else "error_file_id"] = f.id
        job.results = {line: (ok, "") for line, (ok, _) in job.results.items()}
        b.update(status=status, **{f"{status}_at": t})
        job.owner = None
        self._save(job, files=made, finished=True)

    def counts(self) -> dict[str, int]:
        """Batches by status, and the lines of running ones by state (for the metrics)."""
        with self._lock:
            out: dict[str, int] = {}
            pending = done = failed = 0
            for j in self.jobs.values():
                s = j.batch["status"]
                out[s] = out.get(s, 0) + 1
                if s in RUNNING:
                    c = j.batch["request_counts"]
                    pending += c["total"] - c["completed"] - c["failed"]
                    done += c["completed"]
                    failed += c["failed"]
            return {"batches": out, "requests": {"pending": pending, "completed": done, "failed": failed}}


class BatchStoreServer:
    """The Serve deployment holding the app's one MemoryBatchStore (and publishing its figures)."""

    def __init__(self, max_bytes: int, path: Optional[str] = None, metrics_s: float = 2.0):
        self.store = MemoryBatchStore(max_bytes, path=path)
        if metrics_s:
            threading.Thread(target=self._publish, args=(metrics_s,), name="metrics", daemon=True).start()

    def _publish(self, every_s: float) -> None:
        from observability.metrics import MetricsRecorder
        publish_counts(MetricsRecorder("ray"), self.store, every_s)

    def call(self, name: str, *args):
        return getattr(self.store, name)(*args)


def publish_counts(rec, store: MemoryBatchStore, every_s: float) -> None:
    """Sets the batch gauges every `every_s`, each status and state every time (an emptied one reads 0)."""
    statuses = RUNNING + ENDED
    while True:
        c = store.counts()
        for s in statuses:
            rec.set("gptoss_batches", c["batches"].get(s, 0), status=s)
        for state, n in c["requests"].items():
            rec.set("gptoss_batch_requests", n, state=state)
        rec.set("gptoss_batch_store_bytes", store.bytes)
        time.sleep(every_s)


class BatchStoreClient:
    """The MemoryBatchStore interface, async: over a BatchStoreServer handle, or a store in this process."""

    def __init__(self, store=None, handle=None):
        self.store, self.handle = store, handle

    async def call(self, name: str, *args):
        if self.handle is not None:
            return await self.handle.call.remote(name, *args)
        return getattr(self.store, name)(*args)
