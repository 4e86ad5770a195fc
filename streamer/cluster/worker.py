"""A GPU worker: the engine core of one GPU as a Ray actor, shared by every front door.

The worker loads the model once, builds an :class:`~streamer.core.engine_core.EngineCore` (its KV pool
and every session on it) and runs it on a thread. Front doors (:mod:`streamer.cluster.door`) talk to it
with three calls: ``post`` (a batch of commands, numbered per door so that they apply in the order sent
whatever order Ray runs the calls in), ``poll`` (a long poll for the outputs of that door's sessions)
and ``claim`` (a resume token's session moves to the calling door, with the events it missed).

Each session belongs to the front door that opened or last claimed it: its events and states go to that
door only. A door that stops polling for ``cluster.door_timeout`` is gone; its sessions keep their cache
and wait ``server.resume_seconds`` (as the door registered them) for a resume through another door, then
close. The worker is also the session directory: it keeps a hash of each session's resume token, so any
door can find a session by asking the workers. Nothing here grows without bound: a door's undelivered
outputs are capped (``cluster.max_door_events``; past it the door counts as gone), a doorless session keeps
at most ``engine.subscriber_queue`` events, and frames are admitted by the core (one per session waits).

The class is plain Python; :func:`streamer.cluster.ray_env.worker_class` makes it an actor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from model.config import ModelConfig, SessionConfig

from ..config import EngineConfig
from ..core.commands import CloseSession, OpenSession, Outputs, PushFrame, Reply, Snapshot
from ..events import SessionClosed
from .config import ClusterConfig

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """A session on this worker as the cluster sees it: whose it is and how it can be resumed."""

    door: str | None  # the front door its events go to (None: that door is gone)
    token: str | None = None  # sha256 of its current resume token
    resume_seconds: float = 30.0
    api: dict = field(default_factory=dict)  # the front door's own counters for it (received, rejected...)
    deadline: float | None = None  # (monotonic) closed then unless a door claims it
    backlog: deque = field(default_factory=deque)  # its events while no door owns it
    backlog_dropped: int = 0


class DoorQueue:
    """What waits for one front door: its sessions' outputs merged into one batch, the sessions other doors
    took over, and its commands that arrived ahead of their turn."""

    def __init__(self) -> None:
        self.out = Outputs()
        self.moved: list[str] = []
        self.ready = asyncio.Event()
        self.seen = time.monotonic()
        self.polling = 0
        self.next_seq = 1
        self.held: dict[int, list] = {}

    def events(self) -> int:
        return len(self.out.events) + len(self.out.states) + len(self.out.replies)

    def take(self) -> tuple[Outputs, list[str]]:
        out, moved = self.out, self.moved
        self.out, self.moved = Outputs(), []
        self.ready.clear()
        return out, moved


class Worker:
    """One engine core behind the calls front doors make (see the module doc)."""

    def __init__(self, name: str, model: ModelConfig, spec: str | None, engine: EngineConfig,
                 session: SessionConfig, max_sessions: int, cluster: ClusterConfig):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch

        from model import load_configured

        from ..core.engine_core import build_core

        if cluster.worker_cpus >= 1:
            torch.set_num_threads(int(cluster.worker_cpus))
        self.name, self.cluster, self.engine_config = name, cluster, engine
        self.started = time.time()
        self.lm = load_configured(model, spec, say=lambda m: log.info("worker %s: %s", name, m))
        self.spec = self.lm.spec
        self.core = build_core(self.lm, engine, session, max_sessions, self._emitted)
        self.max_sessions = max_sessions
        self._loop: asyncio.AbstractEventLoop | None = None
        self._doors: dict[str, DoorQueue] = {}
        self._placed: dict[str, Placement] = {}
        self._tokens: dict[str, str] = {}  # token hash -> sid
        self._requests: dict[int, tuple[str, int]] = {}  # core request -> (door, the door's request)
        self._internal: dict[int, asyncio.Future] = {}  # core request -> this worker's own waiter
        self._opening: dict[int, str] = {}  # core request of an OpenSession -> its sid
        self._ids = itertools.count(1)
        self._engine = self.core.engine_state()
        self.doors_gone = 0
        self.refused_commands = 0  # commands from a door that no longer owns their session

    # -- start --------------------------------------------------------------------------------------
    async def ready(self) -> dict:
        """Start the core (once) and say who this worker is (what ``info`` says)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            _full_priority(self.name)  # (the core's and the preprocessing threads inherit it)
            self.core.start()
            self._loop.create_task(self._watch())
        return self.info()

    def info(self) -> dict:
        """Who and where this worker is, its KV pool, sessions and doors (``vl3live status``)."""
        now = time.monotonic()
        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(), "device": str(self.lm.device),
                "dtype": str(self.lm.dtype).removeprefix("torch."), "model": self.spec, "alive": self.core.alive,
                "max_sessions": self.max_sessions, "core": dataclasses.asdict(self.engine_config.core()),
                "engine": self._engine, "doors": sorted(self._doors), "doors_gone": self.doors_gone,
                "refused_commands": self.refused_commands, "uptime": time.time() - self.started,
                "sessions": {sid: {"door": p.door, "resumable_for": None if p.deadline is None
                                   else max(0.0, p.deadline - now)} for sid, p in self._placed.items()}}

    def stop(self) -> None:
        self.core.stop(timeout=10)

    # -- commands in --------------------------------------------------------------------------------
    async def post(self, door: str, seq: int, batch: list) -> None:
        """A door's commands, applied in the order the door numbered them."""
        q = self._door(door)
        q.held[seq] = batch
        while q.next_seq in q.held:
            self._apply(door, q.held.pop(q.next_seq))
            q.next_seq += 1

    def _apply(self, door: str, batch: list) -> None:
        commands = []
        for request, command in batch:
            sid = getattr(command, "sid", None)
            if isinstance(command, OpenSession):
                self._placed[sid] = Placement(door)
            elif sid is not None:
                placed = self._placed.get(sid)
                if placed is not None and placed.door != door:  # taken over by another door meanwhile
                    self.refused_commands += 1
                    if request is not None:
                        self._reply(door, Reply(request, code="worker_lost",
                                                message=f"session {sid!r} was resumed through another front door"))
                    continue
            if isinstance(command, PushFrame) and not command.rgb.flags.writeable:
                command = dataclasses.replace(command, rgb=np.array(command.rgb))  # (Ray hands out read-only views)
            if request is not None:
                core_request = next(self._ids)
                self._requests[core_request] = (door, request)
                if isinstance(command, OpenSession):
                    self._opening[core_request] = sid
                request = core_request
            commands.append((request, command))
        if commands:
            self.core.post_many(commands)

    async def _ask_core(self, command: object, timeout: float = 30.0) -> object:
        request = next(self._ids)
        fut = self._loop.create_future()
        self._internal[request] = fut
        self.core.post(request, command)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._internal.pop(request, None)

    async def engine_snapshot(self) -> object:
        return await self._ask_core(Snapshot(None))

    # -- outputs out --------------------------------------------------------------------------------
    def _emitted(self, out: Outputs) -> None:
        """(Core thread.) Route the batch on the actor's loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._route, out)

    def _door(self, door: str) -> DoorQueue:
        q = self._doors.get(door)
        if q is None:
            q = self._doors[door] = DoorQueue()
        q.seen = time.monotonic()
        return q

    def _route(self, out: Outputs) -> None:
        """Each event and state to the door that owns its session; replies to the door that asked."""
        if out.engine is not None:
            self._engine = out.engine
        if out.lost is not None:  # the core stopped for good (its device failed): this worker is gone, and its
            # doors reopen its sessions on other workers as for any dead worker
            log.critical("worker %s: %s; exiting", self.name, out.lost)
            self._loop.call_later(0.2, os._exit, 70)
        touched: set[str] = set()
        for ev in out.events:
            placed = self._placed.get(ev.session)
            q = self._doors.get(placed.door) if placed is not None and placed.door is not None else None
            if q is not None:
                q.out.events.append(ev)
                touched.add(placed.door)
            elif placed is not None:
                if len(placed.backlog) >= self.engine_config.subscriber_queue:
                    placed.backlog.popleft()
                    placed.backlog_dropped += 1
                placed.backlog.append(ev)
            if isinstance(ev, SessionClosed) and placed is not None:
                self._placed.pop(ev.session, None)
                if placed.token is not None:
                    self._tokens.pop(placed.token, None)
        for st in out.states:
            placed = self._placed.get(st.sid)
            q = self._doors.get(placed.door) if placed is not None and placed.door is not None else None
            if q is not None:
                q.out.states.append(st)
                touched.add(placed.door)
        for reply in out.replies:
            fut = self._internal.pop(reply.request, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(reply)
                continue
            opened = self._opening.pop(reply.request, None)
            if opened is not None and reply.code is not None:  # refused (no room): it was never here
                self._placed.pop(opened, None)
            door, request = self._requests.pop(reply.request, (None, None))
            if door is not None:
                self._reply(door, dataclasses.replace(reply, request=request))
        for door in touched:
            self._wake(door)

    def _reply(self, door: str, reply: Reply) -> None:
        q = self._doors.get(door)
        if q is not None:
            q.out.replies.append(reply)
            self._wake(door)

    def _wake(self, door: str) -> None:
        q = self._doors[door]
        if q.events() > self.cluster.max_door_events:  # it stopped reading: nothing piles up for it
            log.warning("worker %s: front door %s left %d outputs unread; it counts as gone", self.name, door,
                        q.events())
            self._door_gone(door)
            return
        q.ready.set()

    async def poll(self, door: str, timeout: float) -> tuple[Outputs, list[str], object] | None:
        """(Long poll.) The door's outputs since its last poll, the sessions other doors took from it, and
        this worker's engine state; waits up to ``timeout`` s for something to report."""
        q = self._door(door)
        if not q.out.events and not q.out.states and not q.out.replies and not q.moved:
            q.polling += 1
            try:
                await asyncio.wait_for(q.ready.wait(), timeout)
            except TimeoutError:
                pass
            finally:
                q.polling -= 1
        if self._doors.get(door) is not q:  # counted gone meanwhile
            return None
        q.seen = time.monotonic()
        out, moved = q.take()
        return out, moved, self._engine

    # -- the session directory ----------------------------------------------------------------------
    async def register(self, door: str, sid: str, token: str | None, resume_seconds: float, api: dict) -> bool:
        """``sid``'s current resume token (a sha256 hash) and the door's counters for it; False if the session
        is not here or not that door's."""
        placed = self._placed.get(sid)
        if placed is None or placed.door != door:
            return False
        if placed.token is not None:
            self._tokens.pop(placed.token, None)
        placed.token, placed.resume_seconds, placed.api = token, resume_seconds, dict(api)
        if token is not None:
            self._tokens[token] = sid
        return True

    async def note(self, door: str, apis: dict[str, dict]) -> None:
        """The door's counters for its sessions, as of now (pushed every ``cluster.refresh_seconds``)."""
        for sid, api in apis.items():
            placed = self._placed.get(sid)
            if placed is not None and placed.door == door:
                placed.api = dict(api)

    async def claim(self, door: str, token: str) -> dict | None:
        """The session whose resume token hashes to ``token`` moves to ``door``: what a door needs to serve it
        (settings, state, the door counters and the events it missed). None: no such session here."""
        sid = self._tokens.get(token)
        placed = self._placed.get(sid) if sid is not None else None
        if placed is None:
            return None
        reply = await self._ask_core(Snapshot(sid))
        if reply.code is not None:
            return None
        snap = reply.value
        old = placed.door
        missed = list(placed.backlog)
        if old is not None and old != door and old in self._doors:
            oq = self._doors[old]
            missed += [ev for ev in oq.out.events if ev.session == sid]
            oq.out.events = [ev for ev in oq.out.events if ev.session != sid]
            oq.out.states = [st for st in oq.out.states if st.sid != sid]
            oq.moved.append(sid)
            oq.ready.set()
        placed.door, placed.deadline = door, None
        placed.backlog = deque()
        self._door(door)
        self._tokens.pop(token, None)
        placed.token = None
        return {"sid": sid, "config": snap.config, "settings": snap.settings, "sampling": snap.sampling,
                "instruction": snap.instruction, "state": snap.state, "max_tokens": snap.stats.max_tokens, "api": dict(placed.api), "missed": missed,
                "missed_dropped": placed.backlog_dropped}

    async def reattach(self, door: str, sids: list[str]) -> dict[str, list]:
        """A door that was counted gone (it stalled) takes back its sessions that no other door claimed
        meanwhile; the events each missed."""
        self._door(door)
        missed = {}
        for sid in sids:
            placed = self._placed.get(sid)
            if placed is not None and placed.door is None:
                placed.door, placed.deadline = door, None
                missed[sid] = list(placed.backlog)
                placed.backlog = deque()
        return missed

    async def door_closed(self, door: str) -> None:
        """A door shut down cleanly: its sessions wait for a resume through another door from now."""
        if door in self._doors:
            self._door_gone(door)

    def _door_gone(self, door: str) -> None:
        self._doors.pop(door, None)
        self.doors_gone += 1
        now = time.monotonic()
        for placed in self._placed.values():
            if placed.door == door:
                placed.door, placed.deadline = None, now + placed.resume_seconds
        for core_request, (d, _) in list(self._requests.items()):
            if d == door:
                del self._requests[core_request]

    async def _watch(self) -> None:
        """Doors that stopped polling are gone; doorless sessions past their deadline close."""
        while True:
            await asyncio.sleep(min(0.5, self.cluster.poll_seconds))
            now = time.monotonic()
            for door, q in list(self._doors.items()):
                if not q.polling and now - q.seen > self.cluster.door_timeout:
                    log.warning("worker %s: front door %s stopped polling; its sessions wait for a resume",
                                self.name, door)
                    self._door_gone(door)
            for sid, placed in list(self._placed.items()):
                if placed.door is None and placed.deadline is not None and now >= placed.deadline:
                    placed.deadline = None
                    if placed.token is not None:
                        self._tokens.pop(placed.token, None)
                        placed.token = None
                    log.info("worker %s: session %s was not resumed in time; closing it", self.name, sid)
                    self.core.post(None, CloseSession(sid))


def _full_priority(name: str) -> None:
    """Ray starts worker processes at nice 15 (``RAY_worker_niceness``): right for background tasks, wrong for
    the process that serves live cameras. Back to 0 for this thread and those it starts, where allowed."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (OSError, AttributeError) as exc:
        log.warning("worker %s runs at Ray's lowered priority (%s); start Ray with RAY_worker_niceness=0 to avoid "
                    "it", name, exc)
