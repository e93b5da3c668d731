"""Stop strings over streamed text: the engine's requests and the chat API's final-channel content use it."""

from __future__ import annotations

from typing import Sequence


class StopChecker:
    """Incremental stop-string detection over detokenized text deltas.

    Text that might be the beginning of a stop string is held back until it is
    either completed (then dropped: stop text is never emitted) or ruled out
    (then released), so a client never sees part of a stop sequence.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stops = [s for s in stop if s]
        self.matched: str | None = None  # the stop string that fired
        self._held = ""

    stopped = property(lambda self: self.matched is not None)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        buf = self._held + delta
        # Earliest match wins; a match can only start inside the held suffix or
        # the new delta, because every earlier position was ruled out already.
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) != -1]
        if hits:
            i, s = min(hits, key=lambda h: h[0])
            self.matched, self._held = s, ""
            return buf[:i], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold:]
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """At end of generation: release held-back text (nothing after a stop)."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out
