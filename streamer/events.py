"""What the engine tells its listeners: one dataclass per kind of event, published on the bus.

Consumers (the websocket translation, the terminal printer, the demo, metrics) ``match`` on the
class. ``session`` is the session's id; ``t`` the stream time (seconds) the event refers to;
``seq`` the bus-wide order, set when it is published.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class Event:
    """Base of every event."""

    session: str
    t: float | None = None
    seq: int = field(default=0, compare=False)


MAX_PENDING = 4  # frames without an outcome yet: being preprocessed, the newest waiting for that, the slot, a step


@dataclass(frozen=True)
class FrameCounts:
    """A session's frame counters, one consistent snapshot: at all times
    ``accepted == sampled_out + dropped + processed + refused + pending``."""

    accepted: int = 0  # frames offered to the engine (by the client or an attached source)
    source_frames: int = 0  # of those, frames an attached source delivered
    sampled_out: int = 0  # not taken by the fps sampler (or pts not increasing)
    dropped: int = 0  # overwritten by a newer frame before the model took them (or left at close)
    processed: int = 0  # appended to the KV cache
    refused: int = 0  # refused by the model session (a bad frame, a full cache)
    pending: int = 0  # 0-4: being preprocessed, the newest waiting for that, in the slot, inside a step
    errors: int = 0
    fps_in: float = 0.0
    fps_processed: float = 0.0
    proactive_suppressed: int = 0  # video-turn re-asks whose answer said nothing new
    questions_waiting: int = 0


@dataclass(kw_only=True)
class FrameStats(Event):
    """A frame entered the KV cache. The only event a slow subscriber may lose (counted)."""

    counts: FrameCounts
    tokens_kept: int
    tokens_total: int
    cache_len: int
    max_tokens: int | None
    evicted_frames: int
    ingest_ms: float  # the model's time for this frame
    latency_ms: float  # from its arrival at the engine to its stats


@dataclass(kw_only=True)
class ResponseCreated(Event):
    """An answer starts: to a question, or by itself (``proactive``; ``question`` None in the stream layout)."""

    response_id: str
    question: str | None
    proactive: bool = False
    event_id: str | None = None  # the client's id of the question


@dataclass(kw_only=True)
class ResponseDelta(Event):
    """The next piece of an answer's text."""

    response_id: str
    text: str


@dataclass(kw_only=True)
class ResponseDone(Event):
    """An answer ended (``cancelled``: by ``response.cancel``); ``text`` is all of it."""

    response_id: str
    text: str
    proactive: bool = False
    cancelled: bool = False
    ttft_ms: float | None = None  # from the question's arrival to its first token
    event_id: str | None = None


@dataclass(kw_only=True)
class Alert(Event):
    """A proactive answer that says something new, under the standing instruction."""

    response_id: str
    text: str
    instruction: str | None


@dataclass(kw_only=True)
class Error(Event):
    """Something a session refused or that failed in it; ``code`` is the protocol's error code
    (``streamer/websocket/protocol.py``). The session goes on."""

    code: str
    message: str
    event_id: str | None = None


@dataclass(kw_only=True)
class SessionCreated(Event):
    """A session opened (its KV cache holds the system prompt)."""

    layout: str
    max_tokens: int | None


@dataclass(kw_only=True)
class SessionClosed(Event):
    """A session ended; its final counts."""

    counts: FrameCounts


@dataclass(kw_only=True)
class SourceEnded(Event):
    """The source attached to a session ended, or failed (``error`` says why)."""

    counts: FrameCounts
    error: str | None = None
