"""Training samples: parsing and checking the JSON / JSONL formats (README "Training data").

Two shapes:

* LLaVA-style (what VideoLLaMA3's own data uses): ``{"image": path | [paths]}`` or
  ``{"video": path}`` (or neither: text only) plus ``"conversations": [{"from": "human" | "gpt",
  "value": str}, ...]``; ``<image>`` / ``<video>`` placeholders in the text are dropped (the
  visuals go at the start of the first user turn).
* stream: ``{"video": path, "start_time": s, "end_time": s, "conversation": [{"role": "user" |
  "assistant", "content": str, "time": s}, ...]}``; times are seconds in the video. An optional
  ``"layout"`` (``stream`` | ``video-turn``) picks the token layout of this sample; without it, a
  sample where the assistant speaks without a question is rendered in the ``stream`` layout (the
  only one that can hold it) and the others in the stage config's ``session.layout``.

Paths are relative to the data file. Every problem is a :class:`SampleError` naming the file and line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from model.config import LAYOUTS


class SampleError(ValueError):
    """A training sample that cannot be read, naming its file and line."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where, self.reason = where, message


@dataclass
class Message:
    """One turn of a training conversation."""

    role: str  # user | assistant
    content: str
    time: float | None = None  # stream samples: seconds from the clip start


@dataclass
class Sample:
    """One training sample: its conversation and the images or video it refers to."""

    kind: str  # stream | video | image | text
    messages: list[Message]
    where: str  # file:line
    video: Path | None = None
    images: list[Path] = field(default_factory=list)
    start: float = 0.0
    end: float | None = None
    layout: str | None = None  # the sample's own "layout", if it gives one

    def speaks_by_itself(self) -> bool:
        """Whether the assistant says something with no question before it (a proactive message)."""
        return any(m.role == "assistant" and (i == 0 or self.messages[i - 1].role != "user")
                   for i, m in enumerate(self.messages))


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _path(base: Path, value: object, where: str, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise SampleError(where, f"{what} must be a path string")
    p = Path(value)
    return p if p.is_absolute() else base / p


def _number(obj: dict, key: str, where: str) -> float:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise SampleError(where, f"{key} must be a number of seconds >= 0, got {v!r}")
    return float(v)


def parse_sample(obj: object, base: Path, where: str) -> Sample:
    """One sample from its JSON object; structure only (files are checked by :func:`check_files`)."""
    if not isinstance(obj, dict):
        raise SampleError(where, f"a sample is a JSON object, got {type(obj).__name__}")
    layout = obj.get("layout")
    if layout is not None and layout not in LAYOUTS:
        raise SampleError(where, f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "stream" and "conversation" not in obj:
        raise SampleError(where, 'only stream samples ("conversation" with times) render in the stream layout')
    if "conversation" in obj:
        video = _path(base, obj.get("video"), where, "video")
        start, end = _number(obj, "start_time", where), _number(obj, "end_time", where)
        if end <= start:
            raise SampleError(where, f"end_time {end} must be after start_time {start}")
        msgs = obj["conversation"]
        if not isinstance(msgs, list) or not msgs:
            raise SampleError(where, "conversation must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or \
                    not isinstance(m.get("content"), str) or not m["content"].strip():
                raise SampleError(where, f"conversation[{i}] needs role user|assistant and non-empty content")
            t = _number(m, "time", f"{where} conversation[{i}]")
            if not start <= t <= end:
                raise SampleError(where, f"conversation[{i}] time {t} is outside the clip [{start}, {end}]")
            if out and t < out[-1].time + start:
                raise SampleError(where, f"conversation[{i}] time {t} is before the previous message")
            out.append(Message(m["role"], m["content"], t - start))
        return Sample("stream", out, where, video=video, start=start, end=end, layout=layout)
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise SampleError(where, 'a sample needs "conversations" (LLaVA style) or "conversation" (stream)')
    out = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or m.get("from") not in ROLES or not isinstance(m.get("value"), str):
            raise SampleError(where, f'conversations[{i}] needs "from" (human|gpt) and a string "value"')
        text = m["value"].replace("<image>", "").replace("<video>", "").strip()
        if not text:
            raise SampleError(where, f"conversations[{i}] is empty")
        out.append(Message(ROLES[m["from"]], text))
    if "video" in obj:
        return Sample("video", out, where, video=_path(base, obj["video"], where, "video"))
    if "image" in obj:
        images = obj["image"] if isinstance(obj["image"], list) else [obj["image"]]
        return Sample("image", out, where, images=[_path(base, p, where, "image") for p in images])
    return Sample("text", out, where)


def check_turns(sample: Sample, layout: str) -> None:
    """Questions and answers alternate as the layout can render them."""
    msgs = sample.messages
    for i, m in enumerate(msgs):
        prev = msgs[i - 1].role if i else None
        if m.role == "user" and prev == "user":
            raise SampleError(sample.where, f"message {i}: two questions in a row (answer the first)")
        if m.role == "assistant" and prev != "user" and (sample.kind != "stream" or layout != "stream"):
            raise SampleError(sample.where, f"message {i}: an answer without a question needs a stream sample "
                                            'in the stream layout (this one says "layout": "video-turn")'
                              if sample.kind == "stream" else f"message {i}: an answer without a question")
    if sample.kind != "stream" and msgs[-1].role != "assistant":
        raise SampleError(sample.where, "the conversation must end with an answer")


def check_files(sample: Sample) -> None:
    for p in ([sample.video] if sample.video else []) + sample.images:
        if not p.is_file():
            raise SampleError(sample.where, f"file not found: {p}")


def read_samples(path: str | Path) -> Iterator[Sample | SampleError]:
    """Every sample of a JSON (a list) or JSONL file, or the error that line has."""
    path = Path(path)
    base = path.parent
    if not path.is_file():
        yield SampleError(str(path), "data file not found")
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except ValueError as exc:
            yield SampleError(str(path), f"not valid JSON: {exc}")
            return
        if not isinstance(items, list):
            yield SampleError(str(path), "a .json data file holds a list of samples")
            return
        for i, obj in enumerate(items):
            try:
                yield parse_sample(obj, base, f"{path}[{i}]")
            except SampleError as exc:
                yield exc
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            yield parse_sample(json.loads(line), base, where)
        except ValueError as exc:  # bad JSON or a SampleError
            yield exc if isinstance(exc, SampleError) else SampleError(where, f"not valid JSON: {exc}")
