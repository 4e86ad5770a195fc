"""The step scheduler: which sessions' work goes into the next packed forward, and how much of it.

Pure and model-free: it sees one :class:`Want` per session that has model work ready (the next
decode token of an answer, a frame, a question or instruction prefill, a recall probe) and returns
a :class:`Plan` under the step's token budget. The engine core turns the plan into one
:class:`model.executor.Executor` step. The rules:

* **Across sessions, waiting goes first.** Work that was left out of the previous step is served
  before any that was not, so with ``max_step_tokens`` at least the number of sessions (each gets
  one token or one ``min_chunk``) no session waits more than one step while another runs.
* **Decode, then frames, then prefills**, among work that waited equally; ties rotate
  round-robin (``rr``).
* **Chunked prefills.** Every item first gets its minimum share (a decode token, or
  ``min_chunk`` rows of a frame or prefill); what is left of the budget then tops up the
  prefills in the same order. A prefill larger than the budget runs over several steps while
  the running answers advance every step.
* ``max_items`` caps the sessions per step: 1 is ``engine.batching: off``.

Within one session the order (the running answer's decode, else the latest frame, else the
next question) is the core's: a session has at most one operation, so one want, at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("decode", "frame", "prefill")


@dataclass(frozen=True)
class Want:
    """One session's ready work."""

    sid: str
    kind: str  # decode | frame | prefill
    tokens: int  # rows left to run
    waited: int = 0  # steps it has been ready and left out

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.tokens < 1:
            raise ValueError("a want needs at least one token")


@dataclass(frozen=True)
class Plan:
    """Rows to run per session this step (in the order they are packed), and who waits."""

    run: tuple[tuple[str, int], ...]
    waiting: tuple[str, ...]

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.run)

    def rows(self) -> dict[str, int]:
        return dict(self.run)


def plan_step(wants: list[Want], max_tokens: int, max_items: int | None = None, min_chunk: int = 32,
              rr: int = 0) -> Plan:
    """The next step's plan (see the module doc). ``wants`` in a stable session order; ``rr`` rotates it."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    n = len(wants)
    order = sorted(range(n), key=lambda i: (-wants[i].waited, KINDS.index(wants[i].kind), (i - rr) % max(n, 1)))
    cap = n if max_items is None else max_items
    min_chunk = max(1, min(min_chunk, max_tokens))
    budget = max_tokens
    given: dict[int, int] = {}
    for i in order:  # everyone's minimum share, waiting work first
        w = wants[i]
        share = 1 if w.kind == "decode" else min(w.tokens, min_chunk)
        if len(given) < cap and share <= budget:
            given[i] = share
            budget -= share
    for i in order:  # the rest of the budget tops up the chunked ones
        if budget <= 0:
            break
        if i in given and wants[i].kind != "decode":
            extra = min(wants[i].tokens - given[i], budget)
            given[i] += extra
            budget -= extra
    run = tuple((wants[i].sid, given[i]) for i in order if i in given)
    waiting = tuple(wants[i].sid for i in order if i not in given)
    return Plan(run, waiting)
