"""A front door's side of the session directory: resume through any door.

Every session's resume token is registered, as a SHA-256 hash, with the worker that holds the session,
together with the door's own counters for it (``received``, ``rejected``...), pushed every
``cluster.refresh_seconds``. A door that does not know a token asks every worker to ``claim`` it; the
worker that holds the session hands it over with the events it missed, and tells the door that had it
(which lets go: :meth:`Directory._moved`). This is a mixin of
:class:`~streamer.cluster.door.ClusterEngine`: it uses that class's links and session maps.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING

from ..engine import SessionHandle
from ..events import Event
from . import ray_env

if TYPE_CHECKING:
    from .door import WorkerLink

log = logging.getLogger(__name__)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Directory:
    """Resume through any door (see the module doc)."""

    async def remember(self, session: SessionHandle, token: str, resume_seconds: float, api: dict) -> None:
        self._tokens[session.id] = (token_hash(token), resume_seconds, dict(api))
        await self._register(session.id)

    def note(self, session: SessionHandle, api: dict) -> None:
        held = self._tokens.get(session.id)
        if held is not None and held[2] != api:
            self._tokens[session.id] = (held[0], held[1], dict(api))
            self._noted.add(session.id)

    async def _push_notes(self) -> None:
        """The counters noted since the last push, one call per worker."""
        by_link: dict[str, dict] = {}
        for sid in self._noted:
            link = self._where.get(sid)
            if link is not None and link.alive and sid in self._tokens:
                by_link.setdefault(link.name, {})[sid] = self._tokens[sid][2]
        self._noted = set()
        for name, apis in by_link.items():
            try:
                await self.links[name].actor.note.remote(self.door, apis)
            except Exception as exc:  # the worker died: its poll says so
                log.info("worker %s: noting counters failed: %s", name, ray_env.first_line(exc))

    async def _register(self, sid: str) -> None:
        link = self._where.get(sid)
        if link is None or not link.alive:
            return
        h, seconds, api = self._tokens[sid]
        try:
            await link.actor.register.remote(self.door, sid, h, seconds, api)
        except Exception as exc:  # the worker died: the poll reopens the session and registers again
            log.info("session %s: registering its token failed: %s", sid, ray_env.first_line(exc))

    async def adopt(self, token: str) -> tuple[SessionHandle, dict, list[Event]] | None:
        h = token_hash(token)
        links = [lk for lk in self.links.values() if lk.alive]
        results = await asyncio.gather(*(lk.actor.claim.remote(self.door, h) for lk in links),
                                       return_exceptions=True)
        for link, got in zip(links, results):
            if isinstance(got, dict):
                sid = got["sid"]
                old = self.sessions.pop(sid, None)  # (ours under an older token: the same session)
                if old is not None:
                    old.closed = True
                handle = SessionHandle(sid, got["config"], got["settings"], got["sampling"], got["max_tokens"])
                handle.instruction = got["instruction"]
                handle.resume(got["state"])
                self.sessions[sid] = handle
                self._where[sid] = link
                return handle, got["api"], got["missed"]
        return None

    def _moved(self, sid: str) -> None:
        """(Loop.) Another door took ``sid`` over: forget it here (its cache stays with the worker)."""
        handle = self.sessions.pop(sid, None)
        self._where.pop(sid, None)
        self._tokens.pop(sid, None)
        if handle is None:
            return
        handle.closed = True
        pump = self._pumps.pop(sid, None)
        if pump is not None:
            pump.cancel()
        for hook in self.moved_hooks:
            hook(sid)

    async def _reattach(self, link: WorkerLink) -> None:
        mine = [sid for sid, held in self._where.items() if held is link]
        try:
            missed = await link.actor.reattach.remote(self.door, mine)
        except Exception as exc:  # it died meanwhile: the next poll says so
            log.info("worker %s: reattach failed: %s", link.name, ray_env.first_line(exc))
            return
        for events in missed.values():
            for ev in events:
                self.bus.publish(ev)
        for sid in mine:
            if sid not in missed:  # resumed through another door meanwhile
                self._moved(sid)
