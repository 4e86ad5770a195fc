"""Answers as the engine tells them: what each token, each end and each proactive moment publishes.

Pure bookkeeping over one answer (:class:`Answer`) and one decision (:func:`proactive_question`); the
core runs the model and hands what these return to the bus.
"""

from __future__ import annotations

import re
import time

from ..events import Alert, Event, ResponseCreated, ResponseDelta, ResponseDone
from .state import CoreSession, PendingQuestion


def _normalized(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


class Answer:
    """One answer being generated: its question, its text so far, its time to first token."""

    def __init__(self, q: PendingQuestion, t: float | None):
        self.q, self.t = q, t
        self.parts: list[str] = []
        self.started = q.asked  # TTFT includes the wait in the session's question queue
        self.ttft_ms: float | None = None
        self.cancelled = False

    @property
    def silent(self) -> bool:
        """video-turn re-asks are only told once their whole text is known to say something new."""
        return self.q.proactive and self.q.text is not None

    def created(self, session_id: str) -> ResponseCreated:
        q = self.q
        return ResponseCreated(session=session_id, t=self.t, response_id=q.response_id, question=q.text,
                               proactive=q.proactive, event_id=q.event_id)

    def token(self, session_id: str, text: str) -> list[Event]:
        """A token's text arrived: the delta to publish (none while silent or while it shows nothing)."""
        if self.ttft_ms is None:
            self.ttft_ms = (time.monotonic() - self.started) * 1e3
        self.parts.append(text)
        if not text or self.silent:
            return []
        return [ResponseDelta(session=session_id, t=self.t, response_id=self.q.response_id, text=text)]

    def done(self, session: CoreSession) -> list[Event]:
        """The answer ended: its end, and an alert if it is a proactive one that says something new. A
        video-turn re-ask that says nothing new is suppressed (counted), never published."""
        q, text, sid = self.q, "".join(self.parts), session.id
        out: list[Event] = []
        if self.silent:
            if not _normalized(text) or _normalized(text) == _normalized(session.last_alert_text):
                session.proactive_suppressed += 1
                return out
            out += [self.created(sid), ResponseDelta(session=sid, t=self.t, response_id=q.response_id, text=text)]
        out.append(ResponseDone(session=sid, t=self.t, response_id=q.response_id, text=text, proactive=q.proactive,
                                cancelled=self.cancelled, ttft_ms=self.ttft_ms, event_id=q.event_id))
        if q.proactive and _normalized(text):
            session.last_alert_text = text
            out.append(Alert(session=sid, t=self.t, response_id=q.response_id, text=text,
                             instruction=session.instruction))
        return out


def proactive_question(session: CoreSession, t: float) -> PendingQuestion | None:
    """After a frame at stream time ``t``: whether the standing instruction makes the model speak now.

    ``stream`` layout: when ``respond_probability()`` reaches ``engine.proactive_threshold`` (past the
    cooldown), the model speaks by itself. ``video-turn``: the instruction is asked again every
    ``engine.proactive_every`` seconds of stream time."""
    if not session.instruction or session.pinned_question is not None:  # (stream: not in the cache yet)
        return None
    cfg = session.settings
    sampling = session.sampling.replace(max_new_tokens=cfg.proactive_max_new_tokens)
    rid = f"alert-{session.id}-{t:.3f}"
    if session.stream.config.layout == "stream":
        cooled = session.last_alert_t is None or t - session.last_alert_t >= cfg.proactive_cooldown
        if cooled and session.stream.respond_probability() >= cfg.proactive_threshold:
            session.last_alert_t = t
            return PendingQuestion(rid, None, sampling, proactive=True)
    elif session.last_instruction_t is None or t - session.last_instruction_t >= cfg.proactive_every:
        session.last_instruction_t = t
        return PendingQuestion(rid, session.instruction, sampling, proactive=True)
    return None
