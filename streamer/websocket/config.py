"""Settings of the websocket API (``server.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from model.configtree import setting

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass
class ServerConfig:
    """The websocket API (``vl3live serve``, ``streamer/websocket/``; protocol in docs/protocol.md)."""

    host: str = setting("address to bind; anything but loopback requires a token", default="127.0.0.1")
    port: int = setting("port to bind (0 = any free port)", default=8765)
    token: str | None = setting("bearer token clients must present (Authorization header or ?token=); "
                              "None = $VL3LIVE_TOKEN if set, else no auth (loopback only)", default=None)
    allowed_origins: list[str] | None = setting(
        "browser Origin values allowed to connect (\"*\" = any); None = pages served from loopback only. "
        "Handshakes without an Origin (programs, not browsers) are always accepted", default=None)
    source_allow: list[str] = setting(
        "what source.attach may pull from: scheme://host[:port] patterns matched on the parsed host; * is a "
        "whole IPv4 octet or part of one DNS label (rtsp://192.168.1.*, rtsp://cam-*.local); without a port "
        "only the scheme's default port (:* = any); empty = source.attach disabled", default_factory=list)
    max_sessions: int = setting("sessions at once, connected or awaiting resume; more are refused", default=16)
    max_session_frame_pixels: int | None = setting(
        "largest session.frame_pixels a client may ask for (each frame costs about frame_pixels / 784 "
        "tokens of model work, which every other session waits for); None = 4 x session.frame_pixels",
        default=None)
    max_pts_jump: float = setting("a client's frame pts may be at most this many seconds past the session's "
                                "newest frame (past 0 for the first); larger jumps are refused", default=3600.0)
    recall_memory_mb: float = setting(
        "host memory for the recall stores of all sessions together: each session's store is capped at "
        "min(session.budget.recall_memory_mb, this / max_sessions); past its cap a session drops its oldest "
        "evicted frames (counted in recall_dropped)", default=8192.0)
    resume_failures_per_minute: float = setting(
        "failed resume attempts allowed per client address and minute (bursts of 10); more get HTTP 429",
        default=10.0)
    max_fps: float = setting("frames per second a client may send; faster ones are dropped (counted)",
                           default=30.0)
    max_frame_bytes: int = setting("largest encoded frame (JPEG/PNG) accepted", default=4 * 1024 * 1024)
    max_frame_pixels: int = setting("largest frame accepted, width x height", default=3840 * 2160)
    max_messages_per_second: float = setting(
        "messages per second per connection (burst 2x); more get a rate_limited error", default=200.0)
    resume_seconds: float = setting(
        "a disconnected session waits this long for its client to resume it; 0 = closed at once", default=30.0)
    ack_interval: float = setting("seconds between coalesced frame.ack events", default=0.5)
    stats_interval: float = setting("seconds between stats events", default=2.0)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"server.port must be in 0..65535, got {self.port}")
        if min(self.max_sessions, self.max_frame_bytes, self.max_frame_pixels) < 1:
            raise ValueError("server.max_sessions, max_frame_bytes and max_frame_pixels must be >= 1")
        if self.max_session_frame_pixels is not None and self.max_session_frame_pixels < 28 * 28:
            raise ValueError(f"server.max_session_frame_pixels must be >= {28 * 28}")
        if self.max_pts_jump <= 0 or self.recall_memory_mb <= 0 or self.resume_failures_per_minute <= 0:
            raise ValueError("server.max_pts_jump, recall_memory_mb and resume_failures_per_minute must be > 0")
        if self.max_fps <= 0 or self.max_messages_per_second <= 0:
            raise ValueError("server.max_fps and server.max_messages_per_second must be > 0")
        if self.resume_seconds < 0 or self.ack_interval <= 0 or self.stats_interval <= 0:
            raise ValueError("server.resume_seconds must be >= 0, ack_interval and stats_interval > 0")
        for pattern in self.source_allow:  # fully parsed by streamer.websocket.access when the server starts
            scheme, sep, rest = pattern.partition("://")
            if not sep or not scheme or not rest or "/" in rest:
                raise ValueError(f"server.source_allow entries look like rtsp://host[:port], got {pattern!r}")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS
