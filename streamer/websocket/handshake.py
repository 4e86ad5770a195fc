"""The HTTP side of the websocket API: ``/health``, ``/metrics``, and the checks of every handshake
(duplicate headers, the bearer token, the browser origin, the resume throttle). Refusals are counted
in ``/metrics`` and logged in one line each.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from . import protocol as P
from .access import FailureThrottle, origin_allowed
from .config import ServerConfig
from .metrics import Metrics

log = logging.getLogger(__name__)

SINGLE_HEADERS = ("Origin", "Authorization", "Host", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Upgrade")


def token_in_force(config: ServerConfig) -> str | None:
    """The token in force; refuses (ValueError) a bind beyond loopback without one."""
    token = config.token or os.environ.get("VL3LIVE_TOKEN") or None
    if not config.loopback and not token:
        raise ValueError(f"refusing to serve on {config.host}: binding beyond loopback needs a token "
                         "(set server.token or $VL3LIVE_TOKEN), or bind 127.0.0.1")
    return token


class Handshake:
    """Answers plain HTTP requests and vets websocket handshakes (``process_request`` of websockets)."""

    def __init__(self, config: ServerConfig, token: str | None, metrics: Metrics, alive: Callable[[], bool],
                 sessions: Callable[[], int], engine_health: Callable[[], dict] = dict):
        self.config, self.token, self.metrics = config, token, metrics
        self._alive, self._sessions, self._engine_health = alive, sessions, engine_health
        self.resume_failures = FailureThrottle(config.resume_failures_per_minute, burst=10)

    def _authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        given = None
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        else:
            given = (parse_qs(urlsplit(request.path).query).get("token") or [None])[0]
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def _refuse(self, conn: ServerConnection, status: HTTPStatus, reason: str, text: str) -> Response:
        """An HTTP refusal of a handshake: counted, and one line in the log (no traceback)."""
        self.metrics.handshakes_refused.labels(reason).inc()
        log.warning("refused %s from %s: %s", status.value, address(conn), text.strip())
        return _response(status, text)

    def __call__(self, conn: ServerConnection, request: Request) -> Response | None:
        doubled = [h for h in SINGLE_HEADERS if len(request.headers.get_all(h)) > 1]
        if doubled:  # ambiguous: which Origin / token would count? Refused before anything reads them
            return self._refuse(conn, HTTPStatus.BAD_REQUEST, "duplicate_header",
                                f"duplicate {', '.join(doubled)} header: send each once\n")
        path = urlsplit(request.path).path
        if path == "/health":
            alive = self._alive()
            body = {"status": "ok" if alive else "engine core stopped", "sessions": self._sessions(),
                    "protocol": P.PROTOCOL_VERSION, **self._engine_health()}
            return _response(HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE, json.dumps(body),
                             "application/json")
        if not self._authorized(request):
            return self._refuse(conn, HTTPStatus.UNAUTHORIZED, "token", "missing or wrong token (Authorization: "
                                                                         "Bearer TOKEN or ?token=TOKEN)\n")
        if path == "/metrics":
            return _response(HTTPStatus.OK, self.metrics.render().decode(), "text/plain; version=0.0.4")
        if path != "/":
            return _response(HTTPStatus.NOT_FOUND, f"no {path}: the websocket is on /, and /health, /metrics\n")
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, self.config.allowed_origins):
            listed = "server.allowed_origins" if self.config.allowed_origins is not None else \
                "loopback pages only, unless listed in server.allowed_origins"
            return self._refuse(conn, HTTPStatus.FORBIDDEN, "origin", f"origin {origin!r} is not allowed ({listed})\n")
        if "resume" in parse_qs(urlsplit(request.path).query, keep_blank_values=True) and \
                self.resume_failures.blocked(address(conn)):
            return self._refuse(conn, HTTPStatus.TOO_MANY_REQUESTS, "resume_throttled",
                                "too many failed resume attempts from this address; wait a minute\n")
        return None


def _response(status: HTTPStatus, body: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    data = body.encode()
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(data))),
                       ("Connection", "close")])
    return Response(status.value, status.phrase, headers, data)


def address(conn: ServerConnection) -> str:
    """The client's IP address (the key of the resume throttle)."""
    peer = conn.remote_address
    return str(peer[0]) if peer else "?"


def closed_by_client(conn: ServerConnection) -> bool:
    """Whether the client ended the connection with a normal closure (1000): it is done with its session."""
    proto = conn.protocol
    return proto.close_rcvd is not None and proto.close_rcvd.code == 1000 and bool(proto.close_rcvd_then_sent)
