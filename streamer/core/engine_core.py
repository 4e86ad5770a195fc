"""The engine core: the one owner of the model, the KV pool and every session's live state.

It runs on one thread (in this process, a child process or a Ray actor: the client decides) and is
driven only by commands (:mod:`streamer.core.commands`) posted to its inbox; between two steps it
applies the commands that arrived, in arrival order, then runs one step, then hands everything that
iteration produced to ``emit`` as one :class:`Outputs` batch. Nothing outside holds a reference to a
session, a ``StreamSession``, a queue or a counter, so there is no lock to lend and no race to have.

This file is the command half (the inbox, frame admission, the commands, the output batches); the step
half (scheduling, the packed step, what each operation emits) is :mod:`streamer.core.steps`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from model import LoadedModel, StreamSession
from model.attention import PAGED_PAGE
from model.config import SessionConfig
from model.executor import Executor
from model.kvpool import KVPool, PoolFullError, pool_size
from model.sampling import Sampling

from ..config import CoreConfig, EngineConfig
from ..errors import EngineError
from ..events import Error, Event, FrameCounts, SessionClosed, SessionCreated
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
from .prep import Prepared, Preprocessing
from .state import FRAME_OUTCOMES, CoreSession, PendingFrame, PendingQuestion
from .steps import Steps, Task

log = logging.getLogger(__name__)

PINNED_MAX_NEW_TOKENS = 16  # a standing instruction's own answer (stream layout): a short acknowledgement


class EngineCore(Steps):
    """Sessions over one model and one KV pool, driven by commands (see the module doc).

    ``post(request, command)`` is the only way in (any thread); ``emit(outputs)`` is called from the
    core's thread with each iteration's batch."""

    def __init__(self, lm: LoadedModel, pool: KVPool, config: CoreConfig, emit: Callable[[Outputs], None]):
        self.lm, self.pool, self.config = lm, pool, config
        self.executor = Executor(lm, config.attention)
        self._emit_batch = emit
        self._inbox: list = []  # (request id or None, command), applied in order between two steps
        self._frame_at: dict[str, int] = {}  # sid -> where its newest PushFrame waits in the inbox
        self._admitted: set[str] = set()  # sessions whose counters frames changed since the last batch
        self._wake = threading.Condition()  # guards the inbox only
        self._sessions: dict[str, CoreSession] = {}
        self._tasks: dict[str, Task] = {}
        self._totals: Counter = Counter()  # frames by outcome over every session, closed ones included
        self._prep = Preprocessing(config.prep_threads, lambda done: self.post(None, done))
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
        if c.superseded:
            session.admission.superseded(c.superseded, c.source)
        pts = session.admission.admit(c.pts, c.source, c.continue_clock)
        self._admitted.add(c.sid)
        if pts is None:
            return None
        c = dataclasses.replace(c, pts=pts, source=0, continue_clock=False, superseded=0)  # admitted: its pts are final
        at = self._frame_at.get(c.sid)
        if at is not None:
            session.admission.replaced()
            self._inbox[at] = (None, c)
            return None
        self._frame_at[c.sid] = len(self._inbox)
        return c


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
        try:
            while True:
                with self._wake:
                    while self._running and not self._inbox and not self._admitted and not self._has_work():
                        self._wake.wait()  # (frames admitted and sampled out: their counts go out now)
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
                if self.executor.fault is not None:  # the device is unusable: say so and serve nothing more
                    self._out.lost = f"the device failed: {self.executor.fault}"
                    self._running = False
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
        match c:
            case Prepared():
                session = self._sessions.get(c.sid)
                if session is not None:  # (closed meanwhile: that frame was counted dropped then)
                    self._prep.prepared(session, c)
                    self._touched.add(c.sid)
                return None
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
    page = config.kv_page_tokens
    if config.attention == "paged" and page % PAGED_PAGE:  # flash's paged KV takes pages of 256 tokens
        page = -(-page // PAGED_PAGE) * PAGED_PAGE
        print(f"vl3live: KV pages of {page} tokens for attention 'paged' (engine.kv_page_tokens "
              f"{config.kv_page_tokens})", file=sys.stderr, flush=True)
    if config.kv_pool_tokens:
        tokens = max(config.kv_pool_tokens, page)
    else:  # (sessions' budgets rounded to the pages the pool really has)
        tokens, why = pool_size(lm, budget, max_sessions, page, config.kv_pool_memory)
        print(f"vl3live: KV pool sized by {why}: {tokens} tokens", file=sys.stderr, flush=True)
    pool = KVPool(lm.model.config.text_config, tokens, lm.device, lm.dtype, page)
    core = EngineCore(lm, pool, config.core(), emit)
    took = core.executor.warm_up(pool)
    if took > 1.0:
        print(f"vl3live: attention kernels compiled in {took:.1f} s (once per process; inductor caches them on "
              "disk)", file=sys.stderr, flush=True)
    return core
