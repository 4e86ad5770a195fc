"""``vl3live data stream-from-captions``: a video plus timestamped captions / QA -> stream samples.

Captions (dense-caption JSON) are either ActivityNet style ``{"timestamps": [[s, e], ...],
"sentences": [...]}`` or a list of ``{"start": s, "end": e, "caption": str}``; optional QA is a
list of ``{"time": s, "question": str, "answer": str}`` under ``"qa"``. The video is cut into
clips of ``clip_seconds`` (paper: 2 minutes). In each clip a caption becomes what the assistant
says by itself when its event ends (stream layout: it learns when to speak), and a QA pair a
user question answered at its time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import av


def video_seconds(path: Path) -> float:
    with av.open(str(path)) as c:
        if not c.streams.video:
            raise ValueError(f"{path} has no video stream")
        s = c.streams.video[0]
        if s.duration is not None and s.time_base is not None:
            return float(s.duration * s.time_base)
        if c.duration is not None:
            return c.duration / 1e6
    raise ValueError(f"cannot tell how long {path} is")


def _events(captions: object) -> tuple[list[tuple[float, str]], list[tuple[float, str, str]]]:
    said, qa = [], []
    if isinstance(captions, dict) and "timestamps" in captions:
        for (_, end), text in zip(captions["timestamps"], captions["sentences"]):
            said.append((float(end), str(text).strip()))
    else:
        items = captions.get("captions", []) if isinstance(captions, dict) else captions
        for c in items:
            said.append((float(c["end"]), str(c["caption"]).strip()))
    for q in captions.get("qa", []) if isinstance(captions, dict) else []:
        qa.append((float(q["time"]), str(q["question"]).strip(), str(q["answer"]).strip()))
    return sorted(s for s in said if s[1]), sorted(qa)


def stream_from_captions(video: str | Path, captions: str | Path, clip_seconds: float = 120.0,
                         relative_to: str | Path | None = None) -> list[dict]:
    """Stream samples (dicts) for one video; paths relative to ``relative_to`` (the output's folder)."""
    video, captions = Path(video), Path(captions)
    duration = video_seconds(video)
    said, qa = _events(json.loads(captions.read_text()))
    name = os.path.relpath(video.resolve(), Path(relative_to).resolve()) if relative_to else str(video)
    samples, start = [], 0.0
    while start < duration:
        end = min(start + clip_seconds, duration)
        conv = [(t, 0, {"role": "assistant", "content": text, "time": round(t, 3)})
                for t, text in said if start <= t <= end]
        for t, q, a in qa:
            if start <= t <= end:
                conv += [(t, 1, {"role": "user", "content": q, "time": round(t, 3)}),
                         (t, 2, {"role": "assistant", "content": a, "time": round(t, 3)})]
        if conv:
            samples.append({"video": name, "start_time": round(start, 3), "end_time": round(end, 3),
                            "conversation": [m for _, _, m in sorted(conv, key=lambda e: (e[0], e[1]))]})
        start = end
    return samples
