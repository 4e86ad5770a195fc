"""A session as an engine client sees it: :class:`SessionHandle`, an id and a mirror of the session's
settings and counters, refreshed by every output batch the engine core sends (``streamer/engine.py``)."""

from __future__ import annotations

import dataclasses

from model.config import SessionConfig
from model.sampling import Sampling

from .core.commands import SessionSettings, SessionState
from .events import FrameCounts

_ZERO = FrameCounts()


class SessionHandle:
    """A session as a client sees it: its id, and a mirror of its settings and counters (as of the last
    batch from the core; :meth:`EngineClient.snapshot` gives an exact look)."""

    def __init__(self, sid: str, config: SessionConfig, settings: SessionSettings, sampling: Sampling,
                 max_tokens: int):
        self.id = sid
        self.config = config  # model settings: layout, budget, frame size, DiffFP
        self.settings = settings  # live settings: fps, proactive
        self.sampling = sampling  # how its answers are generated
        self.instruction: str | None = None
        self.max_tokens = max_tokens
        self.state = SessionState(sid, FrameCounts(), None, None, False, True, 0)
        self.closed = False
        self.sent_questions = 0  # asked since the last state (the mirror's queue length lags by these)
        self.source_seq = 0  # attached sources so far (their frames carry the number)
        self.pushed = self.pushed_source = 0  # frames sent to the core (of them, from attached sources)
        self.base = FrameCounts()  # counts of the session's earlier life (before its worker died)

    def mirror(self, state: SessionState) -> None:
        """Take ``state`` unless the mirror already holds a newer one."""
        if state.version >= self.state.version:
            self.state = state

    def restart(self, state: SessionState, lost: bool) -> None:
        """The core's session began again (another worker): its counts so far become the base, and with
        ``lost`` the frames that never reached the dead core count as dropped."""
        c, transit = self.counts, self.in_transit
        if lost:  # inside it, or on their way to it
            c = dataclasses.replace(c, accepted=c.accepted + transit, pending=0,
                                    dropped=c.dropped + c.pending + transit,
                                    source_frames=c.source_frames + max(0, self.pushed_source
                                                                        - self.state.counts.source_frames))
        self.base = dataclasses.replace(c, fps_in=0.0, fps_processed=0.0, questions_waiting=0)
        self.pushed, self.pushed_source = state.counts.accepted, state.counts.source_frames
        self.state = state

    def lost_frame(self, source: int) -> None:
        """A frame sent while the session had no core to reach (its worker died): offered, and dropped."""
        self.pushed -= 1
        self.pushed_source -= bool(source)
        b = self.base
        self.base = dataclasses.replace(b, accepted=b.accepted + 1, dropped=b.dropped + 1,
                                        source_frames=b.source_frames + bool(source))

    def resume(self, state: SessionState) -> None:
        """Take ``state`` of a session this client did not send frames to so far (another front end did)."""
        self.state = state
        self.pushed, self.pushed_source = state.counts.accepted, state.counts.source_frames

    @property
    def in_transit(self) -> int:
        """Frames sent to the core that the mirror does not count yet (a ``frame.ack`` waits for them)."""
        return max(0, self.pushed - self.state.counts.accepted)

    @property
    def counts(self) -> FrameCounts:
        """The session's frame counters as of the last batch (plus those of its life before its worker died):
        they add up; frames :attr:`in_transit` are not in them yet."""
        c, b = self.state.counts, self.base
        if b == _ZERO:
            return c
        return dataclasses.replace(
            c, accepted=b.accepted + c.accepted, source_frames=b.source_frames + c.source_frames,
            sampled_out=b.sampled_out + c.sampled_out, dropped=b.dropped + c.dropped,
            processed=b.processed + c.processed, refused=b.refused + c.refused,
            errors=b.errors + c.errors, proactive_suppressed=b.proactive_suppressed + c.proactive_suppressed)

    def counters(self) -> FrameCounts:
        return self.counts

    # the frame counters, as of the last batch
    accepted = property(lambda self: self.counts.accepted)
    source_frames = property(lambda self: self.counts.source_frames)
    sampled_out = property(lambda self: self.counts.sampled_out)
    dropped = property(lambda self: self.counts.dropped)
    processed = property(lambda self: self.counts.processed)
    refused = property(lambda self: self.counts.refused)
    pending = property(lambda self: self.counts.pending)
    errors = property(lambda self: self.counts.errors)
    proactive_suppressed = property(lambda self: self.counts.proactive_suppressed)

    @property
    def newest_pts(self) -> float | None:
        return self.state.newest_pts

    def __repr__(self) -> str:
        return f"SessionHandle({self.id!r})"
