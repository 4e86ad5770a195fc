"""What goes into the engine core and what comes out: plain frozen values, nothing live.

The core (:class:`streamer.core.engine_core.EngineCore`) owns every session's state; the only way
in is a command, the only way out an :class:`Outputs` batch. Every field is a number, a string,
bytes, a uint8 array or a frozen settings value, so the same commands cross a thread, a pipe to
another process or a Ray actor unchanged. Checks that need no model (text lengths, ranges) are made
by the client before a command is sent; what only the core can check comes back as an error event
or a refused :class:`Reply`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from model.config import SessionConfig
from model.sampling import Sampling

from ..events import Event, FrameCounts


@dataclass(frozen=True)
class SessionSettings:
    """A session's live settings (``session.update`` changes them; their defaults are ``engine.*``)."""

    fps: float = 1.0
    proactive_threshold: float = 0.5
    proactive_cooldown: float = 10.0
    proactive_every: float = 10.0
    proactive_max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if not (isinstance(self.fps, (int, float)) and self.fps > 0) or self.proactive_every <= 0:
            raise ValueError("fps and proactive_every must be > 0")
        if self.proactive_cooldown < 0:
            raise ValueError("proactive_cooldown must be >= 0")
        if not 0.0 <= self.proactive_threshold <= 1.0:
            raise ValueError("proactive_threshold must be in [0, 1]")
        if self.proactive_max_new_tokens < 1:
            raise ValueError("proactive_max_new_tokens must be >= 1")

    def replace(self, **changes) -> SessionSettings:
        return dataclasses.replace(self, **changes)


UNSET = "unset"  # UpdateSettings.diffp_threshold: leave it as it is


# -- commands -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenSession:
    """A new session with these model settings, live settings and answer sampling (replied: its settings)."""

    sid: str
    config: SessionConfig
    settings: SessionSettings
    sampling: Sampling
    record_logits: bool = False  # keep each answer token's logits (for tests and fidelity checks)


@dataclass(frozen=True)
class PushFrame:
    """One frame as it arrived: RGB uint8 HxWx3, its pts in seconds (None: stamped on arrival)."""

    sid: str
    rgb: np.ndarray = field(repr=False)
    pts: float | None
    arrived: float  # time.monotonic() when it reached the client (latency counts from here)
    event_id: str | None = None
    source: int = 0  # 0: from the client; else the attached source it came from (numbered per session)
    continue_clock: bool = False  # that source's pts are shifted to continue the session's clock
    superseded: int = 0  # frames of this session the transport replaced with this one on the way (dropped)


@dataclass(frozen=True)
class Ask:
    """A question for the session's queue (bounded: ``queue_full``); answered as response events."""

    sid: str
    response_id: str
    text: str
    sampling: Sampling
    event_id: str | None = None
    asked: float = 0.0  # time.monotonic() when it was asked (TTFT counts from here)


@dataclass(frozen=True)
class Cancel:
    """End the answer being generated now, where it got to."""

    sid: str


@dataclass(frozen=True)
class UpdateSettings:
    """New live settings, answer sampling and DiffFP threshold (checked by the client: applied whole)."""

    sid: str
    settings: SessionSettings | None = None
    sampling: Sampling | None = None
    diffp_threshold: float | None | str = UNSET


@dataclass(frozen=True)
class SetInstruction:
    """Set (``text``) or clear (None) the standing instruction the model answers by itself."""

    sid: str
    text: str | None
    response_id: str  # of the pinned instruction answer (stream layout)
    asked: float = 0.0  # time.monotonic() when it was set (frames that arrived before it go first)


@dataclass(frozen=True)
class Reconfigure:
    """New model settings (layout, budget, frame size): only before anything entered the cache."""

    sid: str
    config: SessionConfig


@dataclass(frozen=True)
class CloseSession:
    """End a session: its frames without an outcome are dropped, its KV pages return (replied: its counts)."""

    sid: str


@dataclass(frozen=True)
class Snapshot:
    """A consistent look at one session (``sid``) or at the engine (None)."""

    sid: str | None = None
    overlay: bool = False  # include the last frame in the cache and its DiffFP mask (the demo's overlay)
    detail: bool = False  # include every token id in the cache (and the recorded logits)


Command = OpenSession | PushFrame | Ask | Cancel | UpdateSettings | SetInstruction | Reconfigure | CloseSession \
    | Snapshot
REQUESTS = (OpenSession, Reconfigure, CloseSession, Snapshot)  # commands that get a Reply


# -- outputs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionState:
    """What a client mirrors of a session after each core iteration that touched it."""

    sid: str
    counts: FrameCounts
    newest_pts: float | None  # the newest frame the sampler took (the session's clock)
    last_t: float | None  # the newest frame in the cache
    answering: bool
    idle: bool  # nothing to do and nothing in progress
    cache_len: int
    version: int = 0  # the core's iteration when it was taken: a mirror keeps the newest it has seen


@dataclass(frozen=True)
class SessionSnapshot:
    """The reply to ``Snapshot(sid)``: everything the core knows of one session, copied."""

    sid: str
    config: SessionConfig
    settings: SessionSettings
    sampling: Sampling
    instruction: str | None
    state: SessionState
    stats: object  # model.session.SessionStats
    frames_in_cache: tuple[float, ...]
    overlay: tuple[np.ndarray, np.ndarray] | None = None  # (rgb, keep mask) of the last frame in the cache
    frames_prepared_here: int = 0  # frames the model thread had to preprocess itself (not the prep threads)
    token_ids: tuple[int, ...] | None = None  # with detail
    logits: tuple | None = None  # with detail, when recorded: each answer token's logits (torch, float)


@dataclass(frozen=True)
class EngineState:
    """The engine as a whole, in every batch: pool use, steps, frames by outcome over every session."""

    pool: object | None  # model.kvpool.PoolStats
    steps: int
    step_items: int
    frames: FrameCounts  # over every session, closed ones included
    sessions: int


@dataclass(frozen=True)
class EngineSnapshot:
    """The reply to ``Snapshot(None)``: the engine's state and its recent steps."""

    state: EngineState
    recent_steps: tuple = ()  # (step, {sid: rows}, ms) of the last steps
    host_ms: tuple = ()  # per recent step: ms spent outside the executor's run (scheduling, committing, events)


@dataclass(frozen=True)
class Reply:
    """The answer to a request: ``value`` or a refusal (``code``, ``message``)."""

    request: int
    value: object = None
    code: str | None = None
    message: str | None = None


@dataclass
class Outputs:
    """Everything one core iteration produced, delivered in order as one batch."""

    events: list[Event] = field(default_factory=list)
    states: list[SessionState] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    engine: EngineState | None = None
    lost: str | None = None  # the core is gone (its process died): why
