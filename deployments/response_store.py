"""Stored Responses: what `store` keeps and `previous_response_id` continues from.

A record is one response: the input items its request sent (each given an id), the
Response object returned, and the id of the response it continued. A conversation
is the chain of records back to its first; continuing one replays every link's
input and output items, oldest first (earlier `instructions` are not carried over,
as with OpenAI's API).

Memory is bounded by entries and bytes, evicting the least recently used record.
Using a record (storing, reading, continuing) also uses all its ancestors, just
after it, so an ancestor is always more recent than any of its descendants: what
gets evicted is always a leaf, and no stored record ever lacks an ancestor (short
of an explicit delete). An idle conversation is forgotten from its tip back.

A background run (deployments.background) keeps its record current while it runs
(`update`: the output so far and, for a streamed run, its SSE events, which
`events` hands to readers resuming the stream from another replica). An update never
overrides an ended record, so a late one cannot undo the run's final put or a cancel;
a record running without updates for `lost_s` (its ingress replica died) reads as failed.

Conversations (deployments.conversations) live in the same LRU and byte budget, as
StoredConversation records (ids `conv_...` beside `resp_...`), edited in place by
`edit` so that two responses adding to one conversation at once both land; so do chat
completions created with `store: true` (deployments.stored_chats), StoredChatCompletion
records (`chatcmpl-...`), which `query` lists where they are held.

`MemoryResponseStore` is the store of one process; the Ray Serve app runs one in a
single-replica deployment (`ResponseStoreServer`) that every ingress replica
shares through `RemoteResponseStore`, so any replica can continue any response.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Sequence

from .api_common import APIError, error_fields, sse

_RUNNING = ("queued", "in_progress")  # a background run's statuses before it ends


class ResponseNotFound(KeyError):
    """`missing` is the id not stored: the one asked for, or an ancestor of it."""

    def __init__(self, missing: str):
        super().__init__(missing)
        self.missing = missing


@dataclass
class StoredResponse:
    kind: ClassVar[str] = "response"
    id: str
    previous_id: Optional[str]
    input: list[dict]  # the input items of this request only, with ids
    response: dict  # the Response object as the client got it
    events: Optional[list[str]] = None  # a background stream's SSE events; index = sequence_number
    principal: Optional[str] = None  # the creating API key's digest (api_common.principal); None: no keys
    size: int = field(default=0, compare=False)
    beat: float = field(default=0.0, compare=False)  # the store's clock at its last put or update
    saved: float = field(default=0.0, compare=False)  # ... at its last write to the file

    def __post_init__(self):
        if not self.size:
            self.size = self.measure()

    def measure(self) -> int:
        return len(json.dumps(self.input)) + len(json.dumps(self.response)) + sum(map(len, self.events or ()))


@dataclass
class StoredConversation:
    kind: ClassVar[str] = "conversation"
    id: str
    created_at: int
    metadata: dict
    items: list[dict]  # oldest first, each with an id
    principal: Optional[str] = None  # as StoredResponse's
    size: int = field(default=0, compare=False)
    beat: float = field(default=0.0, compare=False)
    saved: float = field(default=0.0, compare=False)
    previous_id = None  # no chain: a conversation is one record

    def __post_init__(self):
        if not self.size:
            self.size = len(json.dumps(self.items)) + len(json.dumps(self.metadata))

    def object(self) -> dict:
        return {"id": self.id, "object": "conversation", "created_at": self.created_at, "metadata": self.metadata}


@dataclass
class StoredChatCompletion:
    """A chat completion created with `store: true` (deployments.stored_chats): what it answered, the messages
    it was asked, and whose it is."""
    kind: ClassVar[str] = "chat_completion"
    id: str
    at: float  # wall-clock creation time, finer than the object's `created` seconds: the list's order
    principal: Optional[str]  # the creating API key's digest (api_common.principal); None: no keys
    completion: dict  # the chat.completion object, `metadata` included
    messages: list[dict]  # the request's messages, each with an id
    size: int = field(default=0, compare=False)
    beat: float = field(default=0.0, compare=False)
    saved: float = field(default=0.0, compare=False)
    previous_id = None

    def __post_init__(self):
        if not self.size:
            self.size = len(json.dumps(self.completion)) + len(json.dumps(self.messages))


RECORD_KINDS = {c.kind: c for c in (StoredResponse, StoredConversation, StoredChatCompletion)}


class MemoryResponseStore:
    """Bounded, thread-safe LRU of StoredResponse records (see the module docstring)."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 256 << 20, path: Optional[str] = None,
                 lost_s: float = 30.0, save_every_s: float = 5.0):
        """path: a file the records are also written to (deployments.store_file), and read back from
        here when it exists; lost_s: a running (background) response not updated for this long is failed;
        save_every_s: how often a running response's progress is written to the file (its start and end
        always are): after a restart of the whole app, it is failed with what it had by then."""
        self.max_entries, self.max_bytes, self.lost_s = max_entries, max_bytes, lost_s
        self.save_every_s = save_every_s
        self._records: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            from .store_file import StoreFile
            self._file = StoreFile(path)
            for rec in self._file.load():
                rec.beat = time.monotonic()
                self._records[rec.id] = rec
                self._bytes += rec.size
            for rid in list(self._records):
                self._touch(rid)  # ancestors after their descendants again (the file has write order)
            self._evict()

    def __len__(self) -> int:
        return len(self._records)

    @property
    def bytes(self) -> int:
        return self._bytes

    def counts(self) -> dict[str, int]:
        """Records held, by kind (response, conversation, chat_completion)."""
        with self._lock:
            out = dict.fromkeys(RECORD_KINDS, 0)
            for r in self._records.values():
                out[r.kind] += 1
            return out

    def query(self, fn: Callable[[list], object]):
        """fn(the records, least recently used first), run under the store's lock where the records are
        (a list page is built next to them, not shipped whole to the caller)."""
        with self._lock:
            return fn(list(self._records.values()))

    def _chain(self, rid: str) -> list[StoredResponse]:
        """The record and its ancestors, newest first; raises ResponseNotFound on a gap."""
        out, seen, cur = [], set(), rid
        while cur is not None:
            rec = self._records.get(cur)
            if not isinstance(rec, StoredResponse) or cur in seen:
                raise ResponseNotFound(cur)
            seen.add(cur)
            out.append(rec)
            cur = rec.previous_id
        return out

    def _use(self, chain: list[StoredResponse]) -> None:
        for rec in chain:  # newest first: each ancestor ends up more recent than its descendants
            self._records.move_to_end(rec.id)

    def put(self, rec: StoredResponse) -> bool:
        """Stores `rec`; False when it alone exceeds the byte budget (nothing is evicted for it)."""
        with self._lock:
            if rec.size > self.max_bytes or self.max_entries < 1:
                return False
            old = self._records.pop(rec.id, None)
            if old is not None:
                self._bytes -= old.size
            self._records[rec.id] = rec
            self._bytes += rec.size
            rec.beat = time.monotonic()
            self._write(rec)
            return self._settle(rec.id)

    def _write(self, rec) -> None:
        if self._file is not None:
            self._file.save(rec)
            rec.saved = time.monotonic()

    def _touch(self, rid: str) -> None:
        try:
            self._use(self._chain(rid))
        except ResponseNotFound:
            self._records.move_to_end(rid)  # its ancestor was deleted meanwhile: it can be read, not continued

    def _settle(self, rid: str) -> bool:
        """Uses `rid` (and its chain), then evicts down to the budget; whether `rid` is still stored."""
        self._touch(rid)
        self._evict()
        return rid in self._records

    def _evict(self) -> None:
        gone = []
        while len(self._records) > self.max_entries or self._bytes > self.max_bytes:
            _, rec = self._records.popitem(last=False)
            self._bytes -= rec.size
            gone.append(rec.id)
        if gone and self._file is not None:
            self._file.drop(gone)

    def update(self, rid: str, response: Optional[dict], start: int = 0,
               events: Sequence[str] = ()) -> Optional[tuple[str, int]]:
        """A running response's progress: its Response object so far (None: unchanged) and its events from
        sequence number `start` on. Applied only while the stored record is `in_progress`. Returns the stored
        status after the call (`cancelled`: another replica cancelled the run) and how many events it holds
        (where the next update starts: fewer than sent after the store restarted), or None when not stored."""
        with self._lock:
            rec = self._records.get(rid)
            if not isinstance(rec, StoredResponse):
                return None
            if rec.response["status"] not in _RUNNING:
                return rec.response["status"], len(rec.events or ())
            grow = 0
            if response is not None:
                grow += len(json.dumps(response)) - len(json.dumps(rec.response))
                rec.response = response
            if events and rec.events is not None and start <= len(rec.events):
                grow += sum(map(len, events)) - sum(map(len, rec.events[start:]))
                rec.events[start:] = events
            rec.size += grow
            self._bytes += grow
            rec.beat = time.monotonic()
            if rec.beat - rec.saved >= self.save_every_s:
                self._write(rec)
            return (rec.response["status"], len(rec.events or ())) if self._settle(rid) else None

    def events(self, rid: str, start: int) -> Optional[tuple[str, Optional[list[str]]]]:
        """(status, the events from sequence number `start` on or None for a record without events), or None
        when not stored."""
        with self._lock:
            rec = self._records.get(rid)
            if not isinstance(rec, StoredResponse):
                return None
            self._touch(rid)
            self._expire(rec)
            return rec.response["status"], None if rec.events is None else rec.events[start:]

    def get(self, rid: str) -> StoredResponse:
        with self._lock:
            rec = self._records.get(rid)
            if rec is None:
                raise ResponseNotFound(rid)
            self._touch(rid)
            self._expire(rec)
            return rec

    def _expire(self, rec) -> None:
        """A running response not heard from for lost_s: the replica running it died, so it is failed (and a
        stream's readers get the events a failed stream ends with)."""
        r = rec.response if isinstance(rec, StoredResponse) else None
        if r is None or r.get("status") not in _RUNNING or time.monotonic() - rec.beat < self.lost_s:
            return
        err = APIError(500, "the server running this response stopped before it ended", code="server_error")
        r.update(status="failed", error={"code": err.code, "message": err.message})
        if rec.events is not None:
            n = len(rec.events)
            tail = [{"type": "response.failed", "sequence_number": n, "response": r},
                    {"type": "error", "sequence_number": n + 1, **error_fields(err)}]
            rec.events.extend(sse(ev, ev["type"]) for ev in tail)
        grow = rec.measure() - rec.size
        rec.size += grow
        self._bytes += grow
        self._write(rec)

    def chain(self, rid: str) -> list[StoredResponse]:
        """The conversation that ends at `rid`, oldest first."""
        with self._lock:
            links = self._chain(rid)
            self._use(links)
            return links[::-1]

    def delete(self, rid: str) -> bool:
        with self._lock:
            rec = self._records.pop(rid, None)
            if rec is not None:
                self._bytes -= rec.size
                if self._file is not None:
                    self._file.drop([rid])
            return rec is not None

    def edit(self, cid: str, add: Sequence[dict] = (), remove: Optional[str] = None,
             metadata: Optional[dict] = None) -> Optional[tuple[dict, bool]]:
        """A conversation's atomic edit: items appended, the item `remove` dropped, metadata replaced.
        Returns (the conversation object, whether `remove` named an item), or None when not stored."""
        with self._lock:
            rec = self._records.get(cid)
            if not isinstance(rec, StoredConversation):
                return None
            grow, removed = sum(len(json.dumps(it)) for it in add), False
            rec.items.extend(add)
            if remove is not None:
                for i, it in enumerate(rec.items):
                    if it.get("id") == remove:
                        grow -= len(json.dumps(rec.items.pop(i)))
                        removed = True
                        break
            if metadata is not None:
                grow += len(json.dumps(metadata)) - len(json.dumps(rec.metadata))
                rec.metadata = metadata
            rec.size += grow
            self._bytes += grow
            rec.beat = time.monotonic()
            self._write(rec)
            obj = rec.object()
            return (obj, removed) if self._settle(cid) else None


class ResponseStoreServer:
    """The Serve deployment that holds the app's one MemoryResponseStore (and publishes its size)."""

    def __init__(self, max_entries: int, max_bytes: int, path: Optional[str] = None, metrics_s: float = 2.0):
        self.store = MemoryResponseStore(max_entries, max_bytes, path)
        if metrics_s:
            threading.Thread(target=self._publish, args=(metrics_s,), name="metrics", daemon=True).start()

    def _publish(self, every_s: float) -> None:
        from observability.metrics import MetricsRecorder
        rec = MetricsRecorder("ray")
        while True:
            for kind, n in self.store.counts().items():
                rec.set("gptoss_stored_records", n, kind=kind)
            rec.set("gptoss_response_store_bytes", self.store.bytes)
            time.sleep(every_s)

    def put(self, rec: StoredResponse) -> bool:
        return self.store.put(rec)

    def get(self, rid: str) -> Optional[StoredResponse]:
        try:
            return self.store.get(rid)
        except ResponseNotFound:
            return None

    def chain(self, rid: str) -> tuple[Optional[str], list[StoredResponse]]:
        """(the missing id or None, the chain); errors stay values so no Ray exception wraps them."""
        try:
            return None, self.store.chain(rid)
        except ResponseNotFound as e:
            return e.missing, []

    def delete(self, rid: str) -> bool:
        return self.store.delete(rid)

    def update(self, rid: str, response: Optional[dict], start: int, events: list[str]):
        return self.store.update(rid, response, start, events)

    def edit(self, cid: str, add: list[dict], remove: Optional[str], metadata: Optional[dict]):
        return self.store.edit(cid, add, remove, metadata)

    def events(self, rid: str, start: int):
        return self.store.events(rid, start)

    def query(self, fn):
        return self.store.query(fn)


class RemoteResponseStore:
    """The MemoryResponseStore interface, async, over a ResponseStoreServer handle."""

    def __init__(self, handle):
        self.handle = handle

    async def put(self, rec: StoredResponse) -> bool:
        return await self.handle.put.remote(rec)

    async def get(self, rid: str) -> StoredResponse:
        rec = await self.handle.get.remote(rid)
        if rec is None:
            raise ResponseNotFound(rid)
        return rec

    async def chain(self, rid: str) -> list[StoredResponse]:
        missing, links = await self.handle.chain.remote(rid)
        if missing is not None:
            raise ResponseNotFound(missing)
        return links

    async def delete(self, rid: str) -> bool:
        return await self.handle.delete.remote(rid)

    async def update(self, rid: str, response: Optional[dict], start: int, events: list[str]) -> Optional[str]:
        return await self.handle.update.remote(rid, response, start, events)

    async def events(self, rid: str, start: int):
        return await self.handle.events.remote(rid, start)

    async def edit(self, cid: str, add: list[dict] = (), remove: Optional[str] = None, metadata: Optional[dict] = None):
        return await self.handle.edit.remote(cid, list(add), remove, metadata)

    async def query(self, fn):
        return await self.handle.query.remote(fn)
