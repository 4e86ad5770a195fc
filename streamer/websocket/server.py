"""The websocket API's I/O over the live engine (messages: ``protocol.py``; their translation: ``translate.py``).

One session per connection. A client that closes cleanly (close code 1000) or sends
``session.close`` ends its session at once; one that drops keeps it for ``server.resume_seconds``
and gets it back by reconnecting with ``?resume=TOKEN`` (from ``session.created``; a new token
comes with every resume). Besides the websocket on ``/``, plain HTTP ``GET /health`` and
``GET /metrics`` (Prometheus) are served. Every bad message costs one ``error`` event; the
connection closes only on the documented codes. Who may connect and what may be attached:
``access.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import time
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from streamer.bus import Subscription
from streamer.engine import EngineClient, EngineError, SessionHandle
from streamer.events import Error, Event, FrameStats, SourceEnded
from streamer.sources import Frame
from streamer.sources.spec import open_source, parse_pattern, source_allowed
from streamer.websocket.config import ServerConfig

from . import images, translate
from . import protocol as P
from .access import TokenBucket
from .handshake import Handshake, address, closed_by_client, token_in_force
from .metrics import Metrics
from .updates import apply_update

log = logging.getLogger(__name__)

RESUME_TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")  # secrets.token_urlsafe(24): 192 bits
# The one message every unreachable source gets (details go to the server's log): the text must not
# tell a port scanner which ports are open.
SOURCE_UNREACHABLE = ("cannot read from the source (unreachable, refused, or not a video stream); retrying until "
                      "source.detach")


@dataclasses.dataclass
class ApiSession:
    """A session as the API sees it: its engine session plus what outlives one connection."""

    session: SessionHandle
    resume_token: str
    sub: Subscription
    conn: ServerConnection | None = None
    expiry: asyncio.TimerHandle | None = None
    received: int = 0
    rate_dropped: int = 0
    rejected: int = 0
    last_event_id: str | None = None
    last_stats: FrameStats | None = None
    ack_dirty: bool = False
    acked: tuple = ()  # the engine's frame counts in the last frame.ack sent
    decoding: int = 0  # frames received and being decoded (not counted anywhere else yet: no ack meanwhile)
    stats_dirty: bool = False
    meta: tuple[float | None, str | None] | None = None  # from input_frame.meta, for the next binary frame
    source_url: str | None = None
    fps_bucket: TokenBucket | None = None
    backlog: list[Event] = dataclasses.field(default_factory=list)  # sent first on resume


class Server:
    """The websocket API. ``async with Server(engine, config) as srv: await srv.serve_forever()``."""

    def __init__(self, engine: EngineClient, config: ServerConfig | None = None):
        self.engine = engine
        self.config = config or ServerConfig()
        self.token = self.check(self.config)
        self.sessions: dict[str, ApiSession] = {}  # by resume token
        self.metrics = Metrics(lambda: [(s.session, s.conn is not None) for s in self.sessions.values()],
                               engine.frame_counts, engine.stats, engine.workers)
        engine.bus.observe(self.metrics.observe)
        engine.moved_hooks.append(self._moved)
        self._ws: WsServer | None = None
        self._opening = 0
        self.port: int | None = None
        cfg = self.config
        self._transport_max = cfg.max_frame_bytes * 4 // 3 + 64 * 1024
        self._source_allow = [parse_pattern(p) for p in cfg.source_allow]  # a bad pattern fails at start
        self._handshake = Handshake(cfg, self.token, self.metrics, lambda: engine.alive, lambda: len(self.sessions),
                                    engine.health)
        defaults = engine.session_config
        self.max_session_frame_pixels = cfg.max_session_frame_pixels or 4 * defaults.frame_pixels
        # every session's recall store gets its share of server.recall_memory_mb
        self.recall_mb = min(defaults.budget.recall_memory_mb, cfg.recall_memory_mb / cfg.max_sessions)

    @staticmethod
    def check(config: ServerConfig) -> str | None:
        """The token in force; refuses (ValueError) a bind beyond loopback without one."""
        return token_in_force(config)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> int:
        self._ws = await serve(self._handle, self.config.host, self.config.port, process_request=self._handshake,
                               max_size=self._transport_max, max_queue=16, compression=None, ping_interval=20,
                               ping_timeout=20, server_header="vl3live")
        self.port = self._ws.sockets[0].getsockname()[1]
        return self.port

    async def serve_forever(self) -> None:
        """Serve until cancelled (Ctrl-C). Not the listener's own ``serve_forever``: cancelled, that waits
        for every open connection to end by itself before ``close()`` could close them."""
        assert self._ws is not None
        await asyncio.get_running_loop().create_future()

    async def close(self) -> None:
        if self._ws is not None:
            self._ws.close()  # closes every connection (1001) and waits for their handlers
            try:
                await asyncio.wait_for(self._ws.wait_closed(), 15.0)
            except TimeoutError:
                log.warning("connections still open 15 s after closing; shutting down anyway")
            self._ws = None
        for s in list(self.sessions.values()):
            if self.engine.outlives_doors:  # the sessions stay on the workers, resumable through another door
                if s.expiry is not None:
                    s.expiry.cancel()
                s.sub.close()
                await self._remember(s)
                continue
            await self._end(s)
        self.sessions.clear()

    # -- connections ----------------------------------------------------------------------------------
    async def _handle(self, conn: ServerConnection) -> None:
        self.metrics.connections.inc()
        resume = parse_qs(urlsplit(conn.request.path).query, keep_blank_values=True).get("resume")
        try:
            s = await (self._resume(conn, resume) if resume is not None else self._open(conn))
        except ConnectionClosed:
            return
        if s is None:
            return
        s.ack_dirty = s.ack_dirty or s.received > 0  # a resumed client is told at once where its session is
        writer = None
        try:
            await conn.send(P.dump(P.SessionCreated(
                session_id=s.session.id, resume_token=s.resume_token, resumed=resume is not None,
                resume_seconds=self.config.resume_seconds, settings=translate.settings(s.session),
                limits=translate.limits(self.config, self.engine.config, self.max_session_frame_pixels,
                                                 self._transport_max))))
            writer = asyncio.create_task(self._write(conn, s), name=f"ws-writer:{s.session.id}")
            await self._read(conn, s)
        except ConnectionClosed:
            pass
        finally:
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            if s.conn is conn:  # not taken over by a resume
                s.conn = None
                if s.resume_token in self.sessions:
                    if closed_by_client(conn):  # done with it: the slot is free at once
                        await self._end(s)
                    else:  # dropped: wait for a resume
                        self._detach(s)

    async def _resume(self, conn: ServerConnection, given: list[str]) -> ApiSession | None:
        token = given[0] if len(given) == 1 else ""
        s = self.sessions.get(token) if RESUME_TOKEN.fullmatch(token) else None
        if s is None and RESUME_TOKEN.fullmatch(token):  # held behind another front door (the cluster)?
            s = await self._adopt(conn, token)
            if s is not None:
                return s
        if s is None:
            self._handshake.resume_failures.failed(address(conn))
            why = "unknown or expired resume token" if RESUME_TOKEN.fullmatch(token) else \
                "malformed resume token (?resume= takes the resume_token of session.created, once)"
            await self._error(conn, "resume_failed", why)
            await conn.close(4001, "resume_failed")
            return None
        if s.expiry is not None:
            s.expiry.cancel()
            s.expiry = None
        # a new token on every resume: whoever held the old one (a thief, or the owner's stale copy)
        # cannot take the session back with it
        del self.sessions[s.resume_token]
        s.resume_token = secrets.token_urlsafe(24)
        self.sessions[s.resume_token] = s
        await self._remember(s)
        old, s.conn = s.conn, conn
        if old is not None:  # a dead peer not noticed yet, or the same client twice
            await old.close(4003, "resumed on another connection")
        if s.sub.closed:  # it overflowed while nobody read it: deliver what it kept (ending with the
            old_sub = s.sub  # subscriber_overflow error), then go on with a fresh subscription
            s.backlog = [ev for ev in iter(old_sub.get_nowait, None)]
            s.sub = self.engine.bus.subscribe(s.session.id)
        return s

    async def _adopt(self, conn: ServerConnection, token: str) -> ApiSession | None:
        """The session another front door registered under ``token`` (a cluster's worker holds it), or None."""
        if len(self.sessions) + self._opening >= self.config.max_sessions:
            return None
        self._opening += 1
        try:
            adopted = await self.engine.adopt(token)
        finally:
            self._opening -= 1
        if adopted is None:
            return None
        session, api, missed = adopted
        s = ApiSession(session, secrets.token_urlsafe(24), self.engine.bus.subscribe(session.id), conn=conn,
                       received=api.get("received", 0), rate_dropped=api.get("rate_dropped", 0),
                       rejected=api.get("rejected", 0), last_event_id=api.get("last_event_id"), backlog=list(missed))
        s.fps_bucket = TokenBucket(self.config.max_fps, max(2.0, self.config.max_fps))
        s.ack_dirty = True  # told at once where its session is
        self.sessions[s.resume_token] = s
        await self._remember(s)
        return s

    async def _remember(self, s: ApiSession) -> None:
        """Tell the engine the session's resume token and this server's counters for it (a cluster keeps them
        with the session, so that another front door can resume it)."""
        await self.engine.remember(s.session, s.resume_token, self.config.resume_seconds, self._api_counts(s))

    @staticmethod
    def _api_counts(s: ApiSession) -> dict:
        return {"received": s.received, "rate_dropped": s.rate_dropped, "rejected": s.rejected,
                "last_event_id": s.last_event_id}

    def _moved(self, sid: str) -> None:
        """(Loop.) The session was resumed through another front door: it is not this server's any more."""
        for s in list(self.sessions.values()):
            if s.session.id == sid:
                del self.sessions[s.resume_token]
                if s.expiry is not None:
                    s.expiry.cancel()
                s.sub.close()
                conn, s.conn = s.conn, None
                if conn is not None:
                    asyncio.ensure_future(conn.close(4003, "resumed on another connection"))

    async def _open(self, conn: ServerConnection) -> ApiSession | None:
        if len(self.sessions) + self._opening >= self.config.max_sessions:
            await self._error(conn, "too_many_sessions", f"the server has {self.config.max_sessions} sessions")
            await conn.close(1013, "too many sessions")
            return None
        self._opening += 1  # counted while the session is built
        session_config = self.engine.session_config
        session_config = dataclasses.replace(session_config, budget=dataclasses.replace(
            session_config.budget, recall_memory_mb=self.recall_mb))
        try:
            session = await self.engine.open_session(session_config)
        except EngineError as exc:  # the KV pool cannot hold another session's budget
            await self._error(conn, exc.code, str(exc))
            await conn.close(1013 if exc.code == "too_many_sessions" else 1011, "cannot open a session")
            return None
        except Exception as exc:  # e.g. the worker stopped during shutdown
            await self._error(conn, "internal", f"cannot open a session: {exc}")
            await conn.close(1011, "cannot open a session")
            return None
        finally:
            self._opening -= 1
        s = ApiSession(session, secrets.token_urlsafe(24), self.engine.bus.subscribe(session.id), conn=conn)
        s.fps_bucket = TokenBucket(self.config.max_fps, max(2.0, self.config.max_fps))
        self.sessions[s.resume_token] = s
        await self._remember(s)
        return s

    def _detach(self, s: ApiSession) -> None:
        if self.config.resume_seconds <= 0:
            asyncio.get_running_loop().create_task(self._end(s))
            return
        if self.engine.outlives_doors:  # its counters as they are now, for a resume through another door
            asyncio.get_running_loop().create_task(self._remember(s))

        def expire() -> None:
            if s.conn is None:
                asyncio.ensure_future(self._end(s))

        s.expiry = asyncio.get_running_loop().call_later(self.config.resume_seconds, expire)

    async def _end(self, s: ApiSession, code: int = 1001, reason: str = "server shutting down") -> None:
        if self.sessions.pop(s.resume_token, None) is None:
            return
        if s.expiry is not None:
            s.expiry.cancel()
        conn, s.conn = s.conn, None
        s.sub.close()
        await self.engine.close_session(s.session.id)  # freed before the client sees the close
        if conn is not None:
            await conn.close(code, reason)

    # -- reading --------------------------------------------------------------------------------------
    async def _read(self, conn: ServerConnection, s: ApiSession) -> None:
        bucket = TokenBucket(self.config.max_messages_per_second, 2 * self.config.max_messages_per_second)
        async for message in conn:
            if not bucket.take():
                eid = P.peek_event_id(message)
                if isinstance(message, bytes):  # a frame all the same: counted once, with its meta's event_id
                    eid = s.meta[1] if s.meta is not None else None
                    s.meta = None
                    self._received(s, eid)
                    self._rate_dropped(s)
                elif P.peek_type(message) == "input_frame":
                    self._received(s, eid)
                    self._rate_dropped(s)
                await self._error(conn, "rate_limited", "too many messages per second; this one was not processed",
                                  eid)
                continue
            try:
                if isinstance(message, bytes):
                    pts, eid = s.meta if s.meta is not None else (None, None)
                    s.meta = None
                    await self._frame(s, message, pts, eid)
                else:
                    await self._dispatch(conn, s, P.parse_client_message(message))
            except P.ProtocolError as exc:
                await self._error(conn, exc.code, exc.message, exc.event_id)
            except EngineError as exc:
                await self._error(conn, exc.code, str(exc), P.peek_event_id(message))
            except ConnectionClosed:
                raise
            except Exception as exc:  # a bug: report it, keep the session and the connection
                log.exception("session %s: message failed", s.session.id)
                await self._error(conn, "internal", f"{type(exc).__name__}: {exc}", P.peek_event_id(message))

    async def _dispatch(self, conn: ServerConnection, s: ApiSession, msg: P._Message) -> None:
        eid = msg.event_id
        try:
            if isinstance(msg, P.InputFrame):
                await self._frame(s, msg.image, msg.pts, eid)
            elif isinstance(msg, P.InputFrameMeta):
                s.meta = (msg.pts, eid)
            elif isinstance(msg, P.Question):
                n = msg.max_new_tokens
                sampling = s.session.sampling.replace(max_new_tokens=n) if n is not None else None
                self.engine.ask(s.session, msg.text, sampling, eid)
            elif isinstance(msg, P.ResponseCancel):
                if not self.engine.cancel(s.session):
                    raise P.ProtocolError("nothing_to_cancel", "no answer is being generated", eid)
            elif isinstance(msg, P.Ping):
                await conn.send(P.dump(P.Pong(event_id=eid, server_time=time.time())))
            elif isinstance(msg, P.SessionUpdate):
                await apply_update(self.engine, s.session, msg.session, self.config.max_fps,
                                   self.max_session_frame_pixels)
                await conn.send(P.dump(P.SessionUpdated(event_id=eid, settings=translate.settings(s.session))))
            elif isinstance(msg, P.SourceAttach):
                await self._attach(s, msg.url, eid)
            elif isinstance(msg, P.SourceDetach):
                if not await self.engine.detach(s.session):
                    raise P.ProtocolError("source_busy", "no source is attached", eid)
                s.source_url = None
            elif isinstance(msg, P.SessionClose):
                await conn.send(P.dump(self._ack(s)))  # the final counts
                await conn.send(P.dump(P.SessionClosed(event_id=eid, session_id=s.session.id)))
                await self._end(s, 1000, "session closed")
        except P.ProtocolError as exc:
            exc.event_id = exc.event_id or eid
            raise
        except EngineError as exc:
            raise P.ProtocolError(exc.code if exc.code in P.ERROR_CODES else "invalid_field", str(exc), eid) from None
        except ValueError as exc:  # a config the session refuses (e.g. a budget below its minimum)
            raise P.ProtocolError("invalid_field", str(exc), eid) from None

    def _received(self, s: ApiSession, eid: str | None) -> None:
        """A frame reached the server: counted once, whatever becomes of it."""
        s.received += 1
        s.last_event_id = eid
        s.ack_dirty = True
        self.metrics.frames["received"] += 1

    def _rate_dropped(self, s: ApiSession) -> None:
        s.rate_dropped += 1
        self.metrics.frames["rate_dropped"] += 1

    async def _frame(self, s: ApiSession, data: bytes | str, pts: float | None, eid: str | None) -> None:
        """One frame message: binary JPEG/PNG bytes, or ``input_frame``'s base64 text."""
        self._received(s, eid)
        if not s.fps_bucket.take():  # over server.max_fps: dropped before any decoding
            self._rate_dropped(s)
            return
        cfg = self.config
        try:
            if self.engine.has_source(s.session):
                raise P.ProtocolError("source_busy", "a source is attached to this session; detach it to send "
                                                     "frames")
            if pts is not None:  # a client's own clock: bounded jumps (the timestamp text and the clock)
                newest = s.session.newest_pts or 0.0
                if pts > newest + cfg.max_pts_jump:
                    raise P.ProtocolError("invalid_field", f"pts {pts:g} is more than server.max_pts_jump "
                                                           f"({cfg.max_pts_jump:g} s) past the session's newest "
                                                           f"frame ({newest:g} s); send stream time in seconds")
            raw = images.decode_base64_image(data, cfg.max_frame_bytes) if isinstance(data, str) else data
            s.decoding += 1
            try:
                rgb = await asyncio.to_thread(images.decode_image, raw, cfg.max_frame_bytes, cfg.max_frame_pixels)
            finally:
                s.decoding -= 1
            # from here every frame has exactly one outcome in the engine's counters (no pts: stamped on arrival)
            self.engine.push_frame(s.session, Frame(pts, rgb) if pts is not None else rgb, event_id=eid)
        except (P.ProtocolError, EngineError) as exc:
            s.rejected += 1
            self.metrics.frames["rejected"] += 1
            if isinstance(exc, P.ProtocolError):
                exc.event_id = eid
                raise
            raise P.ProtocolError(exc.code if exc.code in P.ERROR_CODES else "invalid_field", str(exc), eid) from None

    async def _attach(self, s: ApiSession, url: str, eid: str | None) -> None:
        if not source_allowed(url, self._source_allow):
            raise P.ProtocolError("source_forbidden", "this URL is not on the server's source allow-list "
                                                      f"({', '.join(self.config.source_allow) or 'empty: attach is off'})",
                                  eid)
        if self.engine.has_source(s.session):
            raise P.ProtocolError("source_busy", f"a source is attached already ({s.source_url})", eid)
        sid = s.session.id
        loop = asyncio.get_running_loop()

        def failed(message: str) -> None:  # from the reader thread; the reader keeps retrying
            log.info("session %s: source %s: %s", sid, url, message)  # the details stay here
            loop.call_soon_threadsafe(self.engine.bus.publish, Error(session=sid, code="source",
                                                                     message=SOURCE_UNREACHABLE, event_id=eid))

        try:
            source = open_source(url, s.session.settings.fps, on_failure=failed)
        except (ValueError, FileNotFoundError) as exc:  # allowed, but not a kind of source there is
            raise P.ProtocolError("invalid_field", str(exc), eid) from None
        s.source_url = url
        self.engine.attach(s.session, source, continue_clock=True)

    # -- writing --------------------------------------------------------------------------------------
    async def _error(self, conn: ServerConnection, code: str, message: str, event_id: str | None = None) -> None:
        self.metrics.errors.labels(code).inc()
        await conn.send(P.dump(P.Error(code=code, message=message, event_id=event_id)))

    async def _write(self, conn: ServerConnection, s: ApiSession) -> None:
        """Forward the session's events; coalesce frame.ack and stats on their intervals."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        next_ack = next_stats = loop.time()
        try:
            while s.backlog:
                await self._forward(conn, s, s.backlog.pop(0))
            while True:
                timeout = max(0.0, min(next_ack, next_stats) - loop.time())
                ev = await s.sub.get(timeout)  # None: the timeout, or the subscription closed
                if ev is not None:
                    await self._forward(conn, s, ev)
                elif s.sub.closed:
                    if self.sessions.get(s.resume_token) is s:  # overflowed (not ended by _end)
                        await conn.close(4002, "subscriber_overflow")
                    return
                now = loop.time()
                if now >= next_ack:
                    next_ack = now + cfg.ack_interval
                    c = self.engine.counters(s.session)
                    counts = (c.accepted, c.sampled_out, c.dropped, c.processed, c.refused, c.pending)
                    if s.received and counts != s.acked:  # the counters moved without an event (sampled out)
                        s.ack_dirty = True
                    # an ack always adds up: none while a frame is decoded or on its way to the core
                    if s.ack_dirty and not s.decoding and not s.session.in_transit:
                        s.ack_dirty, s.acked = False, counts
                        await conn.send(P.dump(self._ack(s)))
                        self.engine.note(s.session, self._api_counts(s))
                if now >= next_stats:
                    next_stats = now + cfg.stats_interval
                    if s.stats_dirty and s.last_stats is not None:
                        s.stats_dirty = False
                        await conn.send(P.dump(translate.stats(s.last_stats)))
        except ConnectionClosed:
            pass
        except Exception:  # a bug: say so and end the connection (a mute one helps nobody); resumable
            log.exception("session %s: writing events failed", s.session.id)
            await conn.close(1011, "internal error")

    async def _forward(self, conn: ServerConnection, s: ApiSession, ev: Event) -> None:
        if isinstance(ev, FrameStats):  # coalesced into frame.ack and stats
            s.last_stats = ev
            s.ack_dirty = s.stats_dirty = True
            return
        if isinstance(ev, Error):
            s.ack_dirty = True  # a refused frame changes the counts
        msg = translate.message(ev, s.source_url)
        if msg is not None:
            await conn.send(P.dump(msg))
        if isinstance(ev, SourceEnded):
            s.source_url = None

    def _ack(self, s: ApiSession) -> P.FrameAck:
        return translate.frame_ack(self.engine.counters(s.session), s.last_stats, s.received, s.rate_dropped,
                                   s.rejected, s.last_event_id)
