"""The engine core: the one owner of the model, the KV pool and every session's live state.

It runs on one thread (in this process, a child process or a Ray actor: the client decides) and is
driven only by commands (:mod:`streamer.core.commands`) posted to its inbox; between two steps it
applies the commands that arrived, in arrival order, then runs one step, then hands everything that
iteration produced to ``emit`` as one :class:`Outputs` batch. Nothing outside holds a reference to a
session, a ``StreamSession``, a queue or a counter, so there is no lock to lend and no race to have.

A step (vLLM v1's split of scheduling and execution): every session with model work has one operation
in progress (``StreamSession.begin_frame`` / ``begin_answer``), chosen in this order: the answer being
generated; else the latest frame (and then the proactive decision); else the next question. Each
operation's next forward is a ``Want``; :func:`plan_step` picks what runs under
``engine.max_step_tokens``; the executor runs it as one vision call and one packed forward; each
operation whose forward finished is advanced (:func:`model.driver.advance`) to its next one, emitting
its events. A failure is that operation's alone.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from model import CacheLimitError, LoadedModel, StreamSession
from model.config import SessionConfig
from model.driver import DONE, FORWARD, advance
from model.executor import Executor, Forward
from model.kvpool import KVPool, PoolFullError, pool_size
from model.sampling import Sampling

from ..config import CoreConfig, EngineConfig
from ..errors import EngineError
from ..events import Error, Event, FrameCounts, FrameStats, SessionClosed, SessionCreated
from .answers import Answer, proactive_question
from .commands import (
    UNSET,
    Ask,
    Cancel,
    CloseSession,
    EngineSnapshot,
    EngineState,
    OpenSession,
    Outputs,
    PushFrame,
    Reconfigure,
    Reply,
    SessionSnapshot,
    SetInstruction,
    Snapshot,
    UpdateSettings,
)
from .prep import Preprocessing
from .scheduler import Want, plan_step
from .state import FRAME_OUTCOMES, CoreSession, PendingFrame, PendingQuestion

log = logging.getLogger(__name__)

PINNED_MAX_NEW_TOKENS = 16  # a standing instruction's own answer (stream layout): a short acknowledgement


class _Task:
    """A session's operation in progress and the forward it waits for."""

    def __init__(self, session: CoreSession, op, frame: PendingFrame | None = None, answer: Answer | None = None):
        self.session, self.op, self.frame, self.answer = session, op, frame, answer
        self.work: Forward | None = None
        self.waited = 0


class EngineCore:
    """Sessions over one model and one KV pool, driven by commands (see the module doc).

    ``post(request, command)`` is the only way in (any thread); ``emit(outputs)`` is called from the
    core's thread with each iteration's batch."""

    def __init__(self, lm: LoadedModel, pool: KVPool, config: CoreConfig, emit: Callable[[Outputs], None]):
        self.lm, self.pool, self.config = lm, pool, config
        self.executor = Executor(lm)
        self._emit_batch = emit
        self._inbox: list = []  # (request id or None, command), applied in order between two steps
        self._frame_at: dict[str, int] = {}  # sid -> where its newest PushFrame waits in the inbox
        self._admitted: set[str] = set()  # sessions whose counters frames changed since the last batch
        self._wake = threading.Condition()  # guards the inbox only
        self._sessions: dict[str, CoreSession] = {}
        self._tasks: dict[str, _Task] = {}
        self._totals: Counter = Counter()  # frames by outcome over every session, closed ones included
        self._prep = Preprocessing(config.prep_threads, self._prepared)
        self._out = Outputs()
        self._touched: set[str] = set()
        self._rr = 0
        self._running = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.step_items = 0
        self.iterations = 0  # of the loop: what orders the states a client mirrors
        self.history: deque = deque(maxlen=512)  # (step, {sid: rows}, model ms, host ms) per step
        self._ran: tuple | None = None  # this iteration's step: (rows, ms in the executor)
        self.owner: int | None = None  # the core thread's ident (checked by tests)

    # -- the way in (any thread) ------------------------------------------------------------------
    def post(self, request: int | None, command: object) -> None:
        """Queue a command for the next iteration. Frames are admitted as they come (the session's
        :class:`~streamer.core.state.Admission`: clock, sampler, counters) and a sampled frame replaces the
        session's previous one still waiting in the inbox, so the inbox holds at most one frame per session
        however fast frames come."""
        self.post_many([(request, command)])

    def post_many(self, commands: list[tuple[int | None, object]]) -> None:
        """Queue several commands at once (what a transport received together is applied together)."""
        with self._wake:
            for request, command in commands:
                if request is None and isinstance(command, PushFrame):
                    command = self._admit(command)
                    if command is None:
                        continue
                self._inbox.append((request, command))
            self._wake.notify()

    def _admit(self, c: PushFrame) -> PushFrame | None:
        """(Under the inbox lock.) The frame with its stream time if the sampler takes it and it does not
        replace one already waiting (None: counted, nothing to queue). Unknown sessions go through, to be
        refused in order."""
        session = self._sessions.get(c.sid)
        if session is None:
            return c
        pts = session.admission.admit(c.pts, c.source, c.continue_clock)
        self._admitted.add(c.sid)
        if pts is None:
            return None
        c = dataclasses.replace(c, pts=pts, source=0, continue_clock=False)  # admitted: its pts are final
        at = self._frame_at.get(c.sid)
        if at is not None:
            session.admission.replaced()
            self._inbox[at] = (None, c)
            return None
        self._frame_at[c.sid] = len(self._inbox)
        return c

    def _prepared(self, sid: str, pending: PendingFrame, fut) -> None:  # a preprocessing thread
        self.post(None, ("prepared", sid, pending, fut))

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self.run, name="vl3live-core", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._prep.shutdown()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        """The core's loop (its own thread, or the main thread of a child process)."""
        self._running = True
        self.owner = threading.get_ident()
        try:
            while True:
                with self._wake:
                    while self._running and not self._inbox and not self._has_work():
                        self._wake.wait()
                    if not self._running:
                        break
                    inbox, self._inbox, self._frame_at = self._inbox, [], {}
                    self._touched |= self._admitted
                    self._admitted = set()
                started = time.perf_counter()
                self._ran = None
                self.iterations += 1
                for request, command in inbox:
                    self._apply(request, command)
                try:
                    self._start_operations()
                    self._step()
                except Exception as exc:  # a bug in the step itself: fail what it held, keep serving
                    log.exception("a model step failed")
                    for task in list(self._tasks.values()):
                        self._fail(task, exc)
                self._flush()
                if self._ran is not None:  # host time: the iteration outside the executor's run
                    rows, model_ms = self._ran
                    total_ms = (time.perf_counter() - started) * 1e3
                    self.history.append((self.steps, rows, model_ms, total_ms - model_ms))
        finally:
            for task in list(self._tasks.values()):
                task.op.close()
            self._tasks.clear()
            for session in list(self._sessions.values()):
                session.stream.close()
            for request, _ in self._inbox:  # requests nobody will apply now
                if request is not None:
                    self._out.replies.append(Reply(request, code="internal", message="the engine core stopped"))
            self._flush()

    def _has_work(self) -> bool:
        return bool(self._tasks) or any(self._startable(s) for s in self._sessions.values())

    @staticmethod
    def _startable(session: CoreSession) -> bool:
        return session.frame is not None or session.question_ready()

    def _emit(self, ev: Event) -> None:
        self._out.events.append(ev)
        self._touched.add(ev.session)

    def _flush(self) -> None:
        out = self._out
        for sid in self._touched:
            session = self._sessions.get(sid)
            if session is not None:
                out.states.append(self._state(session, final=True))
        self._touched = set()
        out.engine = self.engine_state()
        self._out = Outputs()
        self._emit_batch(out)

    def _counters(self, session: CoreSession) -> FrameCounts:
        """``session``'s counters, taken under the inbox lock so that they add up (a frame admitted but not
        applied yet is pending)."""
        with self._wake:
            return session.counters(session.id in self._frame_at)

    def _state(self, session: CoreSession, final: bool = False):
        """The session's state now; ``final``: at the end of this iteration (newer than any taken during it,
        which is what orders a reply against the batch that carries it)."""
        task = self._tasks.get(session.id)
        with self._wake:
            waiting = session.id in self._frame_at
            counts = session.counters(waiting)
        idle = task is None and not self._startable(session) and session.preparing is None \
            and session.incoming is None and not waiting
        return session.state(counts, task is not None and task.answer is not None, idle,
                             2 * self.iterations + int(final))

    def engine_state(self) -> EngineState:
        with self._wake:
            pending = sum(s.pending(s.id in self._frame_at) for s in self._sessions.values())
            frames = FrameCounts(**{k: self._totals[k] for k in ("accepted", "source_frames", *FRAME_OUTCOMES)},
                                 pending=pending)
        return EngineState(self.pool.stats(), self.steps, self.step_items, frames, len(self._sessions))

    # -- commands (core thread) -------------------------------------------------------------------
    def _apply(self, request: int | None, command: object) -> None:
        try:
            value = self._command(command)
        except EngineError as exc:
            if request is None:
                sid = getattr(command, "sid", None)
                if sid is not None:
                    self._emit(Error(session=sid, code=exc.code, message=str(exc),
                                     event_id=getattr(command, "event_id", None)))
            else:
                self._out.replies.append(Reply(request, code=exc.code, message=str(exc)))
            return
        except ValueError as exc:  # settings the model session refuses (e.g. a budget below its minimum)
            if request is not None:
                self._out.replies.append(Reply(request, code="invalid_field", message=str(exc)))
            return
        except Exception as exc:  # a bug or a model failure: this command's alone
            log.exception("command %s failed", type(command).__name__)
            if request is not None:
                self._out.replies.append(Reply(request, code="internal", message=f"{type(exc).__name__}: {exc}"))
            return
        if request is not None:
            self._out.replies.append(Reply(request, value))

    def _session(self, sid: str) -> CoreSession:
        session = self._sessions.get(sid)
        if session is None:
            raise EngineError(f"no session {sid!r}", "invalid_field")
        return session

    def _command(self, c: object) -> object:
        if isinstance(c, tuple) and c and c[0] == "prepared":
            _, sid, pending, fut = c
            session = self._sessions.get(sid)
            if session is not None:
                Preprocessing.prepared(session, pending, fut)
                self._prep.feed(session)  # a newer frame came meanwhile
                self._touched.add(sid)
            return None
        match c:
            case PushFrame():
                return self._push(c)
            case Ask():
                return self._ask(c)
            case Cancel():
                task = self._tasks.get(c.sid)
                if task is not None and task.answer is not None:
                    task.answer.cancelled = True
                return None
            case SetInstruction():
                return self._set_instruction(c)
            case UpdateSettings():
                return self._update(c)
            case OpenSession():
                return self._open(c)
            case Reconfigure():
                return self._reconfigure(c)
            case CloseSession():
                return self._close(c.sid)
            case Snapshot():
                return self._snapshot(c)
        raise EngineError(f"unknown command {type(c).__name__}")

    def _open(self, c: OpenSession) -> dict:
        if c.sid in self._sessions:
            raise EngineError(f"session {c.sid!r} exists")
        try:
            stream = StreamSession(self.lm, c.config, self.pool, self.executor)
        except PoolFullError as exc:
            raise EngineError(str(exc), "too_many_sessions") from None
        if c.record_logits:
            stream.logit_log = []
        session = CoreSession(c.sid, stream, c.settings, c.sampling, totals=self._totals)
        session.fresh_len = stream.cache_len
        self._sessions[c.sid] = session
        self._emit(SessionCreated(session=c.sid, layout=stream.config.layout, max_tokens=stream.max_tokens))
        return {"config": stream.config, "max_tokens": stream.max_tokens, "state": self._state(session)}

    def _reconfigure(self, c: Reconfigure) -> dict:
        session = self._session(c.sid)
        if session.processed or session.stream.cache_len != session.fresh_len or c.sid in self._tasks \
                or session.in_step:
            raise EngineError("layout, budget and frame size can only change before the first frame or question; "
                              "open a new session to change them", "session_started")
        old = session.stream
        old.close()  # its pages make room for the new budget
        try:
            session.stream = StreamSession(self.lm, c.config, self.pool, self.executor)
        except PoolFullError as exc:
            session.stream = StreamSession(self.lm, old.config, self.pool, self.executor)  # as it was
            raise EngineError(str(exc), "too_many_sessions") from None
        except BaseException:
            session.stream = StreamSession(self.lm, old.config, self.pool, self.executor)
            raise
        session.fresh_len = session.stream.cache_len
        self._touched.add(c.sid)
        return {"config": session.stream.config, "max_tokens": session.stream.max_tokens}

    def _close(self, sid: str) -> FrameCounts | None:
        session = self._sessions.pop(sid, None)
        if session is None:
            return None
        session.closed = True
        for slot in ("frame", "incoming", "preparing"):  # frames that never reached the model
            if getattr(session, slot) is not None:
                setattr(session, slot, None)
                session.count("dropped")
        task = self._tasks.pop(sid, None)
        if task is not None:
            try:
                task.op.close()
            except Exception:
                log.exception("session %s: closing its operation failed", sid)
            if task.frame is not None:
                session.in_step = False
                session.count("dropped")
        session.stream.close()
        counts = self._counters(session)
        self._emit(SessionClosed(session=sid, counts=counts))
        return counts

    def _push(self, c: PushFrame) -> None:
        """An admitted frame (sampled, its pts final) goes for preprocessing on its way to the slot."""
        session = self._session(c.sid)
        self._touched.add(c.sid)
        if session.incoming is not None:
            session.count("dropped")
        session.incoming = PendingFrame(c.pts, c.rgb, c.arrived, c.event_id, prepared_by=session.stream)
        self._prep.feed(session)

    def _ask(self, c: Ask) -> str:
        session = self._session(c.sid)
        if len(session.questions) >= self.config.max_queued_questions:
            raise EngineError(f"{self.config.max_queued_questions} questions are already waiting in session "
                              f"{c.sid!r}", "queue_full")
        session.questions.append(PendingQuestion(c.response_id, c.text, c.sampling, c.event_id, asked=c.asked))
        self._touched.add(c.sid)
        return c.response_id

    def _set_instruction(self, c: SetInstruction) -> None:
        """The standing instruction: ``stream`` layout: asked once and pinned in the cache; a new one replaces
        the one still waiting, clearing drops it, and only the newest one's exchange stays pinned.
        ``video-turn``: asked again every ``proactive_every`` seconds of stream time."""
        session = self._session(c.sid)
        session.instruction = c.text
        session.last_instruction_t = None
        session.last_alert_t = None  # the cooldown is between answers to one instruction
        session.last_alert_text = ""
        self._touched.add(c.sid)
        if session.stream.config.layout != "stream":
            return
        waiting = session.pinned_question
        if waiting is not None:
            session.questions.remove(waiting)
        task = self._tasks.get(c.sid)
        if task is not None and task.answer is not None and task.answer.q.pin:
            task.answer.cancelled = True  # the old instruction's acknowledgement ends here
        session.stream.unpin()
        if c.text is not None:
            sampling = Sampling(max_new_tokens=min(PINNED_MAX_NEW_TOKENS, self.config.max_new_tokens))  # greedy
            session.questions.append(PendingQuestion(c.response_id, c.text, sampling, pin=True, asked=c.asked))

    def _update(self, c: UpdateSettings) -> None:
        session = self._session(c.sid)
        if c.settings is not None:
            if c.settings.fps != session.settings.fps:
                with self._wake:
                    session.admission.set_fps(c.settings.fps)
            session.settings = c.settings
        if c.sampling is not None:
            session.sampling = c.sampling
        if not (isinstance(c.diffp_threshold, str) and c.diffp_threshold == UNSET):
            session.stream.set_diffp_threshold(c.diffp_threshold)
        self._touched.add(c.sid)

    def _snapshot(self, c: Snapshot) -> object:
        if c.sid is None:
            host = tuple(h for *_, h in self.history)
            return EngineSnapshot(self.engine_state(), tuple((k, rows, ms) for k, rows, ms, _ in self.history), host)
        session = self._session(c.sid)
        s = session.stream
        detail = c.detail
        return SessionSnapshot(c.sid, s.config, session.settings, session.sampling, session.instruction,
                               self._state(session), s.stats(), tuple(s.frames_in_cache()),
                               session.last_keep if c.overlay else None, s.frames_prepared_here,
                               tuple(s.token_ids()) if detail else None,
                               tuple(x.clone() for x in s.logit_log) if detail and s.logit_log is not None else None)

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
    def _advance(self, task: _Task, item: Forward | None = None) -> None:
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
        task = _Task(session, op, frame=pending)
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

    def _finish(self, task: _Task, result: object) -> None:
        self._tasks.pop(task.session.id, None)
        if task.frame is not None:
            self._ingested(task.session, task.frame, result)
        else:
            self._answer_done(task)

    def _fail(self, task: _Task, exc: BaseException) -> None:
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
        task = _Task(session, op, answer=Answer(q, s.last_t))
        self._tasks[session.id] = task
        self._touched.add(session.id)
        if not task.answer.silent:
            self._emit(task.answer.created(session.id))
        self._advance(task)

    def _close_answer(self, task: _Task) -> None:
        """End a cancelled answer where it got to."""
        self._tasks.pop(task.session.id, None)
        task.work = None
        try:
            task.op.close()
        except Exception as exc:
            self._fail(task, exc)
            return
        self._answer_done(task)

    def _answer_done(self, task: _Task) -> None:
        self._touched.add(task.session.id)
        self._out.events.extend(task.answer.done(task.session))


def check_session_config(lm: LoadedModel, config: SessionConfig) -> None:
    """``ValueError`` naming the minimum if every session with ``config`` would be refused (a budget below
    the session minimum): a configuration error at start, not one ``internal`` error per session."""
    StreamSession(lm, config).close()


def build_core(lm: LoadedModel, config: EngineConfig, session_config: SessionConfig, max_sessions: int,
               emit: Callable[[Outputs], None]) -> EngineCore:
    """A core over a KV pool of ``engine.kv_pool_tokens`` (None: sized as :func:`pool_size` says), after
    checking that ``session_config`` can open a session at all."""
    check_session_config(lm, session_config)
    budget = session_config.budget.max_tokens  # each session reserves its whole budget
    tokens = config.kv_pool_tokens or pool_size(lm, budget, max_sessions, config.kv_page_tokens,
                                                config.kv_pool_memory)
    pool = KVPool(lm.model.config.text_config, tokens, lm.device, lm.dtype, config.kv_page_tokens)
    return EngineCore(lm, pool, config.core(), emit)
