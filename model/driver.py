"""The one driver of a session operation, used by a lone ``StreamSession`` and by the engine core.

A session's model work is written as *operations* (``StreamSession.begin_frame`` / ``begin_answer``):
generators that yield each :class:`~model.executor.Forward` they need and get it back run (or its error
thrown in), and yield each answer token as a :class:`~model.answering.TokenDelta`. :func:`advance` is one
move of that protocol; :func:`drive` runs an operation alone, each forward at once; the engine core
runs many operations' forwards together, one packed step at a time, with the same :func:`advance`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

from .executor import Forward

FORWARD, TOKEN, DONE = "forward", "token", "done"


def advance(op: Generator, item: Forward | None = None) -> tuple[str, object]:
    """Hand ``op`` the forward it asked for, run (its error is thrown in instead), or None after a token;
    return what it does next: ``(FORWARD, Forward)``, ``(TOKEN, TokenDelta)`` or ``(DONE, result)``."""
    try:
        out = op.throw(item.error) if item is not None and item.error is not None else op.send(item)
    except StopIteration as stop:
        return DONE, stop.value
    return (FORWARD, out) if isinstance(out, Forward) else (TOKEN, out)


def drive(op: Generator, run: Callable[[Forward], None]) -> Generator[object, None, object]:
    """Run ``op`` alone: each forward with ``run`` at once; its tokens pass through; returns its result.
    Closing this generator closes the operation (an answer ends where it got to)."""
    item = None
    try:
        while True:
            kind, out = advance(op, item)
            if kind == DONE:
                return out
            if kind == FORWARD:
                run(out)
                item = out
            else:
                item = None
                yield out
    finally:
        op.close()
