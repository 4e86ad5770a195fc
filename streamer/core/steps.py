"""The core's steps: which operation each session runs next, one packed step over all of them, and what
each finished forward emits. A part of :class:`~streamer.core.engine_core.EngineCore` (its state is the
core's, touched on the core's thread only), kept apart from the commands it applies between steps.

Every session with model work has one operation in progress (``StreamSession.begin_frame`` /
``begin_answer``), chosen in this order: the answer being generated; else the latest frame (and then the
proactive decision); else the next question. Each operation's next forward is a ``Want``;
:func:`plan_step` picks what runs under ``engine.max_step_tokens``; the executor runs it as one vision
call and one packed forward; each operation whose forward finished is advanced
(:func:`model.driver.advance`) to its next one, emitting its events. A failure is that operation's alone.
"""

from __future__ import annotations

import logging
import time

from model import CacheLimitError
from model.driver import DONE, FORWARD, advance
from model.executor import Forward

from ..events import Error, FrameStats
from .answers import Answer, proactive_question
from .scheduler import Want, plan_step
from .state import CoreSession, PendingFrame, PendingQuestion

log = logging.getLogger(__name__)


class Task:
    """A session's operation in progress and the forward it waits for."""

    def __init__(self, session: CoreSession, op, frame: PendingFrame | None = None, answer: Answer | None = None):
        self.session, self.op, self.frame, self.answer = session, op, frame, answer
        self.work: Forward | None = None
        self.waited = 0



class Steps:
    """The step half of the engine core (see the module doc)."""

    # -- steps ------------------------------------------------------------------------------------
    def _start_operations(self) -> None:
        """The next operation of each session that has none (frame before question)."""
        for session in list(self._sessions.values()):
            if session.id in self._tasks:
                continue
            if session.frame is not None:
                frame, session.frame = session.frame, None
                session.in_step = True
                self._start_frame(session, frame)
            elif session.question_ready():
                self._start_answer(session, session.questions.popleft())

    def _step(self) -> None:
        for task in [t for t in self._tasks.values() if t.answer is not None and t.answer.cancelled]:
            self._close_answer(task)
        tasks = [t for t in self._tasks.values() if t.work is not None]
        if not tasks:
            return
        wants = [Want(t.session.id, t.work.kind, t.work.left, t.waited) for t in tasks]
        plan = plan_step(wants, self.config.max_step_tokens, None if self.config.batching else 1,
                         self.config.min_chunk_tokens, self._rr)
        self._rr += 1
        rows = plan.rows()
        run = []
        for t in tasks:
            if t.session.id in rows:
                t.work.chunk = rows[t.session.id]
                t.waited = 0
                run.append(t)
            else:
                t.waited += 1
        started = time.perf_counter()
        self.executor.run([t.work for t in run])
        model_ms = (time.perf_counter() - started) * 1e3
        self.steps += 1
        self.step_items += len(run)
        for t in run:
            if t.work.finished:
                item, t.work = t.work, None
                self._advance(t, item)
        self._ran = (rows, model_ms)

    # -- operations -------------------------------------------------------------------------------
    def _advance(self, task: Task, item: Forward | None = None) -> None:
        """Run the task's operation (:func:`model.driver.advance`) to its next forward, emitting its tokens; at
        its end, finish the task."""
        while True:
            try:
                kind, out = advance(task.op, item)
            except Exception as exc:
                self._fail(task, exc)
                return
            if kind == FORWARD:
                task.work = out
                return
            if kind == DONE:
                self._finish(task, out)
                return
            self._out.events.extend(task.answer.token(task.session.id, out.text))
            if task.answer.cancelled:
                self._close_answer(task)
                return
            item = None

    def _start_frame(self, session: CoreSession, pending: PendingFrame) -> None:
        s = session.stream
        try:
            op = s.begin_frame(pending.pixels_for(s), pending.pts)
        except Exception as exc:
            self._frame_failed(session, pending, exc)
            return
        task = Task(session, op, frame=pending)
        self._tasks[session.id] = task
        self._advance(task)

    def _frame_failed(self, session: CoreSession, pending: PendingFrame, exc: BaseException) -> None:
        if not isinstance(exc, (ValueError, CacheLimitError)):
            log.error("session %s: frame at t=%s failed", session.id, pending.pts, exc_info=exc)
        code = "cache_limit" if isinstance(exc, CacheLimitError) else \
            "bad_frame" if isinstance(exc, ValueError) else "internal"
        session.in_step = False
        session.count("refused")
        session.errors += 1
        self._emit(Error(session=session.id, t=pending.pts, code=code, message=str(exc), event_id=pending.event_id))

    def _finish(self, task: Task, result: object) -> None:
        self._tasks.pop(task.session.id, None)
        if task.frame is not None:
            self._ingested(task.session, task.frame, result)
        else:
            self._answer_done(task)

    def _fail(self, task: Task, exc: BaseException) -> None:
        self._tasks.pop(task.session.id, None)
        task.work = None
        try:
            task.op.close()
        except Exception:
            log.exception("session %s: closing a failed operation", task.session.id)
        session = task.session
        if task.frame is not None:
            self._frame_failed(session, task.frame, exc)
            return
        a = task.answer
        if isinstance(exc, CacheLimitError):
            self._emit(Error(session=session.id, t=a.t, code="cache_limit", message=str(exc), event_id=a.q.event_id))
        else:  # any other failure ends this answer, never the session
            log.error("session %s: answer %s failed", session.id, a.q.response_id, exc_info=exc)
            session.errors += 1
            self._emit(Error(session=session.id, t=a.t, code="internal", message=f"the answer failed: {exc}",
                             event_id=a.q.event_id))
        self._answer_done(task)

    def _ingested(self, session: CoreSession, pending: PendingFrame, r) -> None:
        s = session.stream
        session.in_step = False
        session.count("processed")
        session.fps_processed.tick()
        session.last_keep = (pending.rgb, r.keep_mask)
        self._emit(FrameStats(session=session.id, t=r.t, counts=self._counters(session), tokens_kept=r.tokens_kept,
                              tokens_total=r.tokens_total, cache_len=r.cache_len, max_tokens=s.max_tokens,
                              evicted_frames=s.evicted_frames, ingest_ms=round(r.ms, 2),
                              latency_ms=round((time.monotonic() - pending.arrived) * 1e3, 2)))
        q = proactive_question(session, r.t)
        if q is not None:
            self._start_answer(session, q)

    def _start_answer(self, session: CoreSession, q: PendingQuestion) -> None:
        s = session.stream
        try:
            op = s.begin_answer(q.text, q.sampling, pin=q.pin)
        except (ValueError, RuntimeError) as exc:
            session.errors += 1
            code = "cache_limit" if isinstance(exc, CacheLimitError) else "bad_question"
            self._emit(Error(session=session.id, code=code, message=str(exc), event_id=q.event_id))
            return
        task = Task(session, op, answer=Answer(q, s.last_t))
        self._tasks[session.id] = task
        self._touched.add(session.id)
        if not task.answer.silent:
            self._emit(task.answer.created(session.id))
        self._advance(task)

    def _close_answer(self, task: Task) -> None:
        """End a cancelled answer where it got to."""
        self._tasks.pop(task.session.id, None)
        task.work = None
        try:
            task.op.close()
        except Exception as exc:
            self._fail(task, exc)
            return
        self._answer_done(task)

    def _answer_done(self, task: Task) -> None:
        self._touched.add(task.session.id)
        self._out.events.extend(task.answer.done(task.session))


