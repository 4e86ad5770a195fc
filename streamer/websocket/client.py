"""An async Python client for the websocket API (the ``vl3live client`` command is ``vl3live/client.py``).

    async with Client("ws://127.0.0.1:8765/", token) as c:
        await c.send_frame(rgb, pts=0.0)
        async for ev in c.ask("What is on the table?"):
            if ev.type == "response.delta":
                print(ev.text, end="")

Every server event is also available in order from :meth:`Client.events` (a bounded buffer: the
oldest events are dropped, and counted in ``Client.dropped``, if nobody reads it).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from . import protocol as P
from .images import encode_jpeg


class ClientError(RuntimeError):
    """The server answered a request with an ``error`` event."""

    def __init__(self, error: P.Error):
        super().__init__(f"[{error.code}] {error.message}")
        self.code, self.error = error.code, error


class Client:
    """One websocket session: send frames and questions, read the server's events (``async with Client(url)
    as c``)."""

    def __init__(self, url: str, token: str | None = None, resume: str | None = None, max_events: int = 1024,
                 origin: str | None = None, open_timeout: float = 30.0):
        self.url = url + (("&" if "?" in url else "?") + f"resume={resume}" if resume else "")
        self.token, self.origin, self.open_timeout = token, origin, open_timeout
        self.session: P.SessionCreated | None = None
        self.dropped = 0
        self.closed: tuple[int | None, str | None] | None = None  # (code, reason) once the connection ended
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task | None = None
        self._events: deque = deque()
        self._max_events = max_events
        self._ready = asyncio.Event()
        self._waiters: dict[str, asyncio.Queue] = {}  # event_id / response_id -> queue
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> P.SessionCreated:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self._ws = await connect(self.url, additional_headers=headers, origin=self.origin, max_size=None,
                                 open_timeout=self.open_timeout, compression=None)
        first = P.parse_server_event(await self._ws.recv())
        if isinstance(first, P.Error):
            await self._ws.close()
            raise ClientError(first)
        self.session = first
        self._reader = asyncio.create_task(self._read(), name="vl3live-client-reader")
        return first

    async def close(self) -> None:
        """Close the connection normally (1000): the server ends the session at once."""
        await self._close(1000)

    async def disconnect(self) -> None:
        """Go away but keep the session (1001): reconnect within ``resume_seconds`` with
        ``Client(url, resume=c.session.resume_token)`` to get it back, KV cache and all."""
        await self._close(1001)

    async def _close(self, code: int) -> None:
        if self._ws is not None:
            await self._ws.close(code)
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def end(self, timeout: float = 30.0) -> P.SessionClosed:
        """``session.close``: end the session now; returns ``session.closed`` (the final ``frame.ack``
        is in :meth:`events` just before it). The server then closes the connection."""
        ev = await self._request({"type": "session.close"}, "session.closed", timeout)
        await self._close(1000)
        return ev

    # -- receiving ----------------------------------------------------------------------------------
    async def _read(self) -> None:
        ws = self._ws
        try:
            async for message in ws:
                ev = P.parse_server_event(message)
                key = getattr(ev, "response_id", None)
                if key not in self._waiters:
                    key = getattr(ev, "event_id", None)
                if isinstance(ev, P.ResponseCreated) and ev.event_id in self._waiters:
                    self._waiters[ev.response_id] = self._waiters[ev.event_id]
                if key in self._waiters:
                    try:
                        self._waiters[key].put_nowait(ev)
                    except asyncio.QueueFull:  # a caller that stopped reading its answer
                        self.dropped += 1
                if len(self._events) >= self._max_events:
                    self._events.popleft()
                    self.dropped += 1
                self._events.append(ev)
                self._ready.set()
        except ConnectionClosed:
            pass
        finally:
            self.closed = (ws.close_code, ws.close_reason)
            for q in self._waiters.values():
                if q.full():
                    q.get_nowait()
                q.put_nowait(None)
            self._ready.set()

    def peek(self) -> list:
        """The server events buffered now (not yet taken by :meth:`events`), oldest first."""
        return list(self._events)

    async def events(self) -> AsyncIterator:
        """Every server event in order, until the connection closes."""
        while True:
            while not self._events:
                if self.closed is not None:
                    return
                self._ready.clear()
                await self._ready.wait()
            yield self._events.popleft()

    async def next_event(self, *types: str, timeout: float = 30.0):
        """The next event (of one of ``types``) from :meth:`events`; earlier ones are skipped."""
        async def find():
            async for ev in self.events():
                if not types or ev.type in types:
                    return ev
            raise ConnectionError(f"connection closed: {self.closed}")
        return await asyncio.wait_for(find(), timeout)

    # -- sending ------------------------------------------------------------------------------------
    def _event_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    async def send_json(self, message: dict) -> None:
        import json

        await self._ws.send(json.dumps(message))

    async def send_frame(self, image, pts: float | None = None, event_id: str | None = None) -> None:
        """One frame: an RGB uint8 array, a PIL image, or JPEG/PNG bytes; ``pts`` in seconds."""
        if isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        else:
            data = await asyncio.to_thread(encode_jpeg, np.asarray(image))
        if pts is not None or event_id is not None:
            await self.send_json({"type": "input_frame.meta", "pts": pts, "event_id": event_id})
        await self._ws.send(data)

    async def _exchange(self, message: dict, timeout: float) -> AsyncIterator:
        """Send ``message`` and yield the events that answer it (by its event_id, then its response_id);
        an ``error`` for it raises :class:`ClientError`."""
        eid = message.setdefault("event_id", self._event_id("c"))
        q: asyncio.Queue = asyncio.Queue(maxsize=4096)
        self._waiters[eid] = q
        try:
            await self.send_json(message)
            while True:
                ev = await asyncio.wait_for(q.get(), timeout)
                if ev is None:
                    raise ConnectionError(f"connection closed: {self.closed}")
                if isinstance(ev, P.Error):
                    raise ClientError(ev)
                yield ev
        finally:
            for key in [k for k, v in self._waiters.items() if v is q]:
                del self._waiters[key]

    async def _request(self, message: dict, reply: str, timeout: float = 60.0):
        async with aclosing(self._exchange(message, timeout)) as events:
            async for ev in events:
                if ev.type == reply:
                    return ev
        raise ConnectionError(f"connection closed: {self.closed}")

    async def update(self, **settings) -> P.SessionUpdated:
        """``session.update``: fps, layout, diffp_threshold, memory_budget, instruction, generation={...}..."""
        return await self._request({"type": "session.update", "session": settings}, "session.updated")

    async def ping(self) -> float:
        loop = asyncio.get_running_loop()
        t = loop.time()
        await self._request({"type": "ping"}, "pong")
        return loop.time() - t

    async def attach(self, url: str) -> None:
        """Have the server pull frames from ``url`` (it must be on the server's allow-list)."""
        await self.send_json({"type": "source.attach", "url": url})

    async def cancel(self) -> None:
        await self.send_json({"type": "response.cancel"})

    async def ask(self, text: str, max_new_tokens: int | None = None, timeout: float = 300.0) -> AsyncIterator:
        """Ask; yields ``response.created``, each ``response.delta`` and ``response.done``."""
        msg = {"type": "question", "text": text, "event_id": self._event_id("q")}
        if max_new_tokens is not None:
            msg["max_new_tokens"] = max_new_tokens
        async with aclosing(self._exchange(msg, timeout)) as events:
            async for ev in events:
                yield ev
                if isinstance(ev, P.ResponseDone):
                    return
