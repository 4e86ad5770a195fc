"""A session as the core holds it: its model ``StreamSession`` plus the frame slot, question queue,
standing instruction and counters around it. Only the core's thread touches it.

Between a source and the model there is one slot per session: the latest sampled frame (latest wins;
every overwritten frame is counted as dropped). Frames are preprocessed on their way into the slot
(:mod:`streamer.core.prep`). Questions wait in a bounded queue. Frame accounting lives here and
nowhere else: every accepted frame gets exactly one outcome (:data:`FRAME_OUTCOMES`) and
``accepted == sampled_out + dropped + processed + refused + pending`` holds in every snapshot.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from model.sampling import Sampling

from ..clock import ArrivalClock, continued_offset
from ..events import FrameCounts
from ..sources import FpsSampler
from .commands import SessionSettings, SessionState

if TYPE_CHECKING:  # (the session's class; importing it loads torch)
    from model import StreamSession

# What becomes of a frame the engine accepted: exactly one of these, counted once it is known.
FRAME_OUTCOMES = ("sampled_out", "dropped", "processed", "refused")


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


class Admission:
    """Where a session's frames are admitted: its clock (frames without pts are stamped on arrival), the pts
    shift of an attached source that continues the clock, and the fps sampler.

    The core runs it as each frame is posted, under its inbox lock, so the inbox only ever holds sampled
    frames, and a newer one replaces an older one still waiting there: at most one frame per session
    waits, however fast frames come, and it is always the newest one the sampler took."""

    def __init__(self, fps: float, totals: Counter | None = None):
        self.sampler = FpsSampler(fps)
        self.clock = ArrivalClock()
        self.source_id = 0  # the attached source whose frames came last, and what its pts are shifted by
        self.source_offset = 0.0
        self.totals = totals
        self.accepted = self.source_frames = self.sampled_out = self.dropped = 0
        self.fps_in = RateMeter()

    def _count(self, what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        if self.totals is not None:
            self.totals[what] += 1

    def admit(self, pts: float | None, source: int, continue_clock: bool) -> float | None:
        """Count a frame offered; its stream time if the sampler takes it, else None (counted sampled out)."""
        self._count("accepted")
        self.fps_in.tick()
        if source:
            self._count("source_frames")
            if source != self.source_id:  # a newly attached source's first frame
                self.source_id = source
                self.source_offset = continued_offset(self.sampler.last, self.sampler.period, pts or 0.0) \
                    if continue_clock else 0.0
        if pts is None:
            pts = self.clock.now(self.sampler.last, self.sampler.period)
        elif source:
            pts += self.source_offset
        if not self.sampler.accept(pts):
            self._count("sampled_out")
            return None
        return pts

    def replaced(self) -> None:
        """A sampled frame still waiting in the inbox was replaced by a newer one."""
        self._count("dropped")

    def superseded(self, n: int, source: int) -> None:
        """``n`` frames a transport replaced with a newer one before they reached the core (a remote
        client's outbox under backpressure): offered, and dropped."""
        for _ in range(n):
            self._count("accepted")
            if source:
                self._count("source_frames")
            self._count("dropped")

    def set_fps(self, fps: float) -> None:
        self.sampler = FpsSampler(fps, last=self.sampler.last)  # the clock goes on


@dataclass(eq=False)
class PendingFrame:
    """A frame on its way from the sampler to the model."""

    pts: float
    rgb: np.ndarray = field(repr=False)
    arrived: float  # monotonic time the frame reached the engine
    event_id: str | None = None
    prepared: Future | None = None  # its PixelFrame, made on a preprocessing thread
    prepared_by: object = None  # the StreamSession whose settings it was made with

    def pixels_for(self, session: object) -> object:
        """What ``session.begin_frame`` takes: the PixelFrame made for it (its ``ValueError`` if the frame
        is bad), or the RGB frame when it was made for other settings or not at all."""
        if self.prepared is not None and self.prepared_by is session and not self.prepared.cancelled():
            return self.prepared.result()
        return self.rgb


@dataclass
class PendingQuestion:
    """A question waiting for its session's turn (checked at the boundary: trusted here)."""

    response_id: str
    text: str | None  # None: the model speaks by itself (stream layout proactive answer)
    sampling: Sampling
    event_id: str | None = None
    proactive: bool = False
    pin: bool = False  # a standing instruction (stream layout): pinned in the cache
    asked: float = field(default_factory=time.monotonic)  # when it was asked: TTFT counts from here


@dataclass
class CoreSession:
    """One session of the core: the model session (``stream``) and everything the core keeps for it."""

    id: str
    stream: StreamSession
    settings: SessionSettings
    sampling: Sampling  # how its answers are generated (``session.generation``)
    frame: PendingFrame | None = None  # preprocessed: the frame the model takes next
    incoming: PendingFrame | None = None  # the newest frame, waiting for the slot to be preprocessed
    preparing: PendingFrame | None = None  # the frame being preprocessed now
    questions: deque = field(default_factory=deque)
    instruction: str | None = None
    last_instruction_t: float | None = None  # video-turn: stream time the instruction was last asked
    last_alert_t: float | None = None
    last_alert_text: str = ""
    closed: bool = False
    dropped: int = 0  # sampled frames overwritten in the slot by a newer one (or left at close)
    processed: int = 0  # appended to the KV cache
    refused: int = 0  # refused by the model session (a bad frame, a full cache)
    in_step: bool = False  # the core holds a frame of this session in a step, without an outcome yet
    errors: int = 0
    proactive_suppressed: int = 0  # video-turn re-asks whose answer said nothing new
    fps_processed: RateMeter = field(default_factory=RateMeter)
    admission: Admission | None = None  # frames offered: accepted, source_frames, sampled_out, dropped in the inbox
    last_keep: tuple | None = None  # (rgb, keep mask) of the last frame in the cache, for the demo's overlay
    fresh_len: int = 0  # cache length before anything entered it (the system prompt)
    totals: Counter | None = None  # the core's frame counts over every session, kept in step with these

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings.fps, self.totals)

    def count(self, what: str, n: int = 1) -> None:
        """Add ``n`` to a frame outcome the core decides (``dropped`` in the slot, ``processed``,
        ``refused``) here and in the core's totals."""
        setattr(self, what, getattr(self, what) + n)
        if self.totals is not None:
            self.totals[what] += n

    def pending(self, in_inbox: bool = False) -> int:
        """Accepted frames without an outcome yet (0 to ``events.MAX_PENDING``): waiting in the core's inbox
        (``in_inbox``) or, once applied, the newest waiting for preprocessing; being preprocessed; in the
        latest-frame slot; inside a model step."""
        return sum(f is not None for f in (self.incoming, self.preparing, self.frame)) + int(self.in_step) \
            + int(in_inbox)

    @property
    def pinned_question(self) -> PendingQuestion | None:
        """The standing instruction's question, while it waits in the queue (at most one)."""
        return next((q for q in self.questions if q.pin), None)

    def question_ready(self) -> bool:
        """A question waits, and can start now: no frame that arrived before it is still being
        preprocessed (frames go before the questions asked after them)."""
        if not self.questions:
            return False
        asked = self.questions[0].asked
        return not any(f is not None and f.arrived <= asked for f in (self.preparing, self.incoming))

    def counters(self, in_inbox: bool = False) -> FrameCounts:
        """A snapshot of the counters (the core takes it under its inbox lock, so they add up)."""
        a = self.admission
        return FrameCounts(accepted=a.accepted, source_frames=a.source_frames, sampled_out=a.sampled_out,
                           dropped=self.dropped + a.dropped, processed=self.processed, refused=self.refused,
                           pending=self.pending(in_inbox), errors=self.errors, fps_in=round(a.fps_in.rate(), 2),
                           fps_processed=round(self.fps_processed.rate(), 2),
                           proactive_suppressed=self.proactive_suppressed, questions_waiting=len(self.questions))

    def state(self, counts: FrameCounts, answering: bool, idle: bool, version: int) -> SessionState:
        return SessionState(self.id, counts, self.admission.sampler.last, self.stream.last_t, answering, idle,
                            self.stream.cache_len, version)
