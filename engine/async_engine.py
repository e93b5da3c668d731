"""The engine interface the Serve layer depends on, and its in-process implementation.

`AsyncEngine` runs `LLMEngine.step()` in one background thread (torch releases
the GIL in its kernels) and fans each step's outputs out to per-request asyncio
queues. If a step raises, every in-flight request ends with an error output
and the engine keeps serving: no stream is left hanging.

Callers never wait on that thread's lock: new requests and aborts go through an
inbox the thread applies between steps, and stats are a copy it refreshes. A lock
taken from the event loop would stall every stream for a step at a time, and,
not being fair, could lose to the stepping thread until a whole request finished
(a client's abort then landed only once its request had run to the end).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import AsyncIterator, Protocol

from .core import LLMEngine
from .request import EngineError, GenerateRequest, RequestOutput, merge_outputs

log = logging.getLogger(__name__)


class EngineClient(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]: ...
    def abort(self, request_id: str) -> None: ...
    def stats(self) -> dict: ...


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()  # the engine's state: held by the stepping thread, and by snapshot()
        self._work = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # (request, loop, future settled once it is added or refused) or a request id to abort, in order
        self._inbox: deque = deque()
        self._stats = engine.stats()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Yields step outputs until every choice of the request has finished.

        Raises `EngineError` (typed, before any compute) for a request that
        cannot run. Leaving the iterator early (client gone) aborts the request.
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = request.request_id
        if self._stopped:
            raise EngineError("the engine has stopped")
        if rid in self._queues:
            raise EngineError(f"duplicate request id '{rid}'")
        self._queues[rid] = (loop, q)  # before the add: its first step's outputs must find the queue
        added = loop.create_future()
        self._inbox.append((request, loop, added))
        self._work.set()
        try:
            await added  # the engine's refusal (EngineError) is raised here, before any compute
        except BaseException as e:
            self._queues.pop(rid, None)
            if not isinstance(e, EngineError):
                self.abort(rid)  # cancelled while waiting: the add may still land, the abort follows it
            raise
        pending = request.params.n
        # A consumer that falls behind the engine (a remote client, a busy event loop) gets the
        # steps it missed as one output per choice: per-item costs stay flat however fast the
        # engine runs. Chat logprobs are attributed per step, so those requests stay per step.
        coalesce = not request.params.logprobs
        backlog: deque[RequestOutput] = deque()
        held: dict[int, RequestOutput] = {}
        started: set[int] = set()
        try:
            while pending:
                if not backlog:
                    backlog.append(await q.get())
                while not q.empty():
                    backlog.append(q.get_nowait())
                out = backlog.popleft()
                while coalesce and backlog and backlog[0].index == out.index and not out.finished:
                    out = merge_outputs(out, backlog.popleft())
                i = out.index
                if i in held:
                    out = merge_outputs(held.pop(i), out)
                if request.hold and coalesce and i in started and not out.finished:
                    held[i] = out
                    continue
                started.add(i)
                if out.finished:
                    pending -= 1
                yield out
        finally:
            if pending:
                self.abort(rid)
            self._queues.pop(rid, None)

    def abort(self, request_id: str) -> None:
        self._queues.pop(request_id, None)  # nothing more is delivered from now on
        self._inbox.append(request_id)
        self._work.set()

    def stats(self) -> dict:
        """As of the last step (or add, or abort)."""
        return dict(self._stats)

    def snapshot(self) -> dict:
        """stats() plus the expert loads [layers, experts] and the all-to-all times
        since the last snapshot, taken between steps (rank workers answer one call at a time)."""
        with self._lock:
            ex = self.engine.executor
            return {**self.engine.stats(), "expert_load": self.engine.expert_load(),
                    "all_to_all": ex.comm_times() if hasattr(ex, "comm_times") else {}}

    def shutdown(self) -> None:
        self._stopped = True
        self._work.set()
        self._thread.join(timeout=10)

    def _deliver(self, out: RequestOutput) -> None:
        target = self._queues.get(out.request_id)
        if target is not None:
            loop, q = target
            _call_soon(loop, q.put_nowait, out)

    def _loop(self) -> None:
        while not self._stopped:
            self._work.wait()
            with self._lock:
                self._apply_inbox()
                if not self.engine.has_work():
                    self._work.clear()
                    if self._inbox:  # came after the inbox was read: its wake-up may predate the clear
                        self._work.set()
                    continue
                try:
                    outs = self.engine.step()
                except Exception as e:  # a failed step must not strand any stream
                    log.exception("engine step failed")
                    outs = self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                self._stats = self.engine.stats()
            for o in outs:
                self._deliver(o)
        self._refuse_inbox()

    def _apply_inbox(self) -> None:
        if not self._inbox:
            return
        settled = []
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, str):
                self.engine.abort(item)
                continue
            request, loop, added = item
            try:
                self.engine.add_request(request)
                settled.append((loop, added, None))
            except Exception as e:  # noqa: BLE001 - the caller's error (EngineError), raised in generate()
                settled.append((loop, added, e))
        self._stats = self.engine.stats()  # before the callers hear: stats() then counts their requests
        for loop, added, err in settled:
            _call_soon(loop, _settle, added, err)

    def _refuse_inbox(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if not isinstance(item, str):
                _call_soon(item[1], _settle, item[2], EngineError("the engine has stopped"))

    def _fail_all(self, msg: str) -> list[RequestOutput]:
        outs = []
        for rid, seqs in list(self.engine.seqs.items()):
            for s in seqs:
                if not s.finished:
                    outs.append(RequestOutput(rid, s.index, [], finished=True, finish_reason="error", error=msg))
            self.engine.abort(rid)
        return outs


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the caller's loop has closed: nobody to tell, and the stepping thread must live on
        pass


def _settle(fut: asyncio.Future, err) -> None:
    if not fut.done():  # its caller may have been cancelled
        fut.set_exception(err) if err is not None else fut.set_result(None)
