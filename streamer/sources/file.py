"""Video files through PyAV, sampled at a target fps by their presentation timestamps."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from model.video import Frame, read_video_file

from .threaded import iterate_in_thread


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
