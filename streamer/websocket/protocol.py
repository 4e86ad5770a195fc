"""The websocket protocol: message models, parsing and error codes. Pure: no I/O.

JSON text messages with a ``type`` (and an optional client ``event_id`` echoed in errors), in the
style of the OpenAI Realtime and Gemini Live APIs; a binary message is one JPEG/PNG frame. The
pydantic models below are the schema: ``docs/protocol.schema.json`` is generated from them
(``vl3live protocol-schema``) and ``docs/protocol.md`` describes the conversation.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from model.sampling import MAX_TEMPERATURE, MAX_TOP_K, Sampling
from streamer.events import MAX_PENDING

from .codes import CLOSE_CODES, ERROR_CODES

PROTOCOL_VERSION = "1"
EVENT_ID_CHARS = 128
# Upper bounds of numeric fields (besides the server's own limits), so that no value a client may
# send is too large for the engine: every number is range-checked here, at the boundary.
MAX_INT = 2**31 - 1
MAX_PTS = 1e9  # seconds (31 years); jumps are bounded further by server.max_pts_jump
MAX_SECONDS = 1e6  # proactive_cooldown / proactive_every
MAX_FPS = 1000.0
MAX_DIFFP_THRESHOLD = 1000.0  # above any pixel difference in either reference mode

class ProtocolError(ValueError):
    """A message refused with a stable ``code`` (one of :data:`ERROR_CODES`)."""

    def __init__(self, code: str, message: str, event_id: str | None = None):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code, self.message, self.event_id = code, message, event_id


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    event_id: str | None = Field(default=None, max_length=EVENT_ID_CHARS,
                                 description="client id for this message; echoed in errors and answers")


# -- client -> server -----------------------------------------------------------------------------
class Generation(BaseModel):
    """How answers are generated (``session.generation``); each field left out keeps its value."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    max_new_tokens: int | None = Field(default=None, description="answer length limit, >= 1 (<= the server's)")
    do_sample: bool | None = None
    temperature: float | None = Field(default=None, description=f"in (0, {MAX_TEMPERATURE:g}]")
    top_k: int | None = Field(default=None, description=f"0..{MAX_TOP_K} (0: no top-k cut)")
    top_p: float | None = Field(default=None, description="in (0, 1]")
    seed: int | None = Field(default=None, description="0..2**63-1")

    @model_validator(mode="after")
    def _as_sampling(self) -> Generation:
        """The ranges are :class:`model.sampling.Sampling`'s, checked by making one (the one check)."""
        Sampling(**self.model_dump(exclude_none=True))
        return self


class SessionSettings(BaseModel):
    """``session.update`` fields; each one left out keeps its value. ``layout``, ``memory_budget``
    and ``frame_pixels`` shape the cache: they change only before the first frame or question."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    fps: float | None = Field(default=None, gt=0, le=MAX_FPS, description="frames per second sampled, by pts "
                                                                        "(<= server.max_fps)")
    layout: Literal["video-turn", "stream"] | None = None
    diffp_threshold: float | None = Field(default=None, ge=0, le=MAX_DIFFP_THRESHOLD,
                                          description="DiffFP threshold (see README)")
    memory_budget: int | None = Field(default=None, ge=1, le=MAX_INT, description="KV cache budget in tokens")
    frame_pixels: int | None = Field(default=None, ge=784, le=MAX_INT,
                                     description="per-frame pixel budget (<= limits.max_session_frame_pixels)")
    instruction: str | None = Field(default=None, description="standing instruction; \"\" clears it")
    proactive_threshold: float | None = Field(default=None, ge=0, le=1)
    proactive_cooldown: float | None = Field(default=None, ge=0, le=MAX_SECONDS)
    proactive_every: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    generation: Generation | None = None


class SessionUpdate(_Message):
    """Change the session's settings: all of them are checked before any applies."""

    type: Literal["session.update"]
    session: SessionSettings


class InputFrame(_Message):
    """One frame as base64 JPEG or PNG text (binary messages carry the bytes themselves)."""

    type: Literal["input_frame"]
    image: str = Field(description="base64 JPEG or PNG")
    pts: float | None = Field(default=None, ge=0, le=MAX_PTS, description="seconds; default: arrival time. At most "
                              "limits.max_pts_jump past the session's newest frame (or past 0 for the first)")


class InputFrameMeta(_Message):
    """Gives the ``pts`` (and ``event_id``) of the next binary message."""

    type: Literal["input_frame.meta"]
    pts: float | None = Field(default=None, ge=0, le=MAX_PTS)


class SourceAttach(_Message):
    """Have the server pull frames from an RTSP URL on its allow-list instead of sending them."""

    type: Literal["source.attach"]
    url: str = Field(max_length=2048, description="rtsp:// (or other allowed scheme) URL the server pulls")


class SourceDetach(_Message):
    """Stop the attached source."""

    type: Literal["source.detach"]


class Question(_Message):
    """A question about everything the session has seen so far, answered by response events."""

    type: Literal["question"]
    text: str = Field(description="non-empty, at most limits.max_question_chars characters")
    max_new_tokens: int | None = Field(default=None, description="this answer's length limit, >= 1 (<= the "
                                                                 "server's); default: the session's")

    @model_validator(mode="after")
    def _as_sampling(self) -> Question:
        if self.max_new_tokens is not None:
            Sampling(max_new_tokens=self.max_new_tokens)  # the one check of the range
        return self


class ResponseCancel(_Message):
    """End the answer being generated now."""

    type: Literal["response.cancel"]


class Ping(_Message):
    """Answered by ``pong`` with the server's time."""

    type: Literal["ping"]


class SessionClose(_Message):
    """End the session now (its slot is free at once): answered by ``session.closed``, then close 1000."""

    type: Literal["session.close"]


ClientMessage = Annotated[SessionUpdate | InputFrame | InputFrameMeta | SourceAttach | SourceDetach | Question
                          | ResponseCancel | Ping | SessionClose, Field(discriminator="type")]
CLIENT_MODELS = {m.model_fields["type"].annotation.__args__[0]: m for m in
                 (SessionUpdate, InputFrame, InputFrameMeta, SourceAttach, SourceDetach, Question, ResponseCancel,
                  Ping, SessionClose)}


# -- server -> client -----------------------------------------------------------------------------
class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionCreated(_Event):
    """The first message of every connection: the session, its resume token, settings and limits."""

    type: Literal["session.created"] = "session.created"
    protocol: str = PROTOCOL_VERSION
    session_id: str
    resume_token: str = Field(description="reconnect with ?resume=TOKEN within resume_seconds to keep the session")
    resumed: bool = False
    resume_seconds: float
    settings: dict[str, Any]
    limits: dict[str, Any]


class SessionUpdated(_Event):
    """The settings in force after a ``session.update``."""

    type: Literal["session.updated"] = "session.updated"
    event_id: str | None = None
    settings: dict[str, Any]


class FrameAck(_Event):
    """Coalesced: at most one per ``server.ack_interval``; counts are totals for the session."""

    type: Literal["frame.ack"] = "frame.ack"
    received: int = Field(description="frames received on this session (binary or input_frame); received = "
                                      "accepted - source_frames + rate_dropped + rejected")
    accepted: int = Field(description="offered to the engine: decoded client frames and an attached source's "
                                      "frames; accepted = sampled_out + dropped + processed + refused + pending")
    source_frames: int = Field(default=0, description="of accepted, frames pulled from an attached source")
    rate_dropped: int = Field(description="dropped for exceeding server.max_fps")
    rejected: int = Field(description="refused by the server with an error (bad image, too large, bad pts, ...)")
    sampled_out: int = Field(description="not taken by the fps sampler (or pts not increasing)")
    dropped: int = Field(description="replaced by a newer frame before the model took them")
    processed: int = Field(description="appended to the KV cache")
    refused: int = Field(default=0, description="refused by the model session with an error (bad_frame, "
                                                "cache_limit)")
    pending: int = Field(default=0, le=MAX_PENDING, description=f"accepted but without an outcome yet (being "
                         f"preprocessed, waiting for that, in the latest-frame slot or inside the model's step; "
                         f"0-{MAX_PENDING})")
    last_event_id: str | None = None
    last_pts: float | None = Field(default=None, description="stream time of the last processed frame")
    tokens_kept: int | None = Field(default=None, description="DiffFP-kept tokens of the last processed frame")
    tokens_total: int | None = None
    cache_len: int | None = None


class ResponseCreated(_Event):
    """An answer starts: to a question, or by itself (``proactive``)."""

    type: Literal["response.created"] = "response.created"
    response_id: str
    event_id: str | None = None
    question: str | None
    proactive: bool
    t: float | None = Field(description="stream time the answer refers to")


class ResponseDelta(_Event):
    """The next piece of an answer's text."""

    type: Literal["response.delta"] = "response.delta"
    response_id: str
    text: str
    t: float | None


class ResponseDone(_Event):
    """An answer ended; ``text`` is all of it."""

    type: Literal["response.done"] = "response.done"
    response_id: str
    event_id: str | None = None
    text: str
    proactive: bool
    cancelled: bool
    ttft_ms: float | None
    t: float | None


class Alert(_Event):
    """A proactive answer that says something new under the standing instruction."""

    type: Literal["alert"] = "alert"
    response_id: str
    text: str
    instruction: str | None
    t: float | None


class Stats(_Event):
    """The session's counters and the newest frame's figures, at most once per ``server.stats_interval``."""

    type: Literal["stats"] = "stats"
    t: float | None
    stats: dict[str, Any]


class SourceEnded(_Event):
    """The attached source ended or was detached."""

    type: Literal["source.ended"] = "source.ended"
    url: str | None


class SessionClosed(_Event):
    """The session ended (``session.close``); its final ``frame.ack`` came just before."""

    type: Literal["session.closed"] = "session.closed"
    event_id: str | None = None
    session_id: str


class Error(_Event):
    """A message refused or something that failed; the session goes on unless a close code follows."""

    type: Literal["error"] = "error"
    code: str = Field(description="stable; see ERROR_CODES / docs/protocol.md")
    message: str
    event_id: str | None = Field(default=None, description="the offending client message's event_id")


class Pong(_Event):
    """The answer to ``ping``."""

    type: Literal["pong"] = "pong"
    event_id: str | None = None
    server_time: float


ServerEvent = Annotated[SessionCreated | SessionUpdated | FrameAck | ResponseCreated | ResponseDelta | ResponseDone
                        | Alert | Stats | SourceEnded | SessionClosed | Error | Pong, Field(discriminator="type")]
_SERVER = TypeAdapter(ServerEvent)


def json_schema() -> dict:
    """The versioned JSON Schema of both directions (``docs/protocol.schema.json``)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Live VideoLLaMA3 websocket protocol v{PROTOCOL_VERSION}",
        "version": PROTOCOL_VERSION,
        "client": TypeAdapter(ClientMessage).json_schema(),
        "server": _SERVER.json_schema(),
        "error_codes": ERROR_CODES,
        "close_codes": {str(k): v for k, v in CLOSE_CODES.items()},
    }


def dump(event: _Event) -> str:
    """A server event as the JSON text sent on the wire."""
    return event.model_dump_json()


def parse_server_event(text: str | bytes) -> _Event:
    """A server event (clients and tests); raises ``ValidationError`` on anything off-schema."""
    return _SERVER.validate_json(text)


# -- parsing ---------------------------------------------------------------------------------------
def _has_surrogate(value: Any) -> bool:
    """Whether any string in a parsed JSON value cannot be encoded as UTF-8 (iterative: any depth)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _event_id(data: Any) -> str | None:
    if isinstance(data, dict):
        eid = data.get("event_id")
        if isinstance(eid, str) and len(eid) <= EVENT_ID_CHARS and not _has_surrogate(eid):
            return eid
    return None


def parse_client_message(text: str) -> _Message:
    """One client text message as its model; :class:`ProtocolError` says why not."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ProtocolError("invalid_json", "JSON nested too deeply") from None
    except ValueError as exc:
        raise ProtocolError("invalid_json", f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_json", f"a message is a JSON object, got {type(data).__name__}")
    eid = _event_id(data)
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in CLIENT_MODELS:
        shown = kind if isinstance(kind, str) and not _has_surrogate(kind) else None
        raise ProtocolError("unknown_type", f"unknown message type {shown!r}; expected one of "
                                            f"{sorted(CLIENT_MODELS)}", eid)
    if _has_surrogate(data):
        raise ProtocolError("invalid_text", "a string is not valid Unicode (lone surrogate escape)", eid)
    try:
        return CLIENT_MODELS[kind].model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise ProtocolError("invalid_field", f"{kind}: {where}: {first['msg']}", eid) from None
    except RecursionError:
        raise ProtocolError("invalid_field", f"{kind}: nested too deeply", eid) from None


_PEEK = {"type": re.compile(r'"type"\s*:\s*"([a-z_.]+)"'), "event_id": re.compile(r'"event_id"\s*:\s*"([^"\\]{0,256})"')}


def _peek(message: str | bytes, key: str) -> str | None:
    """A string field of a message refused before parsing: a small one is parsed, a large one (an input_frame
    with its image inline) searched; None when there is none."""
    if isinstance(message, bytes):
        return None
    if len(message) > 64 * 1024:
        m = _PEEK[key].search(message)
        return m.group(1) if m else None
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):
        return None
    if key == "event_id":
        return _event_id(obj)
    return obj.get(key) if isinstance(obj, dict) and isinstance(obj.get(key), str) else None


def peek_type(message: str | bytes) -> str | None:
    """The type of a message refused before parsing."""
    return _peek(message, "type")


def peek_event_id(message: str | bytes) -> str | None:
    """The event_id of a message refused before parsing."""
    return _peek(message, "event_id")
