"""Token layouts of a live session, shared by :class:`model.StreamSession` and ``training/``.

The renderer is a small state machine fed with events (frame, question, answer end); each
event returns the text around it, where a frame's visual tokens go between ``before`` and
``after``. Rendering a recorded conversation event by event gives exactly the sequence the live
session builds, so what the model is trained on is what it sees live.

``video-turn``::

    {system}<|im_start|>user\\nTime 0.0s:<frame>,Time 1.0s:<frame>\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n<|im_start|>user\\nTime 2.0s:<frame>...

``stream``::

    {system}<|stream_start|>stream\\nTime 0.0s:<frame>\\n<|stream_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n

(``stream_timestamps`` off drops ``Time 0.0s:``: what the released checkpoints were trained on.)
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import NamedTuple

log = logging.getLogger(__name__)

STREAM_START = "<|stream_start|>"
STREAM_END = "<|stream_end|>"
_Q = "\u2402QUESTION\u2402"  # sentinel, cannot occur in a template


@dataclass(frozen=True)
class ChatPieces:
    """The ChatML pieces a checkpoint's chat template produces around a video and a question."""

    system_prefix: str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    user_open: str = "<|im_start|>user\n"
    video_suffix: str = "\n"
    turn_close: str = "<|im_end|>\n"
    assistant_open: str = "<|im_start|>assistant\n"

    @classmethod
    def from_processor(cls, processor: object, system_prompt: str | None = None) -> ChatPieces:
        """Derive the pieces by rendering the processor's own chat template around a sentinel."""
        base = cls()
        template = getattr(processor, "chat_template", None)
        pieces = base
        if template:
            video_token = getattr(processor, "video_token", "<|video_pad|>")
            try:
                text = processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": _Q}]}],
                    tokenize=False, add_generation_prompt=True,
                )
            except Exception as exc:  # a template we cannot probe: fall back to plain ChatML
                log.warning("could not render the chat template (%s); using ChatML defaults", exc)
                text = ""
            if isinstance(text, list):
                text = text[0]
            head, sep, tail = text.partition(video_token)
            suffix, sep2, close = tail.partition(_Q)
            if sep and sep2 and head.endswith(base.user_open) and close.endswith(base.assistant_open):
                pieces = replace(base, system_prefix=head[: -len(base.user_open)], video_suffix=suffix,
                                 turn_close=close[: -len(base.assistant_open)] or base.turn_close)
        if system_prompt is not None:
            pieces = replace(pieces, system_prefix=f"<|im_start|>system\n{system_prompt}<|im_end|>\n")
        return pieces


@dataclass
class _State:
    in_user_turn: bool = False  # video-turn: a user turn is open and holds frames
    frames_in_turn: int = 0
    started: bool = False


def timestamp(t: float) -> str:
    return f"Time {t:.1f}s:"


class FrameText(NamedTuple):
    """The text around one frame's visual tokens, split where the KV budget may cut.

    ``lead`` opens the conversation or a user turn (it belongs to the turn, not to the frame),
    ``sep`` joins the frame to the previous frame of the same turn, ``stamp`` is the frame's own
    timestamp text, and ``after`` follows its visual tokens.
    """

    lead: str
    sep: str
    stamp: str
    after: str

    @property
    def before(self) -> str:
        return self.lead + self.sep + self.stamp


class LayoutRenderer:
    """Renders session events to text for one of the two layouts."""

    def __init__(self, layout: str, pieces: ChatPieces, stream_timestamps: bool = True):
        """``stream_timestamps`` (stream layout): a frame's time before it; without, the official
        training code's ``<|stream_start|>stream\\n<frame>\\n<|stream_end|>\\n``."""
        if layout not in ("video-turn", "stream"):
            raise ValueError(f"unknown layout {layout!r}")
        self.layout = layout
        self.pieces = pieces
        self.stream_timestamps = stream_timestamps
        self.state = _State()

    def snapshot(self) -> _State:
        return copy.copy(self.state)

    def restore(self, state: _State) -> None:
        self.state = copy.copy(state)

    def start(self) -> str:
        """The conversation's opening text (system prompt) the first time; "" afterwards."""
        if self.state.started:
            return ""
        self.state.started = True
        return self.pieces.system_prefix

    def frame_text(self, t: float) -> FrameText:
        """The text around one frame's visual tokens, in parts."""
        head = self.start()
        if self.layout == "stream":
            stamp = timestamp(t) if self.stream_timestamps else ""
            return FrameText(head, "", f"{STREAM_START}stream\n{stamp}", f"\n{STREAM_END}\n")
        s = self.state
        if s.in_user_turn:
            s.frames_in_turn += 1
            return FrameText(head, ",", timestamp(t), "")
        s.in_user_turn, s.frames_in_turn = True, 1
        return FrameText(head + self.pieces.user_open, "", timestamp(t), "")

    def frame(self, t: float) -> tuple[str, str]:
        """Text before and after one frame's visual tokens."""
        ft = self.frame_text(t)
        return ft.before, ft.after

    def question(self, text: str) -> str:
        """Text of a user question up to and including the assistant turn opening."""
        head = self.start()
        p = self.pieces
        if self.layout == "video-turn" and self.state.in_user_turn:
            body = p.video_suffix + text
        else:
            body = p.user_open + text
        self.state.in_user_turn, self.state.frames_in_turn = False, 0
        return head + body + p.turn_close + p.assistant_open

    def assistant_open(self) -> str:
        """Text that opens an assistant turn the model starts by itself (stream layout)."""
        self.state.in_user_turn, self.state.frames_in_turn = False, 0
        return self.start() + self.pieces.assistant_open

    def answer_close(self) -> str:
        """Text that closes an assistant answer (its end-of-turn token and newline)."""
        return self.pieces.turn_close
