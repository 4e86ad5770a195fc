"""Frames are preprocessed (resized, normalized, patchified) on a small thread pool owned by the core, on
their way into a session's latest-frame slot, so no frame's preprocessing runs on the model's thread in
front of other sessions' work.

At most one frame per session is preprocessed at a time (a flooding client costs one preprocessing at a
time) and the slot always ends up with the newest frame made. The pool touches no session state: the
core starts a frame here (:meth:`Preprocessing.feed`, on its thread) and gets it back as a message in its
inbox (``done``), which it applies between steps like any command.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .state import CoreSession, PendingFrame


@dataclass(frozen=True)
class Prepared:
    """A frame's preprocessing ended: the message a preprocessing thread posts to the core's inbox."""

    sid: str
    pending: PendingFrame
    fut: Future


class Preprocessing:
    """The core's preprocessing threads (see the module doc)."""

    def __init__(self, threads: int, done: Callable[[Prepared], None]):
        # (no torch.set_num_threads in these threads: OpenMP can deadlock in it, pytorch/pytorch#75147)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="vl3live-prep")
        self._done = done

    def feed(self, session: CoreSession) -> None:
        """(Core thread.) Start preprocessing the newest frame unless one of the session's is under way."""
        if session.closed or session.incoming is None or session.preparing is not None:
            return
        pending, session.incoming = session.incoming, None
        try:
            fut = self._pool.submit(pending.prepared_by.prepare, pending.rgb)
        except RuntimeError:  # shutting down: the model thread preprocesses it
            if session.frame is not None:
                session.count("dropped")
            session.frame = pending
            return
        session.preparing = pending
        fut.add_done_callback(lambda f: self._done(Prepared(session.id, pending, f)))

    def prepared(self, session: CoreSession, done: Prepared) -> None:
        """(Core thread.) A frame's preprocessing ended: it becomes the session's latest frame, and the next
        one (a newer frame that came meanwhile) starts."""
        pending = done.pending
        if session.preparing is not pending:  # (the session closed meanwhile: counted dropped then)
            return
        session.preparing = None
        pending.prepared = done.fut
        if session.frame is not None:  # the newest wins
            session.count("dropped")
        session.frame = pending
        self.feed(session)

    def shutdown(self) -> None:
        self._pool.shutdown(True, cancel_futures=True)
