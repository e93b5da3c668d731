"""kernels.tune's compile workers, with a queue in front of them so that compiling runs ahead of timing."""

from __future__ import annotations

import json
import os
import time
from collections import deque


def _lower_priority() -> None:
    """Compile workers yield the CPU to the timing process: its launches between do_bench's CUDA events
    must not wait for a core (a late launch is timed as GPU idle)."""
    try:
        os.nice(10)
    except (AttributeError, OSError):
        pass


class CompilePool:
    """Compile workers: separate processes both for the cores and because Triton imported under
    TRITON_INTERPRET=1 (the dry run) can no longer compile for a GPU (kernels.aot._compiler_usable).

    A queue in front of them: `submit` queues jobs for later (the next tasks' candidates), `results` yields
    a sweep's in order, each as soon as it is compiled, and puts any of them not yet started at the head
    of the queue. At most two jobs a worker are handed to the pool at a time, so what a sweep asks for
    next (its phase 2) waits behind a few compiles, not behind everything queued."""

    def __init__(self, n: int):
        import multiprocessing as mp
        saved = os.environ.pop("TRITON_INTERPRET", None)
        try:  # spawned workers inherit the environment as it is now
            self.pool = mp.get_context("spawn").Pool(n, initializer=_lower_priority)
        finally:
            if saved is not None:
                os.environ["TRITON_INTERPRET"] = saved
        self.n = n
        self._queued: deque[tuple[str, object, dict]] = deque()
        self._started: dict[str, object] = {}  # key -> multiprocessing AsyncResult
        self.waited = 0.0  # seconds `results` spent blocked on compiles (the rest of a sweep is timing)

    @staticmethod
    def _key(fn, job: dict) -> str:
        return f"{fn.__module__}.{fn.__qualname__}:{json.dumps(job, sort_keys=True)}"

    def _fill(self) -> None:
        busy = sum(not r.ready() for r in self._started.values())
        while self._queued and busy < 2 * self.n:
            key, fn, job = self._queued.popleft()
            self._started[key] = self.pool.apply_async(fn, (job,))
            busy += 1

    def submit(self, fn, jobs: list[dict], first: bool = False) -> None:
        """Queue the jobs not yet queued or started: at the tail, or (first) at the head, in order."""
        keys = [self._key(fn, j) for j in jobs]
        if first:
            wanted = set(keys)
            self._queued = deque(q for q in self._queued if q[0] not in wanted)
        queued, new = {q[0] for q in self._queued}, []
        for k, j in zip(keys, jobs):
            if k not in self._started and k not in queued:
                new.append((k, fn, j))
                queued.add(k)
        if first:
            self._queued.extendleft(reversed(new))
        else:
            self._queued.extend(new)
        self._fill()

    def results(self, fn, jobs: list[dict]):
        """fn(job) for each job, in order, each as soon as it is ready."""
        self.submit(fn, jobs, first=True)
        for job in jobs:
            key = self._key(fn, job)
            t0 = time.perf_counter()
            while key not in self._started:  # behind jobs handed out before (prefetched ones): wait for a slot
                if all(q[0] != key for q in self._queued):  # a repeat of one this loop already took
                    self._queued.appendleft((key, fn, job))
                self._fill()
                if key not in self._started:
                    time.sleep(0.005)
            out = self._started.pop(key).get()
            self.waited += time.perf_counter() - t0
            self._fill()
            yield out

    def close(self):
        self.pool.terminate()
