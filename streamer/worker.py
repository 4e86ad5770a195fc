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
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from model import CacheLimitError, TokenDelta
from model.executor import Executor, Forward

from .bus import Event
from .live import LiveSession, PendingFrame, Question
from .scheduler import Want, plan_step

log = logging.getLogger(__name__)


class _Answer:
    def __init__(self, q: Question, t: float | None):
        self.q, self.t = q, t
        self.parts: list[str] = []
        self.started = q.asked  # TTFT includes the wait in the session's question queue
        self.ttft_ms: float | None = None
        self.cancelled = False


class _Task:
    """A session's operation in progress and the forward it waits for."""

    def __init__(self, ls: LiveSession, op, frame: PendingFrame | None = None, answer: _Answer | None = None):
        self.ls, self.op, self.frame, self.answer = ls, op, frame, answer
        self.work: Forward | None = None
        self.waited = 0


def _normalized(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


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
        self._sessions: list[LiveSession] = []
        self._tasks: dict[str, _Task] = {}
        self._closing: list[LiveSession] = []  # removed sessions whose operation and pages the thread frees
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
    def lock(self) -> threading.Condition:
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

    def add(self, ls: LiveSession) -> None:
        with self._cond:
            self._sessions.append(ls)
            self._cond.notify_all()

    def remove(self, ls: LiveSession, timeout: float = 60.0) -> None:
        """Take ``ls`` out: its operation is closed and its KV pages returned on the worker thread, after
        the step running now; from another thread this waits (up to ``timeout``) until that is done, so
        none of its frames is left without an outcome."""
        with self._cond:
            ls.closed = True
            if ls in self._sessions:
                self._sessions.remove(ls)
            if ls.frame is not None:  # never reached the model
                ls.frame = None
                ls.count("dropped")
            if ls.incoming is not None:
                ls.incoming = None
                ls.count("dropped")
            self._closing.append(ls)
            self._cond.notify_all()
            if threading.current_thread() is self._thread or not self.alive:
                self._free_closing()
                return
            self._cond.wait_for(lambda: ls not in self._closing, timeout)
            # a frame still being preprocessed gets its outcome (dropped) when that ends; wait briefly for
            # it so the final counts add up, but never hold a shutdown on a preprocessing thread
            if not self._cond.wait_for(lambda: ls.preparing is None, min(timeout, 5.0)):
                log.warning("session %s: a frame was still being preprocessed when it closed", ls.id)

    def _free_closing(self) -> None:
        """Close the operations and free the pages of removed sessions (worker thread, or no thread)."""
        closing, self._closing = self._closing, []
        for ls in closing:
            task = self._tasks.pop(ls.id, None)
            if task is not None:
                try:
                    task.op.close()
                except Exception:
                    log.exception("session %s: closing its operation failed", ls.id)
                if task.frame is not None:
                    ls.in_step = False
                    ls.count("dropped")
            ls.session.close()
        self._cond.notify_all()

    def _emit(self, ev: Event) -> None:
        self._out.append(ev)

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self._sink(out)

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def cancel(self, ls: LiveSession) -> bool:
        """Stop the answer being generated for ``ls`` after its current token."""
        with self._cond:
            task = self._tasks.get(ls.id)
            if task is None or task.answer is None:
                return False
            task.answer.cancelled = True
            self._cond.notify_all()
            return True

    def busy(self, ls: LiveSession) -> bool:
        """An operation of ``ls`` (a frame or an answer) is in progress."""
        with self._cond:
            return ls.id in self._tasks

    def answering(self, ls: LiveSession) -> bool:
        with self._cond:
            task = self._tasks.get(ls.id)
            return task is not None and task.answer is not None

    def idle(self, ls: LiveSession) -> bool:
        """Nothing to do for ``ls`` and no step of it running (its events may still be on their way)."""
        with self._cond:
            return ls.id not in self._stepping and ls.id not in self._tasks and not self._startable(ls) \
                and ls.preparing is None and ls.incoming is None

    # -- the thread -------------------------------------------------------------------------------
    @staticmethod
    def _startable(ls: LiveSession) -> bool:
        return ls.frame is not None or ls.question_ready()

    def _has_work(self) -> bool:
        return bool(self._tasks) or any(self._startable(ls) for ls in self._sessions)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._running and not (self._closing or self._calls or self._has_work()):
                    self._cond.wait()
                if not self._running:
                    return
                if self._closing or self._calls:
                    self._free_closing()
                    call = self._calls.popleft() if self._calls else None
                else:
                    call = None
                    starts = self._take_starts()
                    self._stepping = set(self._tasks) | {ls.id for ls, _, _ in starts}
            if call is not None:
                self._call(*call)
                continue
            try:
                for ls, frame, question in starts:
                    if frame is not None:
                        self._start_frame(ls, frame)
                    else:
                        self._start_answer(ls, question)
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

    def _take_starts(self) -> list[tuple[LiveSession, PendingFrame | None, Question | None]]:
        """Under the lock: the next operation of each session that has none (frame before question)."""
        starts = []
        for ls in self._sessions:
            if ls.id in self._tasks:
                continue
            if ls.frame is not None:
                frame, ls.frame = ls.frame, None
                ls.in_step = True
                starts.append((ls, frame, None))
            elif ls.question_ready():
                starts.append((ls, None, ls.questions.popleft()))
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
        wants = [Want(t.ls.id, t.work.kind, t.work.left, t.waited) for t in tasks]
        plan = plan_step(wants, self.max_step_tokens, None if self.batching else 1, self.min_chunk_tokens, self._rr)
        self._rr += 1
        rows = plan.rows()
        run = []
        for t in tasks:
            if t.ls.id in rows:
                t.work.chunk = rows[t.ls.id]
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

    def _start_frame(self, ls: LiveSession, pending: PendingFrame) -> None:
        s = ls.session
        try:
            op = s.begin_frame(pending.pixels_for(s), pending.frame.pts_seconds)
        except Exception as exc:
            self._frame_failed(ls, pending, exc)
            return
        task = _Task(ls, op, frame=pending)
        with self._cond:
            self._tasks[ls.id] = task
        self._advance(task)

    def _frame_failed(self, ls: LiveSession, pending: PendingFrame, exc: BaseException) -> None:
        if not isinstance(exc, (ValueError, CacheLimitError)):
            log.error("session %s: frame at t=%s failed", ls.id, pending.frame.pts_seconds, exc_info=exc)
        code = "cache_limit" if isinstance(exc, CacheLimitError) else \
            "bad_frame" if isinstance(exc, ValueError) else "internal"
        with self._cond:
            ls.in_step = False
            ls.count("refused")
            ls.errors += 1
        self._emit(Event("error", ls.id, {"code": code, "message": str(exc), "event_id": pending.event_id},
                         t=pending.frame.pts_seconds))

    def _finish(self, task: _Task, result: object) -> None:
        with self._cond:
            self._tasks.pop(task.ls.id, None)
        if task.frame is not None:
            self._ingested(task.ls, task.frame, result)
        else:
            self._answer_done(task)

    def _fail(self, task: _Task, exc: BaseException) -> None:
        with self._cond:
            self._tasks.pop(task.ls.id, None)
        task.work = None
        try:
            task.op.close()
        except Exception:
            log.exception("session %s: closing a failed operation", task.ls.id)
        ls = task.ls
        if task.frame is not None:
            self._frame_failed(ls, task.frame, exc)
            return
        a = task.answer
        if isinstance(exc, CacheLimitError):
            self._emit(Event("error", ls.id, {"code": "cache_limit", "message": str(exc),
                                              "event_id": a.q.event_id}, t=a.t))
        else:  # any other failure ends this answer, never the session
            log.error("session %s: answer %s failed", ls.id, a.q.response_id, exc_info=exc)
            ls.errors += 1
            self._emit(Event("error", ls.id, {"code": "internal", "message": f"the answer failed: {exc}",
                                              "event_id": a.q.event_id}, t=a.t))
        self._answer_done(task)

    def _ingested(self, ls: LiveSession, pending: PendingFrame, r) -> None:
        s = ls.session
        with self._cond:
            ls.in_step = False
            ls.count("processed")
            ls.fps_processed.tick()
            stats = ls.counters()
        ls.last_keep = (pending.frame.rgb, r.keep_mask)
        st = s.stats()
        stats.update(tokens_kept=r.tokens_kept, tokens_total=r.tokens_total, cache_len=r.cache_len,
                     max_tokens=st["max_tokens"], evicted_frames=st["evicted_frames"], ingest_ms=round(r.ms, 2),
                     latency_ms=round((time.monotonic() - pending.arrived) * 1e3, 2))
        self._emit(Event("stats", ls.id, stats, t=r.t))
        self._proactive(ls, r.t)

    def _proactive(self, ls: LiveSession, t: float) -> None:
        """After a frame: decide whether a standing instruction makes the model speak now."""
        if not ls.instruction or ls.instruction_queued:
            return
        cfg = ls.cfg
        if ls.session.config.layout == "stream":
            cooled = ls.last_alert_t is None or t - ls.last_alert_t >= cfg.proactive_cooldown
            if cooled and ls.session.respond_probability() >= cfg.proactive_threshold:
                ls.last_alert_t = t
                self._start_answer(ls, Question(f"alert-{ls.id}-{t:.3f}", None, proactive=True,
                                                max_new_tokens=cfg.proactive_max_new_tokens))
        elif ls.last_instruction_t is None or t - ls.last_instruction_t >= cfg.proactive_every:
            ls.last_instruction_t = t
            self._start_answer(ls, Question(f"alert-{ls.id}-{t:.3f}", ls.instruction, proactive=True,
                                            max_new_tokens=cfg.proactive_max_new_tokens))

    def _start_answer(self, ls: LiveSession, q: Question) -> None:
        s = ls.session
        try:
            sampling = ls.sampling if not q.pin else {}
            op = s.begin_answer(q.text, max_new_tokens=q.max_new_tokens, pin=q.pin, **sampling)
        except (ValueError, RuntimeError) as exc:
            ls.errors += 1
            code = "cache_limit" if isinstance(exc, CacheLimitError) else "bad_question"
            self._emit(Event("error", ls.id, {"code": code, "message": str(exc), "event_id": q.event_id}))
            return
        if q.pin:
            ls.instruction_queued = False
        task = _Task(ls, op, answer=_Answer(q, s.last_t))
        with self._cond:
            self._tasks[ls.id] = task
        if not self._silent(task.answer):
            self._emit(self._created(ls, task.answer))
        self._advance(task)

    def _silent(self, answer: _Answer) -> bool:
        """video-turn re-asks are only told once their whole text is known to say something new."""
        return answer.q.proactive and answer.q.text is not None

    def _created(self, ls: LiveSession, a: _Answer) -> Event:
        return Event("response.created", ls.id, {"response_id": a.q.response_id, "question": a.q.text,
                                                 "proactive": a.q.proactive, "event_id": a.q.event_id}, t=a.t)

    def _delta(self, task: _Task, delta: TokenDelta) -> None:
        a = task.answer
        if a.ttft_ms is None:
            a.ttft_ms = (time.monotonic() - a.started) * 1e3
        a.parts.append(delta.text)
        if delta.text and not self._silent(a):
            self._emit(Event("response.delta", task.ls.id, {"response_id": a.q.response_id, "text": delta.text},
                             t=a.t))

    def _close_answer(self, task: _Task) -> None:
        """End a cancelled answer where it got to."""
        with self._cond:
            self._tasks.pop(task.ls.id, None)
        task.work = None
        try:
            task.op.close()
        except Exception as exc:
            self._fail(task, exc)
            return
        self._answer_done(task)

    def _answer_done(self, task: _Task) -> None:
        ls, a = task.ls, task.answer
        text = "".join(a.parts)
        if self._silent(a):
            if not _normalized(text) or _normalized(text) == _normalized(ls.last_alert_text):
                ls.proactive_suppressed += 1
                return
            self._emit(self._created(ls, a))
            self._emit(Event("response.delta", ls.id, {"response_id": a.q.response_id, "text": text}, t=a.t))
        done_data = {"response_id": a.q.response_id, "text": text, "proactive": a.q.proactive,
                     "cancelled": a.cancelled, "ttft_ms": a.ttft_ms, "event_id": a.q.event_id}
        self._emit(Event("response.done", ls.id, done_data, t=a.t))
        if a.q.proactive and _normalized(text):
            ls.last_alert_text = text
            self._emit(Event("alert", ls.id, {"response_id": a.q.response_id, "text": text,
                                              "instruction": ls.instruction}, t=a.t))
