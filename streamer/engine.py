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
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch

from model import LoadedModel, StreamSession
from model.config import Config, EngineConfig, SessionConfig
from model.executor import Executor
from model.kvpool import KVPool, PoolFullError, bytes_per_token
from model.sampling import check_sampling

from .bus import Event, EventBus
from .live import FRAME_OUTCOMES, LiveSession, PendingFrame, Question
from .sources import FpsSampler, Frame
from .worker import ModelWorker

log = logging.getLogger(__name__)


SAMPLING_FIELDS = frozenset({"do_sample", "temperature", "top_k", "top_p", "seed"})


def _check_sampling(sampling: dict) -> None:
    bad = set(sampling) - SAMPLING_FIELDS
    if bad:
        raise EngineError(f"unknown sampling settings {sorted(bad)}; known: {sorted(SAMPLING_FIELDS)}")
    try:
        check_sampling(**sampling)
    except ValueError as exc:
        raise EngineError(f"sampling: {exc}") from None


class EngineError(ValueError):
    """A request the engine refuses (unknown session, full question queue, too long a question).

    ``code`` is the websocket protocol's error code for it (``streamer/protocol.py``)."""

    def __init__(self, message: str, code: str = "invalid_field"):
        super().__init__(message)
        self.code = code


def pool_tokens(lm: LoadedModel, config: Config) -> int:
    """The KV pool's size in tokens: ``engine.kv_pool_tokens``, else ``engine.kv_pool_memory`` of the free
    GPU memory (CUDA), else room for ``server.max_sessions`` sessions at the session's budget (CPU)."""
    ec = config.engine
    if ec.kv_pool_tokens is not None:
        return ec.kv_pool_tokens
    per_token = bytes_per_token(lm.model.config.text_config, lm.dtype)
    if lm.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(lm.device)
        return max(ec.kv_page_tokens, int(free * ec.kv_pool_memory) // per_token)
    budget = config.session.budget.max_tokens or lm.model.config.text_config.max_position_embeddings
    return max(ec.kv_page_tokens, config.server.max_sessions * (budget + ec.kv_page_tokens))


class Engine:
    """Sessions over one model and one KV pool. Use ``async with Engine(lm, config) as engine:``."""

    def __init__(self, lm: LoadedModel, config: Config | None = None, bus: EventBus | None = None):
        self.lm = lm
        self.config = config or Config()
        self.bus = bus or EventBus(self.config.engine.subscriber_queue)
        self.sessions: dict[str, LiveSession] = {}
        self._pumps: dict[str, asyncio.Task] = {}
        self._ids = itertools.count(1)
        self._responses = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        ec = self.config.engine
        self.pool: KVPool | None = None  # made at start
        self.executor = Executor(lm)
        self._worker = ModelWorker(self._emit_threadsafe, self.executor, ec.batching, ec.max_step_tokens,
                                   ec.min_chunk_tokens)
        # (no torch.set_num_threads in these threads: OpenMP can deadlock in it, pytorch/pytorch#75147)
        self._prep = ThreadPoolExecutor(ec.prep_threads, thread_name_prefix="vl3live-prep")
        self.frame_totals: Counter = Counter()  # frames by outcome over every session, closed ones included
        self._closing: dict[str, LiveSession] = {}  # sessions being closed (no longer in self.sessions)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.pool is None:
            ec = self.config.engine
            tokens = pool_tokens(self.lm, self.config)
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
        await asyncio.to_thread(self._prep.shutdown, True, cancel_futures=True)
        self.bus.close()

    def recent_steps(self) -> list[tuple[int, dict[str, int], float]]:
        """The last steps the worker ran (at most 512): (step number, rows per session id, ms)."""
        with self._worker.lock:
            return list(self._worker.history)

    def pool_stats(self) -> dict[str, int]:
        """The KV pool's size and use (``/metrics``), and the steps the worker ran."""
        stats = self.pool.stats() if self.pool is not None else {}
        stats.update(steps=self._worker.steps, step_items=self._worker.step_items)
        return stats

    # -- events -----------------------------------------------------------------------------------
    def _emit_threadsafe(self, events: list[Event]) -> None:
        """Hand a step's events to the event loop in one wake-up (they are published in order)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._publish_all, events)

    def _publish_all(self, events: list[Event]) -> None:
        for ev in events:
            self.bus.publish(ev)

    # -- sessions ---------------------------------------------------------------------------------
    async def _on_worker(self, fn):
        """Run ``fn`` (model work) on the model worker's thread and wait for it."""
        return await asyncio.wrap_future(self._worker.submit(fn))

    async def open_session(self, session_config: SessionConfig | None = None, session_id: str | None = None,
                           engine_config: EngineConfig | None = None) -> LiveSession:
        """A new session (its KV cache lives until :meth:`close_session`)."""
        sid = session_id or f"s{next(self._ids)}"
        if sid in self.sessions:
            raise EngineError(f"session {sid!r} exists")
        cfg = session_config or self.config.session
        try:
            session = await self._on_worker(lambda: StreamSession(self.lm, cfg, self.pool, self.executor))
        except PoolFullError as exc:
            raise EngineError(str(exc), "too_many_sessions") from None
        if sid in self.sessions:
            raise EngineError(f"session {sid!r} exists")
        ls = LiveSession(sid, session, dataclasses.replace(engine_config or self.config.engine),
                         totals=self.frame_totals)
        ls.fresh_len = session.cache_len
        self.sessions[sid] = ls
        self._worker.add(ls)
        self.bus.publish(Event("session.created", sid, {"layout": session.config.layout,
                                                        "max_tokens": session.max_tokens}))
        return ls

    async def reconfigure(self, ls: LiveSession, session_config: SessionConfig) -> None:
        """Rebuild ``ls``'s model session with ``session_config`` (layout, budget, frame size...).

        Only while nothing has entered its cache yet: the cache is shaped by these settings, so a
        started session refuses (open a new one instead). Queued questions and the standing
        instruction carry over.
        """
        def rebuild() -> StreamSession:
            if ls.processed or ls.session.cache_len != ls.fresh_len or self._worker.busy(ls) or ls.in_step:
                raise EngineError("layout, budget and frame size can only change before the first frame "
                                  "or question; open a new session to change them", "session_started")
            old = ls.session
            old.close()  # its pages make room for the new budget
            try:
                return StreamSession(self.lm, session_config, self.pool, self.executor)
            except PoolFullError as exc:
                ls.session = StreamSession(self.lm, old.config, self.pool, self.executor)  # as it was
                raise EngineError(str(exc), "too_many_sessions") from None
            except BaseException:
                ls.session = StreamSession(self.lm, old.config, self.pool, self.executor)
                raise

        session = await self._on_worker(rebuild)
        with self._worker.lock:
            ls.session = session
            ls.fresh_len = session.cache_len

    def check_update(self, ls: LiveSession, diffp_threshold: float | None | object = ...,
                     sampling: dict | None = None, **engine_fields) -> EngineConfig:
        """What :meth:`update` would set (``EngineError`` if any of it is refused); changes nothing."""
        try:
            cfg = dataclasses.replace(ls.cfg, **engine_fields)
        except (TypeError, ValueError) as exc:
            raise EngineError(str(exc)) from None
        if sampling is not None:
            _check_sampling(sampling)
        if diffp_threshold is not ... and diffp_threshold is not None and (
                isinstance(diffp_threshold, bool) or not isinstance(diffp_threshold, (int, float))
                or not 0 <= diffp_threshold < float("inf")):
            raise EngineError(f"diffp_threshold must be a finite number >= 0, got {diffp_threshold!r}")
        return cfg

    def update(self, ls: LiveSession, diffp_threshold: float | None | object = ..., sampling: dict | None = None,
               **engine_fields) -> None:
        """Change live settings of ``ls``: engine fields (fps, proactive_threshold, max_new_tokens...),
        the DiffFP threshold, and the sampling settings of its answers. Checked first, all or nothing."""
        cfg = self.check_update(ls, diffp_threshold, sampling, **engine_fields)
        with self._worker.lock:
            if cfg.fps != ls.cfg.fps:
                ls.sampler = FpsSampler(cfg.fps, last=ls.sampler.last)  # the clock goes on
            ls.cfg = cfg
            if sampling is not None:
                ls.sampling = dict(sampling)
            if diffp_threshold is not ...:
                ls.session.set_diffp_threshold(diffp_threshold)

    def counters(self, ls: LiveSession) -> dict:
        """``ls``'s counters as one consistent snapshot (they add up: see ``LiveSession.pending``)."""
        with self._worker.lock:
            return ls.counters()

    def frame_counts(self) -> dict[str, int]:
        """Frames by outcome over every session, closed ones included, and those pending now."""
        with self._worker.lock:
            counts = {k: self.frame_totals[k] for k in ("accepted", "source_frames", *FRAME_OUTCOMES)}
            counts["pending"] = sum(ls.pending for ls in [*self.sessions.values(), *self._closing.values()])
        return counts

    def get(self, sid: str) -> LiveSession:
        try:
            return self.sessions[sid]
        except KeyError:
            raise EngineError(f"no session {sid!r}") from None

    async def close_session(self, sid: str) -> None:
        ls = self.sessions.pop(sid, None)
        if ls is None:
            return
        self._closing[sid] = ls  # its pending frames still count until the worker has let go of it
        try:
            pump = self._pumps.pop(sid, None)
            if pump is not None:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            await asyncio.to_thread(self._worker.remove, ls)
        finally:
            self._closing.pop(sid, None)
        self.bus.publish(Event("session.closed", sid, self.counters(ls)))

    # -- frames -----------------------------------------------------------------------------------
    def push_frame(self, ls: LiveSession, frame: Frame, event_id: str | None = None, source: bool = False) -> bool:
        """Offer one frame; returns whether the sampler took it. Never blocks, never queues more than one.

        Every frame offered gets exactly one outcome (``FRAME_OUTCOMES``); ``event_id`` is carried on
        its error if the model session refuses it; ``source``: it came from an attached source."""
        if ls.closed:
            raise EngineError(f"session {ls.id!r} is closed")
        ls.fps_in.tick()
        with self._worker.lock:
            ls.count("accepted")
            if source:
                ls.count("source_frames")
            if not ls.sampler.accept(frame.pts_seconds):
                ls.count("sampled_out")
                return False
            if ls.incoming is not None:
                ls.count("dropped")
            ls.incoming = PendingFrame(frame, time.monotonic(), event_id, prepared_by=ls.session)
            self._feed(ls)
            self._worker.lock.notify_all()
        return True

    def _feed(self, ls: LiveSession) -> None:
        """Under the lock: preprocess the newest frame unless one of the session's frames is being
        preprocessed now. Resize/normalize/patchify run on a preprocessing thread, never on the model
        thread in front of other sessions' steps; one at a time per session, so a session flooding
        frames costs at most one preprocessing at a time, and its slot always holds the newest
        frame made, ready when the session's turn comes."""
        if ls.closed or ls.incoming is None or ls.preparing is not None:
            return
        pending, ls.incoming = ls.incoming, None
        try:
            fut = self._prep.submit(pending.prepared_by.prepare, pending.frame.rgb)
        except RuntimeError:  # shutting down: the model thread preprocesses it
            if ls.frame is not None:
                ls.count("dropped")
            ls.frame = pending
            return
        ls.preparing = pending
        fut.add_done_callback(lambda f: self._prepared(ls, f))

    def _prepared(self, ls: LiveSession, fut) -> None:
        """A frame's preprocessing ended (on its thread): it becomes the session's latest frame."""
        with self._worker.lock:
            pending, ls.preparing = ls.preparing, None
            if pending is None:
                return
            pending.prepared = fut
            if ls.closed:
                ls.count("dropped")
            else:
                if ls.frame is not None:  # the newest wins
                    ls.count("dropped")
                ls.frame = pending
                self._feed(ls)  # a newer frame came meanwhile
            self._worker.lock.notify_all()

    def attach(self, ls: LiveSession, source: AsyncIterator[Frame], continue_clock: bool = False) -> asyncio.Task:
        """Feed ``source`` into ``ls`` until it ends, it fails, or the session closes.

        With ``continue_clock`` the source's pts are shifted so its first frame comes one sampling
        period after the newest frame the session took (a file or camera that starts at 0 joining a
        session that already ran)."""
        if ls.id in self._pumps and not self._pumps[ls.id].done():
            raise EngineError(f"session {ls.id!r} already has a source", "source_busy")
        if continue_clock:
            source = self._continued(ls, source)
        task = asyncio.create_task(self._pump(ls, source), name=f"pump:{ls.id}")
        self._pumps[ls.id] = task
        return task

    @staticmethod
    async def _continued(ls: LiveSession, source: AsyncIterator[Frame]) -> AsyncIterator[Frame]:
        offset = None
        try:
            async for f in source:
                if offset is None:
                    last = ls.sampler.last
                    offset = 0.0 if last is None else last + ls.sampler.period - f.pts_seconds
                yield Frame(f.pts_seconds + offset, f.rgb)
        finally:
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()

    async def detach(self, ls: LiveSession) -> bool:
        """Stop ``ls``'s attached source; False if it had none running."""
        task = self._pumps.pop(ls.id, None)
        if task is None or task.done():
            return False
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return True

    def has_source(self, ls: LiveSession) -> bool:
        task = self._pumps.get(ls.id)
        return task is not None and not task.done()

    async def _pump(self, ls: LiveSession, source: AsyncIterator[Frame]) -> str | None:
        """Feed ``source`` into ``ls``; the task's result is why the source failed (None: it ended)."""
        try:
            async for frame in source:
                if ls.closed:
                    break
                self.push_frame(ls, frame, source=True)
            self.bus.publish(Event("source.ended", ls.id, self.counters(ls)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the source is gone: say why, then that it ended
            log.info("session %s: source failed: %s", ls.id, exc)  # the error event says it to listeners
            self.bus.publish(Event("error", ls.id, {"code": "source", "message": str(exc)}))
            self.bus.publish(Event("source.ended", ls.id, {**self.counters(ls), "error": str(exc)}))
            return str(exc)
        finally:
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()

    # -- questions --------------------------------------------------------------------------------
    def ask(self, ls: LiveSession, text: str, event_id: str | None = None, max_new_tokens: int | None = None) -> str:
        """Queue a question; returns its response id. Answers arrive as ``response.*`` events."""
        cfg = ls.cfg
        if not isinstance(text, str) or not text.strip():
            raise EngineError("question must be a non-empty string")
        if len(text) > cfg.max_question_chars:
            raise EngineError(f"question is {len(text)} characters; the limit is {cfg.max_question_chars}",
                              "question_too_long")
        n = max_new_tokens or cfg.max_new_tokens
        if n < 1 or n > cfg.max_new_tokens:
            raise EngineError(f"max_new_tokens must be in 1..{cfg.max_new_tokens}")
        rid = f"r{next(self._responses)}"
        with self._worker.lock:
            if len(ls.questions) >= cfg.max_queued_questions:
                raise EngineError(f"{cfg.max_queued_questions} questions are already waiting in session {ls.id!r}",
                                  "queue_full")
            ls.questions.append(Question(rid, text, event_id, max_new_tokens=n))
            self._worker.lock.notify_all()
        return rid

    async def settled(self, ls: LiveSession, timeout: float = 60.0) -> None:
        """Wait until ``ls`` has no frame, question or answer left and its events are published."""
        end = asyncio.get_running_loop().time() + timeout
        while not self._worker.idle(ls):
            if asyncio.get_running_loop().time() > end:
                raise TimeoutError(f"session {ls.id!r} still busy after {timeout} s")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # events handed over with call_soon_threadsafe run before this returns
        await asyncio.sleep(0)

    def answering(self, ls: LiveSession) -> bool:
        """Whether an answer is being generated in ``ls`` now."""
        return self._worker.answering(ls)

    def cancel(self, ls: LiveSession) -> bool:
        """End the answer being generated now (it stays in the cache as far as it got)."""
        return self._worker.cancel(ls)

    @staticmethod
    def check_instruction(ls: LiveSession, text: str | None) -> None:
        """``EngineError`` if ``text`` cannot be a standing instruction (None clears it)."""
        if text is None:
            return
        if not isinstance(text, str) or not text.strip():
            raise EngineError("instruction must be non-empty text (null or \"\" clears it)")
        if len(text) > ls.cfg.max_question_chars:
            raise EngineError(f"instruction is {len(text)} characters; the limit is {ls.cfg.max_question_chars}",
                              "question_too_long")

    def set_instruction(self, ls: LiveSession, text: str | None) -> None:
        """Set (or clear with None) the standing instruction the model answers by itself.

        ``stream`` layout: the instruction is asked once and pinned in the cache; after every frame
        the model's own ``respond_probability()`` decides (threshold and cooldown in
        ``engine``). ``video-turn``: it is asked again every ``engine.proactive_every`` seconds
        of stream time and an alert goes out only when the answer says something new.
        """
        self.check_instruction(ls, text)
        with self._worker.lock:
            ls.instruction = text
            ls.last_instruction_t = None
            ls.last_alert_text = ""
            if ls.session.config.layout == "stream":
                ls.session.unpin()
                ls.instruction_queued = text is not None
                if text is not None:
                    ls.questions.append(Question(f"r{next(self._responses)}", text, pin=True,
                                                 max_new_tokens=min(16, ls.cfg.max_new_tokens)))
            self._worker.lock.notify_all()
