"""Draft tokens from a predicted output (OpenAI's Predicted Outputs: `prediction` on chat completions).

A request that knows most of its answer (a file with a few lines edited, a document re-emitted with
changes) sends it as a prediction. Each step the engine proposes the tokens the prediction has after
the point the output has reached, computes them together with the step's own token, samples every
position, and keeps the longest run on which sampling agreed with the draft, plus the token sampled
after it (engine.core). A position's sample is drawn from the model's distribution given the tokens
before it, and is kept only if every draft token before it was, so the output has the distribution
(greedy: the tokens) it would have had without a prediction; a good prediction turns many steps into
one, a bad one costs the draft positions' compute.

Where the output stands in the prediction: a cursor that follows the output while it agrees with
the prediction, and, once it leaves, the prediction's next place (from the cursor on, else anywhere)
where the output's last `n` tokens occur, for the longest `n` up to `max_ngram` that occurs.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .request import RequestOutput, Sequence


class DraftProposer:
    def __init__(self, reference: list[int], max_draft: int = 8, max_ngram: int = 4, min_ngram: int = 2):
        self.ref = list(reference)
        self.max_draft, self.max_ngram, self.min_ngram = max_draft, max_ngram, min_ngram
        self.cursor: int | None = None   # index in ref of the token the output is expected to produce next
        self.last = 0                    # how far in ref the output last got (re-syncing prefers what follows)
        self.tail: deque[int] = deque(maxlen=max_ngram)
        # n-gram -> the ref positions just after its occurrences, in order
        self.index: dict[tuple[int, ...], list[int]] = {}
        for n in range(min_ngram, max_ngram + 1):
            for end in range(n, len(self.ref) + 1):
                self.index.setdefault(tuple(self.ref[end - n:end]), []).append(end)

    def advance(self, tokens: list[int]) -> None:
        """The output grew by `tokens`."""
        for t in tokens:
            self.tail.append(t)
            if self.cursor is not None:
                if self.cursor < len(self.ref) and self.ref[self.cursor] == t:
                    self.cursor += 1
                    self.last = self.cursor
                else:
                    self.cursor = None

    def _resync(self) -> int | None:
        tail = list(self.tail)
        for n in range(min(len(tail), self.max_ngram), self.min_ngram - 1, -1):
            ends = self.index.get(tuple(tail[-n:]))
            if ends:
                return next((e for e in ends if e - n >= self.last), ends[0])
        return None

    def propose(self, limit: int) -> list[int]:
        """Up to min(limit, max_draft) tokens the prediction expects next (none where it has no idea)."""
        if self.cursor is None:
            self.cursor = self._resync()
        if self.cursor is None or limit <= 0:
            return []
        return self.ref[self.cursor:self.cursor + min(limit, self.max_draft)]


def settle(s: Sequence, out: RequestOutput, kept: int, drafted: int, max_model_len: int) -> None:
    """After a step of a sequence with a prediction, which drafted `drafted` tokens and kept `kept` of them
    (`out` holds the step's tokens): the rejected positions are computed again, the counts go to the usage,
    and the next draft is what the prediction expects next, within the sequence's length cap (the step's own
    token comes after it) and as far as its grammar allows."""
    s.num_computed -= drafted - kept
    s.accepted_draft += kept
    s.rejected_draft += drafted - kept
    if out.usage is not None:
        out.usage.accepted_prediction_tokens = s.accepted_draft
        out.usage.rejected_prediction_tokens = s.rejected_draft
    if s.finished:
        return
    s.proposer.advance(out.token_ids)
    draft = s.proposer.propose((s.max_len or max_model_len) - len(s.tokens) - 1)
    if draft and s.matcher is not None:
        draft = draft[:s.matcher.valid_prefix(draft)]
    s.draft = draft
