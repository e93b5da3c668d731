"""Reading one reply per rank without waiting out a rank that will never answer.

Every rank runs every message, so when one rank fails before a collective its
peers sit in that collective until the backend's own timeout (minutes). The
driver therefore watches all ranks at once: after the first failure it gives
the others a short grace to answer (a failure after the collectives lets them
finish), and if some stay busy the group is out of step for good: it is marked
broken, later calls fail at once, and the owner restarts it (a Serve replica
reports itself unhealthy). The same holds for a rank that does not answer
within the call's timeout, since its late reply would be read as the answer to
the next message.
"""

from __future__ import annotations

import time
from collections.abc import Callable

FAILURE_GRACE_S = 20.0  # after a rank fails, how long its peers may take to answer


class WorkerError(RuntimeError):
    """A rank worker failed; the message carries its traceback, `summary` says it in one line."""

    def __init__(self, message: str, summary: str | None = None):
        super().__init__(message)
        self.summary = summary or message.splitlines()[0]


class GroupBroken(WorkerError):
    """The ranks are out of step (some never answered): the group must be restarted."""


# wait(pending ranks, seconds) -> (rank, ok, payload) for each rank that answered meanwhile (maybe none)
Wait = Callable[[list[int], float], list[tuple[int, bool, object]]]


def gather(n: int, wait: Wait, what: str, timeout: float, grace: float = FAILURE_GRACE_S) -> list:
    """Every rank's reply in rank order; raises WorkerError for a failed rank once all have
    answered, GroupBroken when some rank has not answered in time."""
    out: list = [None] * n
    pending = list(range(n))
    errors, causes, failed_at = [], [], 0.0
    deadline = time.monotonic() + timeout
    while pending:
        end = deadline if not errors else min(deadline, failed_at + grace)
        left = end - time.monotonic()
        if left <= 0:
            break
        for r, ok, payload in wait(list(pending), left):
            pending.remove(r)
            out[r] = payload
            if not ok:  # every failed rank is named: which one failed first may be a race
                failed_at = failed_at or time.monotonic()
                errors.append(f"rank {r} failed on '{what}':\n{payload}")
                last = (str(payload).strip().splitlines() or [""])[-1]  # a traceback's exception line
                causes.append(f"rank {r} failed on '{what}' ({last})")
    error, cause = "\n".join(errors), "; ".join(causes)
    if pending:
        if errors:
            raise GroupBroken(f"{error}\nranks {pending} were still busy {grace:.0f} s later (waiting in a "
                              "collective the failed rank never joined): the rank group must be restarted",
                              f"{cause}; ranks {pending} never answered")
        raise GroupBroken(f"ranks {pending} did not answer '{what}' within {timeout:.0f} s: "
                          "the rank group must be restarted", f"ranks {pending} did not answer '{what}' in time")
    if errors:
        raise WorkerError(error, cause)
    return out


class BrokenGuard:
    """Remembers that a group broke, so that every later call fails at once with the cause."""

    def __init__(self):
        self.broken: str | None = None

    def fail(self, summary: str) -> GroupBroken:
        """Mark the group broken (e.g. a rank could not be sent its message); the error to raise."""
        self.broken = self.broken or summary
        return GroupBroken(f"the rank group is broken and must be restarted: {summary}", summary)

    def check(self) -> None:
        if self.broken is not None:
            raise GroupBroken(f"the rank group is broken and must be restarted: {self.broken}", self.broken)

    def gather(self, n: int, wait: Wait, what: str, timeout: float, grace: float) -> list:
        self.check()
        try:
            return gather(n, wait, what, timeout, grace)
        except GroupBroken as e:
            self.broken = e.summary
            raise
