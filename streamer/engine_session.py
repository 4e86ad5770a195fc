"""A session as the engine holds it: its model ``StreamSession`` plus the slot, queue and counters around it.

Between a source and the model there is one slot per session: the latest sampled frame (latest
wins; every overwritten frame is counted as dropped). Frames are preprocessed on their way into the
slot (``streamer/prep.py``). Questions wait in a bounded queue. All
fields shared with the model worker are guarded by the worker's condition (``ModelWorker.condition``).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.sampling import Sampling

from .clock import ArrivalClock
from .config import EngineConfig
from .events import FrameCounts
from .sources import FpsSampler, Frame

if TYPE_CHECKING:  # (the session's class; importing it loads torch)
    from model import StreamSession


class RateMeter:
    """Events per second over the last ``window`` seconds (bounded: at most one entry per event in it)."""

    def __init__(self, window: float = 5.0):
        self.window = window
        self._times: deque[float] = deque()

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._times.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        if len(self._times) < 2:
            return 0.0
        return (len(self._times) - 1) / max(self._times[-1] - self._times[0], 1e-6)


@dataclass
class PendingFrame:
    """A frame on its way from the sampler to the model."""

    frame: Frame
    arrived: float  # monotonic time the frame reached the engine
    event_id: str | None = None  # the client's id for it (websocket), carried on its error
    prepared: Future | None = None  # its PixelFrame, made on a preprocessing thread
    prepared_by: object = None  # the StreamSession whose settings it was made with

    def pixels_for(self, session: object) -> object:
        """What ``session.begin_frame`` takes: the PixelFrame made for it (its ``ValueError`` if the frame
        is bad), or the RGB frame when it was made for other settings or not at all."""
        if self.prepared is not None and self.prepared_by is session and not self.prepared.cancelled():
            return self.prepared.result()
        return self.frame.rgb


# What becomes of a frame the engine accepted: exactly one of these, counted once it is known.
FRAME_OUTCOMES = ("sampled_out", "dropped", "processed", "refused")


@dataclass
class PendingQuestion:
    """A question waiting for its session's turn (checked at the boundary: trusted here)."""

    response_id: str
    text: str | None  # None: the model speaks by itself (stream layout proactive answer)
    sampling: Sampling
    event_id: str | None = None
    proactive: bool = False
    pin: bool = False
    asked: float = field(default_factory=time.monotonic)  # when it was asked: TTFT counts from here


@dataclass
class EngineSession:
    """One session of the engine: the model session (``stream``) and everything the engine keeps for it."""

    id: str
    stream: StreamSession
    cfg: EngineConfig
    sampling: Sampling  # how its answers are generated (``session.generation``)
    frame: PendingFrame | None = None  # preprocessed: the frame the model takes next
    incoming: PendingFrame | None = None  # the newest frame, waiting for the slot to be preprocessed
    preparing: PendingFrame | None = None  # the frame being preprocessed now
    questions: deque = field(default_factory=deque)
    instruction: str | None = None
    instruction_queued: bool = False  # stream layout: the instruction is not in the cache yet
    last_instruction_t: float | None = None  # video-turn: stream time the instruction was last asked
    last_alert_t: float | None = None
    last_alert_text: str = ""
    closed: bool = False
    accepted: int = 0  # frames offered to the engine (by the client or an attached source)
    source_frames: int = 0  # of those, frames an attached source delivered
    sampled_out: int = 0  # not taken by the fps sampler (or pts not increasing)
    dropped: int = 0  # sampled frames overwritten by a newer one before the model took them (or left at close)
    processed: int = 0  # appended to the KV cache
    refused: int = 0  # refused by the model session (a bad frame, a full cache)
    in_step: bool = False  # the model worker holds a frame of this session that has no outcome yet
    errors: int = 0
    proactive_suppressed: int = 0  # video-turn re-asks whose answer said nothing new
    fps_in: RateMeter = field(default_factory=RateMeter)
    fps_processed: RateMeter = field(default_factory=RateMeter)
    sampler: FpsSampler | None = None
    last_keep: tuple | None = None  # (rgb, keep mask) of the last frame in the cache, for the demo's overlay
    fresh_len: int = 0  # cache length before anything entered it (the system prompt)
    clock: ArrivalClock = field(default_factory=ArrivalClock)
    totals: Counter | None = None  # the engine's frame counts over every session, kept in step with these

    def __post_init__(self) -> None:
        self.sampler = FpsSampler(self.cfg.fps)

    def count(self, what: str, n: int = 1) -> None:
        """Add ``n`` to a frame counter (``accepted``, ``source_frames`` or an outcome) here and in the
        engine's totals. Under the model worker's condition, so a snapshot always adds up."""
        setattr(self, what, getattr(self, what) + n)
        if self.totals is not None:
            self.totals[what] += n

    @property
    def pending(self) -> int:
        """Accepted frames without an outcome yet: being preprocessed, in the latest-frame slot, or inside a
        model step (0-4). At all times ``accepted == sampled_out + dropped + processed + refused + pending``."""
        return sum(f is not None for f in (self.incoming, self.preparing, self.frame)) + int(self.in_step)

    def question_ready(self) -> bool:
        """A question waits, and can start now: no frame that arrived before it is still being
        preprocessed (frames go before the questions asked after them)."""
        if not self.questions:
            return False
        asked = self.questions[0].asked
        return not any(f is not None and f.arrived <= asked for f in (self.preparing, self.incoming))

    def counters(self) -> FrameCounts:
        """A snapshot of the counters (take it under the model worker's condition to have them add up)."""
        return FrameCounts(accepted=self.accepted, source_frames=self.source_frames, sampled_out=self.sampled_out,
                           dropped=self.dropped, processed=self.processed, refused=self.refused,
                           pending=self.pending, errors=self.errors, fps_in=round(self.fps_in.rate(), 2),
                           fps_processed=round(self.fps_processed.rate(), 2),
                           proactive_suppressed=self.proactive_suppressed, questions_waiting=len(self.questions))
