"""Frame preprocessing off the model thread: resize, normalize and patchify on a small thread pool.

Never on the model thread in front of other sessions' steps. One frame at a time per session: the
newest frame waits (``incoming``, replaced by newer ones) while another is preprocessed
(``preparing``), then replaces the one in the slot (``frame``). A session flooding frames costs at
most one preprocessing at a time, and its slot always holds the newest frame made, ready when the
session's turn comes. Every replaced frame is counted as dropped.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from .engine_session import EngineSession


class Preprocessing:
    """The preprocessing threads; ``lock`` is the model worker's (it guards every session's slot)."""

    def __init__(self, threads: int, lock: threading.Condition):
        # (no torch.set_num_threads in these threads: OpenMP can deadlock in it, pytorch/pytorch#75147)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="vl3live-prep")
        self._lock = lock

    def feed(self, session: EngineSession) -> None:
        """Under the lock: start preprocessing the newest frame unless one of the session's is under way."""
        if session.closed or session.incoming is None or session.preparing is not None:
            return
        pending, session.incoming = session.incoming, None
        try:
            fut = self._pool.submit(pending.prepared_by.prepare, pending.frame.rgb)
        except RuntimeError:  # shutting down: the model thread preprocesses it
            if session.frame is not None:
                session.count("dropped")
            session.frame = pending
            return
        session.preparing = pending
        fut.add_done_callback(lambda f: self._prepared(session, f))

    def _prepared(self, session: EngineSession, fut: Future) -> None:
        """A frame's preprocessing ended (on its thread): it becomes the session's latest frame."""
        with self._lock:
            pending, session.preparing = session.preparing, None
            if pending is None:
                return
            pending.prepared = fut
            if session.closed:
                session.count("dropped")
            else:
                if session.frame is not None:  # the newest wins
                    session.count("dropped")
                session.frame = pending
                self.feed(session)  # a newer frame came meanwhile
            self._lock.notify_all()

    def shutdown(self) -> None:
        self._pool.shutdown(True, cancel_futures=True)
