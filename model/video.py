"""Video frames: the frame type every source produces, the pts sampler, and a file reader (PyAV).

Shared by the live sources (``streamer/``) and the training data (``training/``), so both sample
a video the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np


@dataclass
class Frame:
    """One decoded video frame: presentation time in seconds (from the source) and RGB uint8 HxWx3."""

    pts_seconds: float
    rgb: np.ndarray


class FpsSampler:
    """Keeps frames at most ``fps`` apart by their pts; frames whose pts do not increase are refused."""

    def __init__(self, fps: float, last: float | None = None):
        """``last``: the pts of a frame already taken (a sampler replacing another keeps its clock)."""
        self.period = 1.0 / fps
        self._last: float | None = last
        self._next: float | None = None if last is None else last + self.period

    @property
    def last(self) -> float | None:
        """The pts of the last frame taken (None before the first)."""
        return self._last

    def accept(self, pts: float) -> bool:
        if self._last is not None and pts <= self._last:
            return False
        if self._next is not None and pts + 1e-6 < self._next:
            return False
        self._last = pts
        self._next = pts + self.period
        return True


def read_video_file(path: str | Path, fps: float = 1.0, max_seconds: float | None = None) -> Iterator[Frame]:
    """Decode ``path`` and yield frames ``1/fps`` seconds apart by pts (relative to the first frame).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one PyAV cannot read or
    that has no video stream.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise ValueError(f"cannot read video file {path}: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = None
        sampler = FpsSampler(fps)
        try:
            for frame in container.decode(stream):
                if frame.pts is None or frame.time_base is None:
                    continue
                pts = float(frame.pts * frame.time_base)
                if start is None:
                    start = pts
                t = pts - start
                if max_seconds is not None and t > max_seconds:
                    break
                if not sampler.accept(t):  # also drops repeated or backwards pts
                    continue
                yield Frame(pts_seconds=t, rgb=frame.to_ndarray(format="rgb24"))
        except av.FFmpegError as exc:
            raise ValueError(f"error while decoding {path}: {exc}") from exc


def write_video_file(path: str | Path, frames: Iterable[np.ndarray], fps: int) -> Path:
    """Encode RGB uint8 frames (all of one size) as H.264 at ``fps``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = None
        for rgb in frames:
            if stream is None:
                stream = out.add_stream("libx264", rate=fps)
                stream.height, stream.width = rgb.shape[:2]
                stream.pix_fmt = "yuv420p"
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                out.mux(packet)
    return path
