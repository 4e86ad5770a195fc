"""The one model worker: a thread that owns the model and runs every session's steps.

It takes one step at a time, round-robin over the sessions that have work, so one session's
long answer holds another session's frames back by at most one decode step. Within a session a
step is, in this order: the next token of the answer being generated; else the latest frame
(and then the proactive decision); else the next question. So frames that arrive during an
answer wait in the session's latest-frame slot (newer ones replace older, counted as dropped)
and the newest is appended right after the answer ends.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from model import CacheLimitError, TokenDelta

from .bus import Event
from .live import LiveSession, Question

log = logging.getLogger(__name__)


class _Answer:
    def __init__(self, q: Question, gen: Iterator[TokenDelta], t: float | None):
        self.q, self.gen, self.t = q, gen, t
        self.parts: list[str] = []
        self.started = time.perf_counter()
        self.ttft_ms: float | None = None
        self.cancelled = False


def _normalized(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


class ModelWorker:
    """Runs session steps off the event loop; ``emit`` is called (from this thread) with each event."""

    def __init__(self, emit: Callable[[Event], None]):
        self._emit = emit
        self._cond = threading.Condition()
        self._sessions: list[LiveSession] = []
        self._answers: dict[str, _Answer] = {}
        self._retired: list[_Answer] = []  # answers of removed sessions, to be closed on the worker thread
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()  # model work other than steps
        self._rr = 0
        self._current: LiveSession | None = None  # the session whose step is running
        self._running = False
        self._thread: threading.Thread | None = None

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
        for a in [*self._answers.values(), *self._retired]:  # the thread is gone: safe to close here
            a.gen.close()
        self._answers.clear()
        self._retired.clear()
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
        """Take ``ls`` out; from another thread, also wait (up to ``timeout``) for a step of it that is
        running now, so that none of its frames is left without an outcome."""
        with self._cond:
            ls.closed = True
            if ls in self._sessions:
                self._sessions.remove(ls)
            if ls.frame is not None:  # never reached the model
                ls.frame = None
                ls.count("dropped")
            answer = self._answers.pop(ls.id, None)
            if answer is not None:  # closed by the worker thread, which may be inside it right now
                self._retired.append(answer)
                self._cond.notify_all()
            if threading.current_thread() is not self._thread:
                self._cond.wait_for(lambda: self._current is not ls, timeout)

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def cancel(self, ls: LiveSession) -> bool:
        """Stop the answer being generated for ``ls`` after its current token."""
        with self._cond:
            answer = self._answers.get(ls.id)
            if answer is None:
                return False
            answer.cancelled = True
            return True

    def answering(self, ls: LiveSession) -> bool:
        with self._cond:
            return ls.id in self._answers

    # -- the thread -------------------------------------------------------------------------------
    def idle(self, ls: LiveSession) -> bool:
        """Nothing to do for ``ls`` and no step of it running (its events may still be on their way)."""
        with self._cond:
            return self._current is not ls and not self._has_work(ls)

    def _has_work(self, ls: LiveSession) -> bool:
        return ls.id in self._answers or ls.frame is not None or bool(ls.questions)

    def _next(self) -> LiveSession | None:
        with self._cond:
            while self._running:
                if self._retired or self._calls:
                    retired, self._retired = self._retired, []
                    call = self._calls.popleft() if self._calls else None
                    self._cond.release()
                    try:
                        for a in retired:
                            a.gen.close()
                        if call is not None:
                            self._call(*call)
                    finally:
                        self._cond.acquire()
                    continue
                n = len(self._sessions)
                for i in range(n):
                    ls = self._sessions[(self._rr + i) % n]
                    if self._has_work(ls):
                        self._rr = (self._rr + i + 1) % n
                        self._current = ls
                        return ls
                self._cond.wait()
        return None

    @staticmethod
    def _call(fn: Callable[[], object], fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed to the caller
            fut.set_exception(exc)

    def _run(self) -> None:
        while (ls := self._next()) is not None:
            try:
                self._step(ls)
            except Exception as exc:  # a session's failure must not stop the others
                log.exception("session %s: step failed", ls.id)
                ls.errors += 1
                self._emit(Event("error", ls.id, {"code": "internal", "message": str(exc)}))
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def _step(self, ls: LiveSession) -> None:
        answer = self._answers.get(ls.id)
        if answer is not None:
            self._decode(ls, answer)
            return
        with self._cond:
            pending, ls.frame = ls.frame, None
            ls.in_step = pending is not None
            question = ls.questions.popleft() if pending is None and ls.questions else None
        if pending is not None:
            self._ingest(ls, pending)
        elif question is not None:
            self._start_answer(ls, question)

    def _ingest(self, ls: LiveSession, pending) -> None:
        s = ls.session
        try:
            r = s.add_frame(pending.frame.rgb, pending.frame.pts_seconds)
        except Exception as exc:  # refused: counted as such, the session goes on
            if not isinstance(exc, (ValueError, CacheLimitError)):
                log.exception("session %s: frame at t=%s failed", ls.id, pending.frame.pts_seconds)
            code = "cache_limit" if isinstance(exc, CacheLimitError) else \
                "bad_frame" if isinstance(exc, ValueError) else "internal"
            with self._cond:
                ls.in_step = False
                ls.count("refused")
                ls.errors += 1
            self._emit(Event("error", ls.id, {"code": code, "message": str(exc), "event_id": pending.event_id},
                             t=pending.frame.pts_seconds))
            return
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
            gen = s.respond(max_new_tokens=q.max_new_tokens, **sampling) if q.text is None else \
                s.ask(q.text, max_new_tokens=q.max_new_tokens, pin=q.pin, **sampling)
        except (ValueError, RuntimeError) as exc:
            ls.errors += 1
            code = "cache_limit" if isinstance(exc, CacheLimitError) else "bad_question"
            self._emit(Event("error", ls.id, {"code": code, "message": str(exc), "event_id": q.event_id}))
            return
        if q.pin:
            ls.instruction_queued = False
        answer = _Answer(q, gen, s.last_t)
        with self._cond:
            self._answers[ls.id] = answer
        if not self._silent(answer):
            self._emit(self._created(ls, answer))

    def _silent(self, answer: _Answer) -> bool:
        """video-turn re-asks are only told once their whole text is known to say something new."""
        return answer.q.proactive and answer.q.text is not None

    def _created(self, ls: LiveSession, a: _Answer) -> Event:
        return Event("response.created", ls.id, {"response_id": a.q.response_id, "question": a.q.text,
                                                 "proactive": a.q.proactive, "event_id": a.q.event_id}, t=a.t)

    def _decode(self, ls: LiveSession, a: _Answer) -> None:
        done = a.cancelled
        if not done:
            try:
                delta = next(a.gen)
            except StopIteration:
                done = True
            except CacheLimitError as exc:
                done = True
                self._emit(Event("error", ls.id, {"code": "cache_limit", "message": str(exc),
                                                  "event_id": a.q.event_id}, t=a.t))
            except Exception as exc:  # any other failure ends this answer, never the session
                log.exception("session %s: answer %s failed", ls.id, a.q.response_id)
                done = True
                ls.errors += 1
                self._emit(Event("error", ls.id, {"code": "internal", "message": f"the answer failed: {exc}",
                                                  "event_id": a.q.event_id}, t=a.t))
            else:
                if a.ttft_ms is None:
                    a.ttft_ms = (time.perf_counter() - a.started) * 1e3
                a.parts.append(delta.text)
                if delta.text and not self._silent(a):
                    self._emit(Event("response.delta", ls.id, {"response_id": a.q.response_id, "text": delta.text},
                                     t=a.t))
        if not done:
            return
        a.gen.close()
        with self._cond:
            self._answers.pop(ls.id, None)
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
