"""The engine as front ends see it: an :class:`EngineClient` that sends commands to the engine core and
publishes what comes back on the :class:`EventBus`.

The core (:mod:`streamer.core`) owns the model and every session's state; a client holds only
:class:`SessionHandle` values (an id and a mirror of the session's settings and counters, refreshed by
every batch the core sends) and the asyncio tasks that feed attached sources. Two transports:

- :class:`Engine`: the core on a thread of this process (the default);
- :class:`streamer.core.process.ProcessEngine`: the core in a child process, over a pipe.

Nothing crosses either boundary but commands (:mod:`streamer.core.commands`) and outputs. Checks that
need no model are made here, before sending, and raise :class:`EngineError` at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from model.config import SessionConfig
from model.kvpool import PoolStats
from model.sampling import Sampling

from .bus import EventBus
from .config import EngineConfig
from .core.commands import (
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
    SessionSettings,
    SessionSnapshot,
    SetInstruction,
    Snapshot,
    UpdateSettings,
)
from .errors import EngineError, check_text
from .events import Error, FrameCounts, SourceEnded
from .handle import SessionHandle
from .sources import Frame

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineClient", "EngineError", "EngineStats", "SessionHandle"]


@dataclass(frozen=True)
class EngineStats:
    """The engine's KV pool (None before it starts) and the packed steps the core ran."""

    pool: PoolStats | None
    steps: int
    step_items: int  # forwards run over all steps (step_items / steps = the mean batch)


class EngineClient:
    """What every front end talks to (the websocket server, the WebRTC offer, the demo, the commands).

    ``config``: the engine's settings (and each new session's live-setting defaults); ``session_config``:
    each new session's model settings; on CPU the pool holds ``max_sessions`` budgets. Transports
    implement ``_start_core``, ``_post``, ``_stop_core`` and ``alive``."""

    outlives_doors = False  # sessions live on after this front end stops (resumable elsewhere: the cluster)

    def __init__(self, config: EngineConfig | None = None, session_config: SessionConfig | None = None,
                 max_sessions: int = 16, bus: EventBus | None = None):
        self.config = config or EngineConfig()
        self.session_config = session_config or SessionConfig()
        self.max_sessions = max_sessions
        self.bus = bus or EventBus(self.config.subscriber_queue)
        self.sessions: dict[str, SessionHandle] = {}
        self._pumps: dict[str, asyncio.Task] = {}
        self._ids = itertools.count(1)
        self._responses = itertools.count(1)
        self._requests = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine = EngineState(None, 0, 0, FrameCounts(), 0)
        self.lost: str | None = None  # why the core is gone, once it is
        self.moved_hooks: list = []  # called with a session id that another front door took over

    # -- transport ----------------------------------------------------------------------------------
    async def _start_core(self) -> None:
        raise NotImplementedError

    def _post(self, request: int | None, command: object) -> None:
        raise NotImplementedError

    async def _stop_core(self) -> None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        """Whether the core runs (``/health``)."""
        raise NotImplementedError

    def _deliver(self, out: Outputs) -> None:
        """(Any thread.) Hand a batch from the core to the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_outputs, out)

    # -- lifecycle --------------------------------------------------------------------------------
    async def __aenter__(self) -> EngineClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._start_core()

    async def close(self) -> None:
        """Stop every source and the core; close every subscription."""
        for sid in list(self.sessions):
            try:
                await self.close_session(sid)
            except EngineError:
                pass
        await self._stop_core()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(EngineError("the engine stopped", "internal"))
        self.bus.close()

    def _print_pool(self, pool: PoolStats, device: object) -> None:
        ec = self.config
        print(f"vl3live: KV pool of {pool.pool_tokens} tokens x {pool.bytes_per_token} bytes = "
              f"{pool.pool_bytes / 2**30:.2f} GiB on {device} (pages of {ec.kv_page_tokens}); batching "
              f"{'on' if ec.batching else 'off'}, {ec.max_step_tokens} tokens per step", file=sys.stderr, flush=True)

    # -- outputs ----------------------------------------------------------------------------------
    def _on_outputs(self, out: Outputs) -> None:
        """(Loop.) A batch from the core: mirrors first, then events in order, then replies."""
        if out.engine is not None:
            self._engine = out.engine
        for st in out.states:
            handle = self.sessions.get(st.sid)
            if handle is not None:
                handle.mirror(st)
                handle.sent_questions = 0
        for ev in out.events:
            self.bus.publish(ev)
        for reply in out.replies:
            fut = self._waiting.pop(reply.request, None)
            if fut is None or fut.done():
                continue
            if reply.code is None:
                fut.set_result(reply.value)
            else:
                fut.set_exception(EngineError(reply.message or reply.code, reply.code))
        if out.lost is not None:
            self._lose(out.lost)

    def _lose(self, why: str) -> None:
        """(Loop.) The core is gone: every session is told (``worker_lost``) and every request fails."""
        if self.lost is not None:
            return
        self.lost = why
        log.error("the engine core is gone: %s", why)
        for sid, handle in self.sessions.items():
            if not handle.closed:
                self.bus.publish(Error(session=sid, code="worker_lost", message=f"the engine core is gone: {why}"))
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(EngineError(f"the engine core is gone: {why}", "worker_lost"))
        self._waiting.clear()

    # -- sending ----------------------------------------------------------------------------------
    def _send(self, command: object) -> None:
        if self.lost is not None:
            raise EngineError(f"the engine core is gone: {self.lost}", "worker_lost")
        self._post(None, command)

    async def _request(self, command: object, timeout: float | None = None) -> object:
        if self.lost is not None:
            raise EngineError(f"the engine core is gone: {self.lost}", "worker_lost")
        request = next(self._requests)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[request] = fut
        self._post(request, command)
        return await asyncio.wait_for(fut, timeout)

    # -- looking ----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """The KV pool's size and use, and the steps the core ran (``/metrics``, the bench)."""
        e = self._engine
        return EngineStats(e.pool, e.steps, e.step_items)

    def frame_counts(self) -> FrameCounts:
        """Frames by outcome over every session, closed ones included, and those pending now."""
        return self._engine.frames

    async def snapshot(self, session: SessionHandle | None = None, overlay: bool = False, detail: bool = False
                       ) -> SessionSnapshot | EngineSnapshot:
        """An exact look at one session (its settings, counters, cache statistics; ``overlay``: its last frame
        and DiffFP mask; ``detail``: every token id in its cache and the recorded logits) or at the engine."""
        snap = await self._request(Snapshot(session.id if session is not None else None, overlay, detail))
        if session is not None:
            session.mirror(snap.state)  # (a batch that came in meanwhile may be newer: the newest stays)
        return snap

    async def recent_steps(self) -> list[tuple[int, dict[str, int], float]]:
        """The last steps the core ran (at most 512): (step number, rows per session id, ms)."""
        return list((await self.snapshot()).recent_steps)

    def get(self, sid: str) -> SessionHandle:
        try:
            return self.sessions[sid]
        except KeyError:
            raise EngineError(f"no session {sid!r}") from None

    def counters(self, session: SessionHandle) -> FrameCounts:
        """``session``'s counters as of the last batch (one consistent snapshot: they add up)."""
        return session.counts

    def idle(self, session: SessionHandle) -> bool:
        """Nothing left to do for ``session`` as of the last batch."""
        return session.state.idle

    def answering(self, session: SessionHandle) -> bool:
        """Whether an answer is being generated in ``session`` (as of the last batch)."""
        return session.state.answering

    def health(self) -> dict:
        """What ``/health`` adds about the engine (the cluster: its workers; a core that is gone: why)."""
        return {"lost": self.lost} if self.lost is not None else {}

    def workers(self) -> list[dict]:
        """The workers behind this client (the cluster; ``/metrics`` labels their figures by name)."""
        return []

    # -- resume through another front end (the cluster; here a session lives and dies with this client) --
    async def remember(self, session: SessionHandle, token: str, resume_seconds: float, api: dict) -> None:
        """``session``'s current resume token and the front end's own counters for it."""

    def note(self, session: SessionHandle, api: dict) -> None:
        """The front end's own counters for ``session`` now (the cluster sends them to the worker now and
        then, so that a resume after this front end died still adds up)."""

    async def adopt(self, token: str) -> tuple[SessionHandle, dict, list] | None:
        """The session another front end registered under ``token``, its counters and the events it missed."""
        return None

    # -- sessions ---------------------------------------------------------------------------------
    async def open_session(self, session_config: SessionConfig | None = None, session_id: str | None = None,
                           settings: SessionSettings | None = None, record_logits: bool = False) -> SessionHandle:
        """A new session (its KV cache lives until :meth:`close_session`); ``record_logits`` keeps each
        answer token's logits (``snapshot(detail=True)``)."""
        sid = session_id or f"s{next(self._ids)}"
        if sid in self.sessions:
            raise EngineError(f"session {sid!r} exists")
        settings = settings or self.config.session_defaults()
        sampling = Sampling(max_new_tokens=self.config.max_new_tokens)
        opened = await self._request(OpenSession(sid, session_config or self.session_config, settings, sampling,
                                                 record_logits))
        handle = SessionHandle(sid, opened["config"], settings, sampling, opened["max_tokens"])
        handle.mirror(opened["state"])
        self.sessions[sid] = handle
        return handle

    async def reconfigure(self, session: SessionHandle, session_config: SessionConfig) -> None:
        """Rebuild ``session``'s model session with ``session_config`` (layout, budget, frame size...), only
        while nothing has entered its cache yet (``session_started`` after that)."""
        out = await self._request(Reconfigure(session.id, session_config))
        session.config, session.max_tokens = out["config"], out["max_tokens"]

    async def close_session(self, sid: str) -> None:
        """End a session: its source stops, its pages return to the pool, ``SessionClosed`` is published."""
        handle = self.sessions.pop(sid, None)
        if handle is None:
            return
        handle.closed = True
        pump = self._pumps.pop(sid, None)
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        if self.lost is None:
            await self._request(CloseSession(sid))

    def check_update(self, session: SessionHandle, diffp_threshold: float | None | object = ...,
                     sampling: Sampling | None = None, **fields) -> SessionSettings:
        """The live settings :meth:`update` would set (``EngineError`` if any of it is refused); changes
        nothing."""
        try:
            settings = session.settings.replace(**fields)
        except (TypeError, ValueError) as exc:
            raise EngineError(str(exc)) from None
        if sampling is not None and sampling.max_new_tokens > self.config.max_new_tokens:
            raise EngineError(f"generation.max_new_tokens: the server allows at most {self.config.max_new_tokens}")
        if diffp_threshold is not ... and diffp_threshold is not None and (
                isinstance(diffp_threshold, bool) or not isinstance(diffp_threshold, (int, float))
                or not 0 <= diffp_threshold < float("inf")):
            raise EngineError(f"diffp_threshold must be a finite number >= 0, got {diffp_threshold!r}")
        return settings

    def update(self, session: SessionHandle, diffp_threshold: float | None | object = ...,
               sampling: Sampling | None = None, **fields) -> None:
        """Change live settings of ``session``: fps and the proactive ones, the DiffFP threshold, and how its
        answers are generated (``sampling``). Checked first, all or nothing."""
        settings = self.check_update(session, diffp_threshold, sampling, **fields)
        threshold = UNSET if diffp_threshold is ... else diffp_threshold
        self._send(UpdateSettings(session.id, settings, sampling, threshold))
        session.settings = settings
        if sampling is not None:
            session.sampling = sampling
        if threshold != UNSET:
            session.config = dataclasses.replace(session.config, diffp_threshold=threshold)

    # -- frames -----------------------------------------------------------------------------------
    def push_frame(self, session: SessionHandle, frame: Frame | np.ndarray, event_id: str | None = None,
                   source: int = 0, continue_clock: bool = False) -> None:
        """Offer one frame (a ``Frame`` with its pts, or an RGB array stamped with its arrival time). Never
        blocks, never queues more than one per session in the core: every frame gets exactly one outcome
        in the counters (``FRAME_OUTCOMES``); ``event_id`` is carried on its error if it is refused."""
        if session.closed:
            raise EngineError(f"session {session.id!r} is closed")
        pts, rgb = (None, frame) if isinstance(frame, np.ndarray) else (frame.pts_seconds, frame.rgb)
        session.pushed += 1
        session.pushed_source += bool(source)
        self._send(PushFrame(session.id, rgb, pts, time.monotonic(), event_id, source, continue_clock))

    def attach(self, session: SessionHandle, source: AsyncIterator[Frame], continue_clock: bool = False
               ) -> asyncio.Task:
        """Feed ``source`` into ``session`` until it ends, it fails, or the session closes.

        With ``continue_clock`` the source's pts are shifted so its first frame comes one sampling
        period after the newest frame the session took (a file or camera that starts at 0 joining a
        session that already ran)."""
        if self.has_source(session):
            raise EngineError(f"session {session.id!r} already has a source", "source_busy")
        session.source_seq += 1
        task = asyncio.create_task(self._pump(session, source, session.source_seq, continue_clock),
                                   name=f"pump:{session.id}")
        self._pumps[session.id] = task
        return task

    async def detach(self, session: SessionHandle) -> bool:
        """Stop ``session``'s attached source; False if it had none running."""
        task = self._pumps.pop(session.id, None)
        if task is None or task.done():
            return False
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return True

    def has_source(self, session: SessionHandle) -> bool:
        task = self._pumps.get(session.id)
        return task is not None and not task.done()

    async def _pump(self, session: SessionHandle, source: AsyncIterator[Frame], seq: int,
                    continue_clock: bool) -> str | None:
        """Feed ``source`` into ``session``; the task's result is why the source failed (None: it ended)."""
        try:
            async for frame in source:
                if session.closed or self.lost is not None:
                    break
                self.push_frame(session, frame, source=seq, continue_clock=continue_clock)
            await self._settle_counts(session)
            self.bus.publish(SourceEnded(session=session.id, counts=session.counts))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the source is gone: say why, then that it ended
            log.info("session %s: source failed: %s", session.id, exc)  # the error event says it to listeners
            self.bus.publish(Error(session=session.id, code="source", message=str(exc)))
            await self._settle_counts(session)
            self.bus.publish(SourceEnded(session=session.id, counts=session.counts, error=str(exc)))
            return str(exc)
        finally:
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()
        return None

    async def _settle_counts(self, session: SessionHandle) -> None:
        """Bring the mirror's counts up to every frame sent (a snapshot after them)."""
        if not session.closed and self.lost is None:
            try:
                await self.snapshot(session)
            except EngineError:
                pass

    # -- questions --------------------------------------------------------------------------------
    def ask(self, session: SessionHandle, text: str, sampling: Sampling | None = None,
            event_id: str | None = None) -> str:
        """Queue a question, answered with ``sampling`` (default: the session's); returns its response id.
        Answers arrive as ``ResponseCreated`` / ``ResponseDelta`` / ``ResponseDone`` events; a question the
        full queue refuses raises ``queue_full`` here or, if the queue filled meanwhile, comes back as an
        ``Error`` event with its ``event_id``."""
        check_text(text, self.config.max_question_chars)
        sampling = sampling or session.sampling
        if sampling.max_new_tokens > self.config.max_new_tokens:
            raise EngineError(f"max_new_tokens must be in 1..{self.config.max_new_tokens}")
        limit = self.config.max_queued_questions
        if session.state.counts.questions_waiting + session.sent_questions >= limit:
            raise EngineError(f"{limit} questions are already waiting in session {session.id!r}", "queue_full")
        rid = f"r{next(self._responses)}"
        self._send(Ask(session.id, rid, text, sampling, event_id, time.monotonic()))
        session.sent_questions += 1
        return rid

    async def settled(self, session: SessionHandle, timeout: float = 60.0) -> None:
        """Wait until ``session`` has no frame, question or answer left and its events are published."""
        end = asyncio.get_running_loop().time() + timeout
        while not (await self.snapshot(session)).state.idle:
            if asyncio.get_running_loop().time() > end:
                raise TimeoutError(f"session {session.id!r} still busy after {timeout} s")
            await asyncio.sleep(0.01)

    def cancel(self, session: SessionHandle) -> bool:
        """End the answer being generated now (it stays in the cache as far as it got); False when none is
        (as of the last batch)."""
        if not session.state.answering:
            return False
        self._send(Cancel(session.id))
        return True

    def check_instruction(self, session: SessionHandle, text: str | None) -> None:
        """``EngineError`` if ``text`` cannot be a standing instruction (None clears it)."""
        if text is not None:
            check_text(text, self.config.max_question_chars, "instruction")

    def set_instruction(self, session: SessionHandle, text: str | None) -> None:
        """Set (or clear with None) the standing instruction the model answers by itself.

        ``stream`` layout: the instruction is asked once and pinned in the cache (a new one replaces it;
        clearing unpins it); after every frame the model's own ``respond_probability()`` decides
        (threshold and cooldown in ``engine``). ``video-turn``: it is asked again every
        ``engine.proactive_every`` seconds of stream time and an alert goes out only when the answer
        says something new.
        """
        self.check_instruction(session, text)
        self._send(SetInstruction(session.id, text, f"r{next(self._responses)}", time.monotonic()))
        session.instruction = text


class Engine(EngineClient):
    """The engine core on a thread of this process: ``async with Engine(lm, engine_cfg, session_cfg) as e:``."""

    def __init__(self, lm: object, config: EngineConfig | None = None, session_config: SessionConfig | None = None,
                 max_sessions: int = 16, bus: EventBus | None = None):
        super().__init__(config, session_config, max_sessions, bus)
        self.lm = lm
        self._core = None

    async def _start_core(self) -> None:
        if self._core is None:
            from .core.engine_core import build_core

            self._core = await asyncio.to_thread(build_core, self.lm, self.config, self.session_config,
                                                 self.max_sessions, self._deliver)
            self._engine = self._core.engine_state()
            self._print_pool(self._engine.pool, self.lm.device)
        self._core.start()

    def _post(self, request: int | None, command: object) -> None:
        self._core.post(request, command)

    async def _stop_core(self) -> None:
        if self._core is not None:
            await asyncio.to_thread(self._core.stop)

    @property
    def alive(self) -> bool:
        return self._core is not None and self._core.alive
