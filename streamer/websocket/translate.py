"""Engine events to protocol messages, and engine state to the messages that describe it. Pure: no I/O.

The server's writer calls :func:`message` for every event of its session; frame statistics are not
sent one by one but coalesced into ``frame.ack`` (:func:`frame_ack`) and ``stats`` (:func:`stats`)
on their intervals. Tested on raw events (``tests/test_protocol.py``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from streamer.config import EngineConfig
from streamer.events import (
    Alert,
    Error,
    Event,
    FrameCounts,
    FrameStats,
    ResponseCreated,
    ResponseDelta,
    ResponseDone,
    SourceEnded,
)

from . import protocol as P
from .config import ServerConfig

if TYPE_CHECKING:  # (the client's module loads torch; a handle is all this reads)
    from streamer.engine import SessionHandle


def message(ev: Event, source_url: str | None = None) -> P._Event | None:
    """The message a client gets for ``ev`` (None: it is not sent as such). ``source_url``: the URL of
    the source attached to the session, named when it ends."""
    match ev:
        case ResponseCreated():
            return P.ResponseCreated(response_id=ev.response_id, event_id=ev.event_id, question=ev.question,
                                     proactive=ev.proactive, t=ev.t)
        case ResponseDelta():
            return P.ResponseDelta(response_id=ev.response_id, text=ev.text, t=ev.t)
        case ResponseDone():
            return P.ResponseDone(response_id=ev.response_id, event_id=ev.event_id, text=ev.text,
                                  proactive=ev.proactive, cancelled=ev.cancelled, ttft_ms=ev.ttft_ms, t=ev.t)
        case Alert():
            return P.Alert(response_id=ev.response_id, text=ev.text, instruction=ev.instruction, t=ev.t)
        case Error():
            code = ev.code if ev.code in P.ERROR_CODES else "internal"
            return P.Error(code=code, message=ev.message, event_id=ev.event_id)
        case SourceEnded():
            return P.SourceEnded(url=source_url)
    return None


def stats(ev: FrameStats) -> P.Stats:
    """A frame's statistics: its session's counters, the frame's DiffFP and cache figures, its timings."""
    flat = dataclasses.asdict(ev.counts)
    flat.update(tokens_kept=ev.tokens_kept, tokens_total=ev.tokens_total, cache_len=ev.cache_len,
                max_tokens=ev.max_tokens, evicted_frames=ev.evicted_frames, ingest_ms=ev.ingest_ms,
                latency_ms=ev.latency_ms)
    return P.Stats(t=ev.t, stats=flat)


def frame_ack(counts: FrameCounts, last: FrameStats | None, received: int, rate_dropped: int, rejected: int,
              last_event_id: str | None) -> P.FrameAck:
    """Where a session's frames are: the engine's ``counts`` plus what the server itself received, dropped
    for rate and rejected; ``last`` is the newest frame's statistics."""
    return P.FrameAck(received=received, accepted=counts.accepted, source_frames=counts.source_frames,
                      rate_dropped=rate_dropped, rejected=rejected, sampled_out=counts.sampled_out,
                      dropped=counts.dropped, processed=counts.processed, refused=counts.refused,
                      pending=counts.pending, last_event_id=last_event_id,
                      last_pts=last.t if last is not None else None,
                      tokens_kept=last.tokens_kept if last is not None else None,
                      tokens_total=last.tokens_total if last is not None else None,
                      cache_len=last.cache_len if last is not None else None)


def settings(session: SessionHandle) -> dict:
    """A session's settings as ``session.created`` / ``session.updated`` report them."""
    c, cfg, sampling = session.config, session.settings, session.sampling
    return {"fps": cfg.fps, "layout": c.layout, "diffp_threshold": c.threshold,
            "memory_budget": c.budget.max_tokens, "frame_pixels": c.frame_pixels, "instruction": session.instruction,
            "proactive_threshold": cfg.proactive_threshold, "proactive_cooldown": cfg.proactive_cooldown,
            "proactive_every": cfg.proactive_every,
            "generation": {"max_new_tokens": sampling.max_new_tokens, **sampling.settings()}}


def limits(server: ServerConfig, engine: EngineConfig, max_session_frame_pixels: int, max_message_bytes: int) -> dict:
    """The server's limits as ``session.created`` reports them."""
    s, e = server, engine
    return {"max_fps": s.max_fps, "max_frame_bytes": s.max_frame_bytes, "max_frame_pixels": s.max_frame_pixels,
            "max_session_frame_pixels": max_session_frame_pixels, "max_pts_jump": s.max_pts_jump,
            "max_message_bytes": max_message_bytes, "max_messages_per_second": s.max_messages_per_second,
            "max_question_chars": e.max_question_chars, "max_queued_questions": e.max_queued_questions,
            "max_new_tokens": e.max_new_tokens}
