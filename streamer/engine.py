"""The live engine: sources -> sampler -> latest-frame slot -> the model worker -> events.

Everything here runs on the asyncio event loop except the model steps, which run on the one
:class:`ModelWorker` thread. Events from the worker are handed to the loop and published on the
:class:`EventBus`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from model import LoadedModel, StreamSession
from model.config import SessionConfig
from model.executor import Executor
from model.kvpool import KVPool, PoolFullError, PoolStats, pool_size
from model.sampling import Sampling

from .bus import EventBus
from .clock import continued
from .config import EngineConfig
from .engine_session import FRAME_OUTCOMES, EngineSession, PendingFrame, PendingQuestion
from .errors import EngineError, check_text
from .events import Error, FrameCounts, SessionClosed, SessionCreated, SourceEnded
from .prep import Preprocessing
from .sources import FpsSampler, Frame
from .worker import ModelWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """The engine's KV pool (None before it starts) and the packed steps its worker ran."""

    pool: PoolStats | None
    steps: int
    step_items: int  # forwards run over all steps (step_items / steps = the mean batch)


class Engine:
    """Sessions over one model and one KV pool: ``async with Engine(lm, engine_cfg, session_cfg) as engine:``.

    ``config`` holds the engine's settings (and each new session's defaults of its per-session ones);
    ``session_config`` each new session's model settings; on CPU the pool holds ``max_sessions`` budgets."""

    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None, session_config: SessionConfig | None = None,
                 max_sessions: int = 16, bus: EventBus | None = None):
        self.lm = lm
        self.config = config or EngineConfig()
        self.session_config = session_config or SessionConfig()
        self.max_sessions = max_sessions
        self.bus = bus or EventBus(self.config.subscriber_queue)
        self.sessions: dict[str, EngineSession] = {}
        self._pumps: dict[str, asyncio.Task] = {}
        self._ids = itertools.count(1)
        self._responses = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        ec = self.config
        self.pool: KVPool | None = None  # made at start
        self.executor = Executor(lm)
        self._worker = ModelWorker(self._emit_threadsafe, self.executor, ec.batching, ec.max_step_tokens,
                                   ec.min_chunk_tokens)
        self._prep = Preprocessing(ec.prep_threads, self._worker.condition)
        self.frame_totals: Counter = Counter()  # frames by outcome over every session, closed ones included
        self._closing: dict[str, EngineSession] = {}  # sessions being closed (no longer in self.sessions)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.pool is None:
            ec = self.config
            budget = self.session_config.budget.max_tokens  # each session reserves its whole budget
            tokens = ec.kv_pool_tokens or pool_size(self.lm, budget, self.max_sessions, ec.kv_page_tokens,
                                                    ec.kv_pool_memory)
            self.pool = await asyncio.to_thread(KVPool, self.lm.model.config.text_config, tokens, self.lm.device,
                                                self.lm.dtype, ec.kv_page_tokens)
            print(f"vl3live: KV pool of {self.pool.tokens} tokens x {self.pool.bytes_per_token} bytes "
                  f"= {self.pool.nbytes / 2**30:.2f} GiB on {self.lm.device} (pages of {ec.kv_page_tokens}); "
                  f"batching {'on' if ec.batching else 'off'}, {ec.max_step_tokens} tokens per step",
                  file=sys.stderr, flush=True)
        self._worker.start()

    async def close(self) -> None:
        """Stop every source and the worker; close every subscription."""
        for sid in list(self.sessions):
            await self.close_session(sid)
        await asyncio.to_thread(self._worker.stop)
        await asyncio.to_thread(self._prep.shutdown)
        self.bus.close()

    def recent_steps(self) -> list[tuple[int, dict[str, int], float]]:
        """The last steps the worker ran (at most 512): (step number, rows per session id, ms)."""
        with self._worker.condition:
            return list(self._worker.history)

    def hold(self) -> threading.Condition:
        """``with engine.hold():`` the model worker starts nothing new meanwhile (the step running now goes
        on): several requests queued at once, or a consistent look at several sessions."""
        return self._worker.condition

    @property
    def alive(self) -> bool:
        """Whether the model worker runs (``/health``)."""
        return self._worker.alive

    def idle(self, session: EngineSession) -> bool:
        """Nothing left to do for ``session`` now (its last events may still be on their way)."""
        return self._worker.idle(session)

    def stats(self) -> EngineStats:
        """The KV pool's size and use, and the steps the worker ran (``/metrics``, the bench)."""
        return EngineStats(self.pool.stats() if self.pool is not None else None, self._worker.steps,
                           self._worker.step_items)

    # -- events -----------------------------------------------------------------------------------
    def _emit_threadsafe(self, events: list) -> None:
        """Hand a step's events to the event loop in one wake-up (they are published in order)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._publish_all, events)

    def _publish_all(self, events: list) -> None:
        for ev in events:
            self.bus.publish(ev)

    # -- sessions ---------------------------------------------------------------------------------
    async def _on_worker(self, fn):
        """Run ``fn`` (model work) on the model worker's thread and wait for it."""
        return await asyncio.wrap_future(self._worker.submit(fn))

    async def open_session(self, session_config: SessionConfig | None = None, session_id: str | None = None,
                           engine_config: EngineConfig | None = None) -> EngineSession:
        """A new session (its KV cache lives until :meth:`close_session`)."""
        sid = session_id or f"s{next(self._ids)}"
        if sid in self.sessions:
            raise EngineError(f"session {sid!r} exists")
        cfg = session_config or self.session_config
        try:
            stream = await self._on_worker(lambda: StreamSession(self.lm, cfg, self.pool, self.executor))
        except PoolFullError as exc:
            raise EngineError(str(exc), "too_many_sessions") from None
        if sid in self.sessions:
            raise EngineError(f"session {sid!r} exists")
        ec = dataclasses.replace(engine_config or self.config)
        session = EngineSession(sid, stream, ec, Sampling(max_new_tokens=ec.max_new_tokens), totals=self.frame_totals)
        session.fresh_len = stream.cache_len
        self.sessions[sid] = session
        self._worker.add(session)
        self.bus.publish(SessionCreated(session=sid, layout=stream.config.layout, max_tokens=stream.max_tokens))
        return session

    async def reconfigure(self, session: EngineSession, session_config: SessionConfig) -> None:
        """Rebuild ``session``'s model session with ``session_config`` (layout, budget, frame size...).

        Only while nothing has entered its cache yet: the cache is shaped by these settings, so a
        started session refuses (open a new one instead). Queued questions and the standing
        instruction carry over.
        """
        def rebuild() -> StreamSession:
            if session.processed or session.stream.cache_len != session.fresh_len or self._worker.busy(session) \
                    or session.in_step:
                raise EngineError("layout, budget and frame size can only change before the first frame "
                                  "or question; open a new session to change them", "session_started")
            old = session.stream
            old.close()  # its pages make room for the new budget
            try:
                return StreamSession(self.lm, session_config, self.pool, self.executor)
            except PoolFullError as exc:
                session.stream = StreamSession(self.lm, old.config, self.pool, self.executor)  # as it was
                raise EngineError(str(exc), "too_many_sessions") from None
            except BaseException:
                session.stream = StreamSession(self.lm, old.config, self.pool, self.executor)
                raise

        stream = await self._on_worker(rebuild)
        with self._worker.condition:
            session.stream = stream
            session.fresh_len = stream.cache_len

    def check_update(self, session: EngineSession, diffp_threshold: float | None | object = ...,
                     sampling: Sampling | None = None, **engine_fields) -> EngineConfig:
        """What :meth:`update` would set (``EngineError`` if any of it is refused); changes nothing."""
        try:
            cfg = dataclasses.replace(session.cfg, **engine_fields)
        except (TypeError, ValueError) as exc:
            raise EngineError(str(exc)) from None
        if sampling is not None and sampling.max_new_tokens > self.config.max_new_tokens:
            raise EngineError(f"generation.max_new_tokens: the server allows at most {self.config.max_new_tokens}")
        if diffp_threshold is not ... and diffp_threshold is not None and (
                isinstance(diffp_threshold, bool) or not isinstance(diffp_threshold, (int, float))
                or not 0 <= diffp_threshold < float("inf")):
            raise EngineError(f"diffp_threshold must be a finite number >= 0, got {diffp_threshold!r}")
        return cfg

    def update(self, session: EngineSession, diffp_threshold: float | None | object = ...,
               sampling: Sampling | None = None, **engine_fields) -> None:
        """Change live settings of ``session``: engine fields (fps, proactive_threshold...), the DiffFP
        threshold, and how its answers are generated (``sampling``). Checked first, all or nothing."""
        cfg = self.check_update(session, diffp_threshold, sampling, **engine_fields)
        with self._worker.condition:
            if cfg.fps != session.cfg.fps:
                session.sampler = FpsSampler(cfg.fps, last=session.sampler.last)  # the clock goes on
            session.cfg = cfg
            if sampling is not None:
                session.sampling = sampling
            if diffp_threshold is not ...:
                session.stream.set_diffp_threshold(diffp_threshold)

    def counters(self, session: EngineSession) -> FrameCounts:
        """``session``'s counters as one consistent snapshot (they add up: see ``EngineSession.pending``)."""
        with self._worker.condition:
            return session.counters()

    def frame_counts(self) -> FrameCounts:
        """Frames by outcome over every session, closed ones included, and those pending now."""
        with self._worker.condition:
            counts = {k: self.frame_totals[k] for k in ("accepted", "source_frames", *FRAME_OUTCOMES)}
            pending = sum(session.pending for session in [*self.sessions.values(), *self._closing.values()])
        return FrameCounts(**counts, pending=pending)

    def get(self, sid: str) -> EngineSession:
        try:
            return self.sessions[sid]
        except KeyError:
            raise EngineError(f"no session {sid!r}") from None

    async def close_session(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        self._closing[sid] = session  # its pending frames still count until the worker has let go of it
        try:
            pump = self._pumps.pop(sid, None)
            if pump is not None:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            await asyncio.to_thread(self._worker.remove, session)
        finally:
            self._closing.pop(sid, None)
        self.bus.publish(SessionClosed(session=sid, counts=self.counters(session)))

    # -- frames -----------------------------------------------------------------------------------
    def arrival_time(self, session: EngineSession) -> float:
        """The stream time of a frame without pts arriving now (:class:`ArrivalClock`)."""
        with self._worker.condition:
            return session.clock.now(session.sampler.last, session.sampler.period)

    def push_frame(self, session: EngineSession, frame: Frame, event_id: str | None = None, source: bool = False) -> bool:
        """Offer one frame; returns whether the sampler took it. Never blocks, never queues more than one.

        Every frame offered gets exactly one outcome (``FRAME_OUTCOMES``); ``event_id`` is carried on
        its error if the model session refuses it; ``source``: it came from an attached source."""
        if session.closed:
            raise EngineError(f"session {session.id!r} is closed")
        session.fps_in.tick()
        with self._worker.condition:
            session.count("accepted")
            if source:
                session.count("source_frames")
            if not session.sampler.accept(frame.pts_seconds):
                session.count("sampled_out")
                return False
            if session.incoming is not None:
                session.count("dropped")
            session.incoming = PendingFrame(frame, time.monotonic(), event_id, prepared_by=session.stream)
            self._prep.feed(session)
            self._worker.condition.notify_all()
        return True

    def attach(self, session: EngineSession, source: AsyncIterator[Frame], continue_clock: bool = False) -> asyncio.Task:
        """Feed ``source`` into ``session`` until it ends, it fails, or the session closes.

        With ``continue_clock`` the source's pts are shifted so its first frame comes one sampling
        period after the newest frame the session took (a file or camera that starts at 0 joining a
        session that already ran)."""
        if session.id in self._pumps and not self._pumps[session.id].done():
            raise EngineError(f"session {session.id!r} already has a source", "source_busy")
        if continue_clock:
            source = continued(source, session.sampler)
        task = asyncio.create_task(self._pump(session, source), name=f"pump:{session.id}")
        self._pumps[session.id] = task
        return task

    async def detach(self, session: EngineSession) -> bool:
        """Stop ``session``'s attached source; False if it had none running."""
        task = self._pumps.pop(session.id, None)
        if task is None or task.done():
            return False
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return True

    def has_source(self, session: EngineSession) -> bool:
        task = self._pumps.get(session.id)
        return task is not None and not task.done()

    async def _pump(self, session: EngineSession, source: AsyncIterator[Frame]) -> str | None:
        """Feed ``source`` into ``session``; the task's result is why the source failed (None: it ended)."""
        try:
            async for frame in source:
                if session.closed:
                    break
                self.push_frame(session, frame, source=True)
            self.bus.publish(SourceEnded(session=session.id, counts=self.counters(session)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the source is gone: say why, then that it ended
            log.info("session %s: source failed: %s", session.id, exc)  # the error event says it to listeners
            self.bus.publish(Error(session=session.id, code="source", message=str(exc)))
            self.bus.publish(SourceEnded(session=session.id, counts=self.counters(session), error=str(exc)))
            return str(exc)
        finally:
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()

    # -- questions --------------------------------------------------------------------------------
    def ask(self, session: EngineSession, text: str, sampling: Sampling | None = None,
            event_id: str | None = None) -> str:
        """Queue a question, answered with ``sampling`` (default: the session's); returns its response id.
        Answers arrive as ``ResponseCreated`` / ``ResponseDelta`` / ``ResponseDone`` events."""
        cfg = session.cfg
        check_text(text, cfg.max_question_chars)
        sampling = sampling or session.sampling
        if sampling.max_new_tokens > self.config.max_new_tokens:
            raise EngineError(f"max_new_tokens must be in 1..{self.config.max_new_tokens}")
        rid = f"r{next(self._responses)}"
        with self._worker.condition:
            if len(session.questions) >= cfg.max_queued_questions:
                raise EngineError(f"{cfg.max_queued_questions} questions are already waiting in session "
                                  f"{session.id!r}", "queue_full")
            session.questions.append(PendingQuestion(rid, text, sampling, event_id))
            self._worker.condition.notify_all()
        return rid

    async def settled(self, session: EngineSession, timeout: float = 60.0) -> None:
        """Wait until ``session`` has no frame, question or answer left and its events are published."""
        end = asyncio.get_running_loop().time() + timeout
        while not self._worker.idle(session):
            if asyncio.get_running_loop().time() > end:
                raise TimeoutError(f"session {session.id!r} still busy after {timeout} s")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # events handed over with call_soon_threadsafe run before this returns
        await asyncio.sleep(0)

    def answering(self, session: EngineSession) -> bool:
        """Whether an answer is being generated in ``session`` now."""
        return self._worker.answering(session)

    def cancel(self, session: EngineSession) -> bool:
        """End the answer being generated now (it stays in the cache as far as it got)."""
        return self._worker.cancel(session)

    @staticmethod
    def check_instruction(session: EngineSession, text: str | None) -> None:
        """``EngineError`` if ``text`` cannot be a standing instruction (None clears it)."""
        if text is not None:
            check_text(text, session.cfg.max_question_chars, "instruction")

    def set_instruction(self, session: EngineSession, text: str | None) -> None:
        """Set (or clear with None) the standing instruction the model answers by itself.

        ``stream`` layout: the instruction is asked once and pinned in the cache; after every frame
        the model's own ``respond_probability()`` decides (threshold and cooldown in
        ``engine``). ``video-turn``: it is asked again every ``engine.proactive_every`` seconds
        of stream time and an alert goes out only when the answer says something new.
        """
        self.check_instruction(session, text)
        with self._worker.condition:
            session.instruction = text
            session.last_instruction_t = None
            session.last_alert_t = None  # the cooldown is between answers to one instruction
            session.last_alert_text = ""
            if session.stream.config.layout == "stream":
                session.stream.unpin()
                session.instruction_queued = text is not None
                if text is not None:
                    pinned = Sampling(max_new_tokens=min(16, self.config.max_new_tokens))  # greedy: an ack
                    session.questions.append(PendingQuestion(f"r{next(self._responses)}", text, pinned, pin=True))
            self._worker.condition.notify_all()
