"""Video files through PyAV, sampled at a target fps by their presentation timestamps."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import av

from .base import FpsSampler, Frame
from .threaded import iterate_in_thread


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


def _paced(frames: Iterator[Frame]) -> Iterator[Frame]:
    """Release each frame when its pts is due on the wall clock (a file played like a camera)."""
    start = None
    for f in frames:
        if start is None:
            start = time.monotonic() - f.pts_seconds
        delay = start + f.pts_seconds - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield f


def file_source(path: str | Path, fps: float = 1.0, realtime: bool = True,
                max_seconds: float | None = None) -> AsyncIterator[Frame]:
    """A video file as an async source: paced by pts when ``realtime``, else as fast as it decodes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")

    def make(stopped) -> Iterator[Frame]:
        frames = read_video_file(path, fps=fps, max_seconds=max_seconds)
        return _paced(frames) if realtime else frames

    return iterate_in_thread(make, name=f"file:{path.name}")
