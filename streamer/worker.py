"""The one model worker: a thread that owns the model and runs every session's work in steps.

Each session has at most one *operation* in progress (``StreamSession.begin_frame`` /
``begin_answer``), chosen in this order: the answer being generated; else the latest frame (and
then the proactive decision); else the next question. So frames that arrive during an answer wait
in the session's latest-frame slot (newer ones replace older, counted as dropped) and the newest
is appended right after the answer ends.

A step: every operation's next forward is a ``Want``; :func:`streamer.scheduler.plan_step`
picks what runs under ``engine.max_step_tokens`` (one session per step with ``batching: off``);
the :class:`model.executor.Executor` runs it as one vision call and one packed forward; then each
operation whose forward finished is advanced to its next one, emitting its events (a token, a
frame's stats, an answer's end). A failure is that operation's alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from model import CacheLimitError, TokenDelta
from model.executor import Executor, Forward

from .answers import Answer, proactive_question
from .engine_session import EngineSession, PendingFrame, PendingQuestion
from .events import Error, Event, FrameStats
from .scheduler import Want, plan_step

log = logging.getLogger(__name__)


class _Task:
    """A session's operation in progress and the forward it waits for."""

    def __init__(self, session: EngineSession, op, frame: PendingFrame | None = None, answer: Answer | None = None):
        self.session, self.op, self.frame, self.answer = session, op, frame, answer
        self.work: Forward | None = None
        self.waited = 0


class ModelWorker:
    """Runs session steps off the event loop; ``emit`` is called (from this thread) with the events of
    each step, in order, as one list."""

    def __init__(self, emit: Callable[[list[Event]], None], executor: Executor | None = None,
                 batching: bool = True, max_step_tokens: int = 2048, min_chunk_tokens: int = 64):
        self._sink = emit
        self._out: list[Event] = []  # this step's events, handed over at its end
        self.executor = executor
        self.batching, self.max_step_tokens, self.min_chunk_tokens = batching, max_step_tokens, min_chunk_tokens
        self._cond = threading.Condition()
        self._sessions: list[EngineSession] = []
        self._tasks: dict[str, _Task] = {}
        self._closing: list[EngineSession] = []  # removed sessions whose operation and pages the thread frees
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()  # model work other than steps
        self._rr = 0
        self._stepping: set[str] = set()  # sessions whose work is in the step running now
        self._running = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.step_items = 0  # forwards run over all steps (items / steps = the mean batch)
        self.history: deque[tuple[int, dict[str, int], float]] = deque(maxlen=512)  # (step, rows, ms)

    # -- control (any thread) ---------------------------------------------------------------------
    @property
    def condition(self) -> threading.Condition:
        return self._cond

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._run, name="vl3live-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for task in list(self._tasks.values()):  # the thread is gone: safe to close here
            task.op.close()
        with self._cond:
            self._tasks.clear()
            self._free_closing()
        while self._calls:
            self._calls.popleft()[1].set_exception(RuntimeError("the model worker stopped"))

    def submit(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the worker thread between two steps (everything that touches the model
        runs there: a forward from another thread would race with this one's hooks and streams)."""
        fut: Future = Future()
        with self._cond:
            if not self._running:
                fut.set_exception(RuntimeError("the model worker is not running"))
                return fut
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def add(self, session: EngineSession) -> None:
        with self._cond:
            self._sessions.append(session)
            self._cond.notify_all()

    def remove(self, session: EngineSession, timeout: float = 60.0) -> None:
        """Take ``session`` out: its operation is closed and its KV pages returned on the worker thread, after
        the step running now; from another thread this waits (up to ``timeout``) until that is done, so
        none of its frames is left without an outcome."""
        with self._cond:
            session.closed = True
            if session in self._sessions:
                self._sessions.remove(session)
            if session.frame is not None:  # never reached the model
                session.frame = None
                session.count("dropped")
            if session.incoming is not None:
                session.incoming = None
                session.count("dropped")
            self._closing.append(session)
            self._cond.notify_all()
            if threading.current_thread() is self._thread or not self.alive:
                self._free_closing()
                return
            self._cond.wait_for(lambda: session not in self._closing, timeout)
            # a frame still being preprocessed gets its outcome (dropped) when that ends; wait briefly for
            # it so the final counts add up, but never hold a shutdown on a preprocessing thread
            if not self._cond.wait_for(lambda: session.preparing is None, min(timeout, 5.0)):
                log.warning("session %s: a frame was still being preprocessed when it closed", session.id)

    def _free_closing(self) -> None:
        """Close the operations and free the pages of removed sessions (worker thread, or no thread)."""
        closing, self._closing = self._closing, []
        for session in closing:
            task = self._tasks.pop(session.id, None)
            if task is not None:
                try:
                    task.op.close()
                except Exception:
                    log.exception("session %s: closing its operation failed", session.id)
                if task.frame is not None:
                    session.in_step = False
                    session.count("dropped")
            session.stream.close()
        self._cond.notify_all()

    def _emit(self, ev: Event) -> None:
        self._out.append(ev)

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self._sink(out)

    def cancel(self, session: EngineSession) -> bool:
        """Stop the answer being generated for ``session`` after its current token."""
        with self._cond:
            task = self._tasks.get(session.id)
            if task is None or task.answer is None:
                return False
            task.answer.cancelled = True
            self._cond.notify_all()
            return True

    def busy(self, session: EngineSession) -> bool:
        """An operation of ``session`` (a frame or an answer) is in progress."""
        with self._cond:
            return session.id in self._tasks

    def answering(self, session: EngineSession) -> bool:
        with self._cond:
            task = self._tasks.get(session.id)
            return task is not None and task.answer is not None

    def idle(self, session: EngineSession) -> bool:
        """Nothing to do for ``session`` and no step of it running (its events may still be on their way)."""
        with self._cond:
            return session.id not in self._stepping and session.id not in self._tasks and not self._startable(session) \
                and session.preparing is None and session.incoming is None

    # -- the thread -------------------------------------------------------------------------------
    @staticmethod
    def _startable(session: EngineSession) -> bool:
        return session.frame is not None or session.question_ready()

    def _has_work(self) -> bool:
        return bool(self._tasks) or any(self._startable(session) for session in self._sessions)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._running and not (self._closing or self._calls or self._has_work()):
                    self._cond.wait()
                if not self._running:
                    return
                self._free_closing()
                call = self._calls.popleft() if self._calls else None
                if call is None:
                    starts = self._take_starts()
                    self._stepping = set(self._tasks) | {session.id for session, _, _ in starts}
            if call is not None:
                self._call(*call)
                continue
            if not starts and not self._tasks:  # only closing sessions were freed
                continue
            try:
                for session, frame, question in starts:
                    if frame is not None:
                        self._start_frame(session, frame)
                    else:
                        self._start_answer(session, question)
                self._step()
            except Exception as exc:  # a bug in the step itself: fail what it held, keep serving
                log.exception("a model step failed")
                for task in list(self._tasks.values()):
                    self._fail(task, exc)
            finally:
                self._flush()
                with self._cond:
                    self._stepping = set()
                    self._cond.notify_all()

    def _take_starts(self) -> list[tuple[EngineSession, PendingFrame | None, PendingQuestion | None]]:
        """Under the lock: the next operation of each session that has none (frame before question)."""
        starts = []
        for session in self._sessions:
            if session.id in self._tasks:
                continue
            if session.frame is not None:
                frame, session.frame = session.frame, None
                session.in_step = True
                starts.append((session, frame, None))
            elif session.question_ready():
                starts.append((session, None, session.questions.popleft()))
        return starts

    @staticmethod
    def _call(fn: Callable[[], object], fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed to the caller
            fut.set_exception(exc)

    def _step(self) -> None:
        for task in [t for t in self._tasks.values() if t.answer is not None and t.answer.cancelled]:
            self._close_answer(task)
        tasks = [t for t in self._tasks.values() if t.work is not None]
        if not tasks:
            return
        wants = [Want(t.session.id, t.work.kind, t.work.left, t.waited) for t in tasks]
        plan = plan_step(wants, self.max_step_tokens, None if self.batching else 1, self.min_chunk_tokens, self._rr)
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
        with self._cond:
            self.steps += 1
            self.step_items += len(run)
            self.history.append((self.steps, rows, (time.perf_counter() - started) * 1e3))
        for t in run:
            if t.work.finished:
                item, t.work = t.work, None
                self._advance(t, item)

    # -- operations -------------------------------------------------------------------------------
    def _advance(self, task: _Task, item: Forward | None = None) -> None:
        """Send ``item`` (or its error) into the task's operation and run it to its next forward,
        emitting what it yields on the way; at its end, finish the task."""
        if item is not None and item.error is not None:
            send, value = task.op.throw, item.error
        else:
            send, value = task.op.send, item
        while True:
            try:
                out = send(value)
            except StopIteration as stop:
                self._finish(task, stop.value)
                return
            except Exception as exc:
                self._fail(task, exc)
                return
            if isinstance(out, Forward):
                task.work = out
                return
            self._delta(task, out)
            if task.answer.cancelled:
                self._close_answer(task)
                return
            send, value = task.op.send, None

    def _start_frame(self, session: EngineSession, pending: PendingFrame) -> None:
        s = session.stream
        try:
            op = s.begin_frame(pending.pixels_for(s), pending.frame.pts_seconds)
        except Exception as exc:
            self._frame_failed(session, pending, exc)
            return
        task = _Task(session, op, frame=pending)
        with self._cond:
            self._tasks[session.id] = task
        self._advance(task)

    def _frame_failed(self, session: EngineSession, pending: PendingFrame, exc: BaseException) -> None:
        if not isinstance(exc, (ValueError, CacheLimitError)):
            log.error("session %s: frame at t=%s failed", session.id, pending.frame.pts_seconds, exc_info=exc)
        code = "cache_limit" if isinstance(exc, CacheLimitError) else \
            "bad_frame" if isinstance(exc, ValueError) else "internal"
        with self._cond:
            session.in_step = False
            session.count("refused")
            session.errors += 1
        self._emit(Error(session=session.id, t=pending.frame.pts_seconds, code=code, message=str(exc),
                         event_id=pending.event_id))

    def _finish(self, task: _Task, result: object) -> None:
        with self._cond:
            self._tasks.pop(task.session.id, None)
        if task.frame is not None:
            self._ingested(task.session, task.frame, result)
        else:
            self._answer_done(task)

    def _fail(self, task: _Task, exc: BaseException) -> None:
        with self._cond:
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

    def _ingested(self, session: EngineSession, pending: PendingFrame, r) -> None:
        s = session.stream
        with self._cond:
            session.in_step = False
            session.count("processed")
            session.fps_processed.tick()
            counts = session.counters()
        session.last_keep = (pending.frame.rgb, r.keep_mask)
        self._emit(FrameStats(session=session.id, t=r.t, counts=counts, tokens_kept=r.tokens_kept,
                              tokens_total=r.tokens_total, cache_len=r.cache_len, max_tokens=s.max_tokens,
                              evicted_frames=s.evicted_frames, ingest_ms=round(r.ms, 2),
                              latency_ms=round((time.monotonic() - pending.arrived) * 1e3, 2)))
        q = proactive_question(session, r.t)
        if q is not None:
            self._start_answer(session, q)

    def _start_answer(self, session: EngineSession, q: PendingQuestion) -> None:
        s = session.stream
        try:
            op = s.begin_answer(q.text, q.sampling, pin=q.pin)
        except (ValueError, RuntimeError) as exc:
            session.errors += 1
            code = "cache_limit" if isinstance(exc, CacheLimitError) else "bad_question"
            self._emit(Error(session=session.id, code=code, message=str(exc), event_id=q.event_id))
            return
        if q.pin:
            session.instruction_queued = False
        task = _Task(session, op, answer=Answer(q, s.last_t))
        with self._cond:
            self._tasks[session.id] = task
        if not task.answer.silent:
            self._emit(task.answer.created(session.id))
        self._advance(task)

    def _delta(self, task: _Task, delta: TokenDelta) -> None:
        self._out += task.answer.token(task.session.id, delta.text)

    def _close_answer(self, task: _Task) -> None:
        """End a cancelled answer where it got to."""
        with self._cond:
            self._tasks.pop(task.session.id, None)
        task.work = None
        try:
            task.op.close()
        except Exception as exc:
            self._fail(task, exc)
            return
        self._answer_done(task)

    def _answer_done(self, task: _Task) -> None:
        self._out += task.answer.done(task.session)
