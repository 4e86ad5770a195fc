"""The front door's engine: an :class:`~streamer.engine.EngineClient` whose sessions live on Ray workers.

A front door (``vl3live serve --cluster``) serves the same websocket API as a local server; this client
is the only difference. Each new session goes to the worker with the most free KV pool and stays
pinned there: its commands go to that worker's actor, its outputs come back by a long poll. Commands
for one worker leave in batches, one call in flight at a time; frames that arrive meanwhile replace the
same session's frame still waiting to leave (latest wins, counted dropped by the core), so nothing
queues without bound here or in Ray while a worker is slow.

A worker that dies: each of its sessions gets an ``error`` event ``worker_lost`` and is opened again on
another worker with an empty cache and the same settings and instruction, under the same session id;
the client stays connected. A worker that joins later is found within ``cluster.refresh_seconds`` and
takes new sessions. Resume tokens are registered with the worker that holds the session, so a client
can resume through any front door (:meth:`ClusterEngine.adopt`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections import Counter

from model.config import ModelConfig, SessionConfig
from model.kvpool import PoolStats
from model.sampling import Sampling

from ..bus import EventBus
from ..config import EngineConfig
from ..core.commands import EngineSnapshot, EngineState, OpenSession, PushFrame, SessionState, SetInstruction
from ..engine import EngineClient, EngineError, EngineStats, SessionHandle
from ..events import Error, FrameCounts
from . import ray_env
from .config import ClusterConfig
from .directory import Directory

log = logging.getLogger(__name__)

START_WAIT = 600.0  # seconds a starting door waits for the workers Ray lists to load their model
_COUNTS = ("accepted", "source_frames", "sampled_out", "dropped", "processed", "refused", "errors")


class WorkerLink:
    """One worker as this door sees it: its actor, the commands waiting to leave, its latest state."""

    def __init__(self, name: str, actor: object, info: dict):
        self.name, self.actor, self.info = name, actor, info
        self.engine: EngineState = info["engine"]
        self.outbox: list = []
        self.frame_at: dict[str, int] = {}
        self.sending = False
        self.seq = 0
        self.requests: set[int] = set()
        self.alive = True
        self.poller: asyncio.Task | None = None
        self.sender: asyncio.Task | None = None

    def free_pages(self) -> int:
        pool = self.engine.pool
        return pool.pages_total - pool.pages_reserved if pool is not None else 0


class ClusterEngine(Directory, EngineClient):
    """Sessions on the workers of a Ray cluster (see the module doc). With ``cluster.address: local:N`` it
    starts a local Ray and N workers of ``model`` itself, which end with it."""

    outlives_doors = True

    def __init__(self, cluster: ClusterConfig, config: EngineConfig | None = None,
                 session_config: SessionConfig | None = None, max_sessions: int = 16, bus: EventBus | None = None,
                 model: ModelConfig | None = None, spec: str | None = None):
        super().__init__(config, session_config, max_sessions, bus)
        self.cluster, self.model, self.spec = cluster, model or ModelConfig(), spec
        self.door = f"door-{uuid.uuid4().hex[:10]}"
        self.links: dict[str, WorkerLink] = {}
        self._where: dict[str, WorkerLink] = {}  # sid -> the worker that holds it
        self._tokens: dict[str, tuple[str, float, dict]] = {}  # sid -> (token hash, resume_seconds, api)
        self._orphans: set[str] = set()  # sessions whose worker died and no other had room yet
        self._noted: set[str] = set()  # sessions whose front-end counters changed since the last push
        self._owned: list = []  # worker actors this door started (local:N)
        self._retired = Counter()  # frame totals of workers that died (so /metrics counters never go back)
        self._refresher: asyncio.Task | None = None
        self.workers_lost = 0

    # -- transport ------------------------------------------------------------------------------------
    async def _start_core(self) -> None:
        n = await asyncio.to_thread(ray_env.connect, self.cluster)
        if n:
            self._owned = await asyncio.to_thread(
                ray_env.start_workers, n, self.model, self.spec, self.config, self.session_config,
                self.max_sessions, self.cluster)
        deadline = asyncio.get_running_loop().time() + START_WAIT
        while not self.links:
            found = await self._refresh(wait=10.0)
            if not found:
                raise RuntimeError(f"no vl3live worker runs in the Ray cluster {self.cluster.address} (namespace "
                                   f"{self.cluster.namespace!r}): start some with vl3live worker --cluster ADDRESS")
            if not self.links:
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"none of the {found} worker(s) in the Ray cluster got ready in "
                                       f"{START_WAIT:.0f} s")
                log.warning("waiting for %d worker(s) to load their model", found)
        self._refresher = asyncio.create_task(self._refresh_loop(), name="cluster-refresh")
        first = next(iter(self.links.values()))
        self._print_pool(first.engine.pool, f"{len(self.links)} worker(s), e.g. {first.info['device']}")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cluster.refresh_seconds)
            try:
                await self._push_notes()
                await self._refresh()
            except Exception:
                log.exception("looking for workers failed")

    async def _refresh(self, wait: float = 2.0) -> int:
        """Take in workers that joined (and got ready within ``wait`` s: else next time); reopen sessions left
        without one. Returns how many workers Ray lists."""
        found = await asyncio.to_thread(ray_env.find_workers, self.cluster)
        new = {name: actor for name, actor in found.items() if name not in self.links}
        infos = await asyncio.gather(*(asyncio.wait_for(actor.ready.remote(), wait) for actor in new.values()),
                                     return_exceptions=True)
        for (name, actor), info in zip(new.items(), infos):
            if isinstance(info, BaseException):  # still loading its model, or dead: next time
                log.info("worker %s is not ready: %s", name, ray_env.first_line(info) if str(info) else "loading")
                continue
            self._check_worker(info)
            link = self.links[name] = WorkerLink(name, actor, info)
            link.poller = asyncio.create_task(self._poll(link), name=f"poll:{name}")
            log.info("worker %s joined (%s, %s)", name, info["host"], info["device"])
        for sid in list(self._orphans):
            await self._reopen(sid)
        return len(found)

    def _check_worker(self, info: dict) -> None:
        mine = dataclasses.asdict(self.config.core())
        if info["core"] != mine:
            differ = ", ".join(f"engine.{k}: {info['core'][k]} there, {v} here" for k, v in mine.items()
                               if info["core"].get(k) != v)
            log.warning("worker %s runs with other engine settings (%s)", info["name"], differ)

    def _post(self, request: int | None, command: object) -> None:
        link = self._where.get(getattr(command, "sid", None))
        if link is None or not link.alive:
            handle = self.sessions.get(getattr(command, "sid", None))
            if isinstance(command, PushFrame) and handle is not None:
                handle.lost_frame(command.source)
            why = EngineError("the session's worker is gone; it is being reopened", "worker_lost")
            if request is not None:
                fut = self._waiting.pop(request, None)
                if fut is not None and not fut.done():
                    fut.set_exception(why)
            return
        if request is not None:
            link.requests.add(request)
        if isinstance(command, PushFrame) and request is None:
            at = link.frame_at.get(command.sid)
            if at is not None:  # the previous frame never left: this one replaces it (latest wins)
                older = link.outbox[at][1]
                link.outbox[at] = (None, dataclasses.replace(command, superseded=older.superseded + 1))
                return
            link.frame_at[command.sid] = len(link.outbox)
        link.outbox.append((request, command))
        if not link.sending:
            link.sending = True
            link.sender = asyncio.get_running_loop().create_task(self._ship(link))

    async def _ship(self, link: WorkerLink) -> None:
        """One call in flight per worker; what gathered meanwhile leaves as the next batch."""
        try:
            while link.outbox and link.alive:
                batch, link.outbox, link.frame_at = link.outbox, [], {}
                link.seq += 1
                try:
                    await link.actor.post.remote(self.door, link.seq, batch)
                except Exception as exc:  # the worker died: its poll says so to every session
                    log.info("worker %s: post failed: %s", link.name, ray_env.first_line(exc))
                    return
        finally:
            link.sending = False

    async def _poll(self, link: WorkerLink) -> None:
        errors = ray_env.ray().exceptions
        unreachable_since = None
        while True:
            try:
                got = await link.actor.poll.remote(self.door, self.cluster.poll_seconds)
                unreachable_since = None
            except asyncio.CancelledError:
                raise
            except errors.ActorUnavailableError as exc:  # (a network blip) dead only if it lasts
                now = asyncio.get_running_loop().time()
                unreachable_since = unreachable_since or now
                if now - unreachable_since < self.cluster.door_timeout:
                    await asyncio.sleep(0.5)
                    continue
                self._worker_died(link, ray_env.first_line(exc))
                return
            except Exception as exc:
                self._worker_died(link, ray_env.first_line(exc))
                return
            if got is None:  # the worker counted this door gone (it stalled): take its sessions back
                log.error("worker %s counted this front door gone (it stalled); taking its sessions back",
                          link.name)
                await self._reattach(link)
                continue
            out, moved, engine = got
            link.engine = engine
            self._on_outputs(out)
            for sid in moved:
                self._moved(sid)

    async def close(self) -> None:
        """Stop this door. Its sessions stay on the workers, which keep them ``server.resume_seconds`` for a
        resume through another door; with ``local:N`` the workers (and the sessions) end with it."""
        if self._owned:
            return await super().close()
        for sid in list(self.sessions):
            handle = self.sessions.pop(sid)
            handle.closed = True
            await self.detach(handle)
        await self._stop_core()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(EngineError("the front door stopped", "internal"))
        self.bus.close()

    async def _stop_core(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        for link in list(self.links.values()):
            if link.alive and not self._owned:
                try:
                    await asyncio.wait_for(link.actor.door_closed.remote(self.door), 5)
                except Exception:
                    pass
            for task in (link.poller, link.sender):
                if task is not None:
                    task.cancel()
            link.alive = False
        r = ray_env.ray()
        for actor in self._owned:
            try:
                await asyncio.wait_for(actor.stop.remote(), 15)
            except Exception:
                pass
            r.kill(actor)
        if self._owned:
            await asyncio.to_thread(r.shutdown)

    @property
    def alive(self) -> bool:
        return self.lost is None and any(link.alive for link in self.links.values())

    # -- failures -------------------------------------------------------------------------------------
    def _worker_died(self, link: WorkerLink, why: str) -> None:
        """(Loop.) Its sessions are told and reopened elsewhere; its requests fail; nothing else changes."""
        if not link.alive:
            return
        link.alive = False
        self.links.pop(link.name, None)
        self.workers_lost += 1
        for k in _COUNTS:
            self._retired[k] += getattr(link.engine.frames, k)
        log.error("worker %s is gone: %s", link.name, why)
        for request in link.requests:
            fut = self._waiting.pop(request, None)
            if fut is not None and not fut.done():
                fut.set_exception(EngineError(f"the session's worker is gone: {why}", "worker_lost"))
        lost = [sid for sid, held in self._where.items() if held is link]
        for sid in lost:
            del self._where[sid]
            self._orphans.add(sid)
            handle = self.sessions.get(sid)
            if handle is not None:  # its counts so far stay; what was on its way or inside is dropped
                handle.restart(SessionState(sid, FrameCounts(), None, None, False, True, 0), lost=True)
            self.bus.publish(Error(session=sid, code="worker_lost",
                                   message=f"the worker holding this session is gone ({why}); it is reopened "
                                           "on another worker with an empty cache"))
        for sid in lost:
            asyncio.get_running_loop().create_task(self._reopen(sid))

    async def _reopen(self, sid: str) -> None:
        """Open ``sid`` again on a worker with room: its settings, sampling and instruction, an empty cache."""
        handle = self.sessions.get(sid)
        if handle is None or handle.closed:
            self._orphans.discard(sid)
            return
        if sid not in self._orphans:
            return
        try:
            opened = await self._place(OpenSession(sid, handle.config, handle.settings, handle.sampling))
        except EngineError as exc:
            log.warning("session %s: no worker can take it yet: %s", sid, exc)
            return
        self._orphans.discard(sid)
        handle.mirror(opened["state"])
        handle.sent_questions = 0
        if handle.instruction is not None:
            self._send(SetInstruction(sid, handle.instruction, f"r{next(self._responses)}"))
        if sid in self._tokens:
            await self._register(sid)
        log.info("session %s reopened on worker %s", sid, self._where[sid].name)

    # -- placement ------------------------------------------------------------------------------------
    async def _place(self, command: OpenSession) -> dict:
        """Open on the live worker with the most free KV pool; the next one if it is full after all."""
        last = None
        for link in sorted((lk for lk in self.links.values() if lk.alive), key=lambda lk: -lk.free_pages()):
            self._where[command.sid] = link
            try:
                return await self._request(command)
            except EngineError as exc:
                last = exc
                self._where.pop(command.sid, None)
                if exc.code not in ("too_many_sessions", "worker_lost"):
                    raise
        raise last or EngineError("no worker runs", "too_many_sessions")

    async def open_session(self, session_config: SessionConfig | None = None, session_id: str | None = None,
                           settings=None, record_logits: bool = False) -> SessionHandle:
        sid = session_id or f"{self.door[5:]}-s{next(self._ids)}"  # unique across doors
        if sid in self.sessions:
            raise EngineError(f"session {sid!r} exists")
        settings = settings or self.config.session_defaults()
        sampling = Sampling(max_new_tokens=self.config.max_new_tokens)
        opened = await self._place(OpenSession(sid, session_config or self.session_config, settings, sampling,
                                               record_logits))
        handle = SessionHandle(sid, opened["config"], settings, sampling, opened["max_tokens"])
        handle.mirror(opened["state"])
        self.sessions[sid] = handle
        return handle

    async def close_session(self, sid: str) -> None:
        self._orphans.discard(sid)
        self._tokens.pop(sid, None)
        if sid not in self._where:  # its worker is gone: nothing to close there
            handle = self.sessions.pop(sid, None)
            if handle is not None:
                handle.closed = True
                await self.detach(handle)
            return
        try:
            await super().close_session(sid)
        except EngineError as exc:  # its worker died meanwhile: nothing is left to close
            if exc.code != "worker_lost":
                raise
        self._where.pop(sid, None)

    def worker_of(self, session: SessionHandle) -> str | None:
        link = self._where.get(session.id)
        return link.name if link is not None else None

    # -- looking --------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        live = [lk for lk in self.links.values() if lk.alive and lk.engine.pool is not None]
        pool = None
        if live:
            pools = [lk.engine.pool for lk in live]
            pool = PoolStats(**{f.name: sum(getattr(p, f.name) for p in pools)
                                for f in dataclasses.fields(PoolStats)})
            pool = dataclasses.replace(pool, bytes_per_token=pools[0].bytes_per_token,
                                       page_tokens=pools[0].page_tokens)
        return EngineStats(pool, sum(lk.engine.steps for lk in live), sum(lk.engine.step_items for lk in live))

    def frame_counts(self) -> FrameCounts:
        live = [lk.engine.frames for lk in self.links.values() if lk.alive]
        return FrameCounts(**{k: self._retired[k] + sum(getattr(f, k) for f in live) for k in _COUNTS},
                           pending=sum(f.pending for f in live))

    def workers(self) -> list[dict]:
        """Each worker as ``/health`` and ``/metrics`` report it."""
        return [{"name": lk.name, "host": lk.info["host"], "device": lk.info["device"], "alive": lk.alive,
                 "sessions": lk.engine.sessions, "pool": lk.engine.pool, "frames": lk.engine.frames,
                 "steps": lk.engine.steps} for lk in self.links.values()]

    def health(self) -> dict:
        return {"workers": [{"name": w["name"], "host": w["host"], "device": w["device"], "alive": w["alive"],
                             "sessions": w["sessions"]} for w in self.workers()], "workers_lost": self.workers_lost}

    async def snapshot(self, session: SessionHandle | None = None, overlay: bool = False, detail: bool = False):
        if session is not None:
            return await super().snapshot(session, overlay, detail)
        snaps = await asyncio.gather(*(lk.actor.engine_snapshot.remote() for lk in self.links.values()
                                       if lk.alive), return_exceptions=True)
        replies = [s.value for s in snaps if not isinstance(s, BaseException) and s.code is None]
        frames = self.frame_counts()
        stats = self.stats()
        state = EngineState(stats.pool, stats.steps, stats.step_items, frames, sum(r.state.sessions for r in replies))
        return EngineSnapshot(state, tuple(x for r in replies for x in r.recent_steps),
                              tuple(x for r in replies for x in r.host_ms))
