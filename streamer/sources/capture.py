"""Live sources through PyAV: RTSP cameras and local capture devices.

Frames are pre-sampled by pts at the target fps before they are converted to RGB (so a 30 fps
camera costs one conversion per kept frame). When the connection drops, the reader reconnects
with exponential backoff capped at ``MAX_BACKOFF`` (a camera that comes back is polled again
within 2 s); stream time stays monotonic across reconnects: the first frame after a
reconnect continues from the last frame's time plus the wall time the camera was away.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import av

from .base import FpsSampler, Frame
from .threaded import iterate_in_thread

log = logging.getLogger(__name__)

RTSP_OPTIONS = {"rtsp_transport": "tcp", "timeout": "5000000", "fflags": "nobuffer", "flags": "low_delay"}


@dataclass
class ReaderStats:
    """What a capture reader did: opens, reopens and failures (a camera that comes and goes)."""

    connects: int = 0  # successful opens
    reconnects: int = 0  # opens after the first
    failures: int = 0  # failed opens and broken streams


def _decode_sampled(container, fps: float, t0: float, stop: Callable[[], bool]) -> Iterator[tuple[float, av.VideoFrame]]:
    """(stream time, frame) pairs at most 1/fps apart, with time starting at ``t0``."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    first = None
    sampler = FpsSampler(fps)
    for frame in container.decode(stream):
        if stop():
            return
        if frame.pts is None or frame.time_base is None:
            continue
        pts = float(frame.pts * frame.time_base)
        if first is None:
            first = pts
        t = t0 + (pts - first)
        if sampler.accept(t):
            yield t, frame


MAX_BACKOFF = 2.0  # seconds between tries at most: longer, and a camera that is back stays dark for that long


def _sleep(seconds: float, stop: Callable[[], bool]) -> None:
    """Sleep, waking early (within 0.1 s) once ``stop()`` is true."""
    end = time.monotonic() + seconds
    while not stop() and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))


def live_frames(open_container: Callable[[], object], fps: float, reconnect: bool = True,
                max_backoff: float = MAX_BACKOFF, stats: ReaderStats | None = None,
                stop: Callable[[], bool] = lambda: False,
                on_failure: Callable[[str], None] | None = None, max_failures: int | None = None,
                name: str = "video source") -> Iterator[Frame]:
    """Frames from ``open_container()`` (a PyAV container), reopened with backoff when it fails.

    ``on_failure(message)`` is told of each failed open or broken stream (from this thread). With
    ``max_failures``, that many failed opens in a row end it with a ValueError (a local device that
    is not there); without, it retries until stopped (a network camera that comes back)."""
    stats = stats or ReaderStats()
    backoff = 0.25
    failed_opens = 0
    last_t: float | None = None
    last_wall = 0.0
    while not stop():
        try:
            container = open_container()
        except (av.FFmpegError, OSError) as exc:
            stats.failures += 1
            failed_opens += 1
            if not reconnect:
                raise ValueError(f"cannot open {name}: {exc}") from exc
            if max_failures is not None and failed_opens >= max_failures:
                raise ValueError(f"cannot open {name} ({exc}); gave up after {failed_opens} tries") from exc
            log.warning("video source unavailable (%s); retrying in %.2f s", exc, backoff)
            if on_failure is not None:
                on_failure(f"video source unavailable ({exc}); retrying in {backoff:.2f} s")
            _sleep(backoff, stop)
            backoff = min(backoff * 2, max_backoff)
            continue
        stats.connects += 1
        stats.reconnects += stats.connects > 1
        backoff = 0.25
        failed_opens = 0
        t0 = 0.0 if last_t is None else last_t + max(time.monotonic() - last_wall, 1e-3)
        try:
            with container:
                if not container.streams.video:
                    raise ValueError("the source has no video stream")
                for t, frame in _decode_sampled(container, fps, t0, stop):
                    last_t, last_wall = t, time.monotonic()
                    yield Frame(t, frame.to_ndarray(format="rgb24"))
        except (av.FFmpegError, OSError) as exc:
            stats.failures += 1
            log.warning("video source broke off (%s)", exc)
            if on_failure is not None:
                on_failure(f"video source broke off ({exc}); reconnecting")
        if not reconnect:
            return
        _sleep(backoff, stop)


def rtsp_source(url: str, fps: float = 1.0, options: dict | None = None, reconnect: bool = True,
                stats: ReaderStats | None = None,
                on_failure: Callable[[str], None] | None = None) -> AsyncIterator[Frame]:
    """An RTSP camera (TCP, low delay by default), reconnecting when it disappears."""
    if not url.startswith(("rtsp://", "rtsps://")):
        raise ValueError(f"not an RTSP URL: {url!r}")
    opts = {**RTSP_OPTIONS, **(options or {})}

    def make(stopped) -> Iterator[Frame]:
        return live_frames(lambda: av.open(url, options=opts, timeout=(5.0, 5.0)), fps, reconnect, stats=stats,
                           stop=stopped, on_failure=on_failure, name="the RTSP camera")

    return iterate_in_thread(make, name="rtsp")


def camera_format() -> str:
    """PyAV's capture format for this platform."""
    if sys.platform.startswith("linux"):
        return "v4l2"
    if sys.platform == "darwin":
        return "avfoundation"
    if sys.platform.startswith("win"):
        return "dshow"
    raise ValueError(f"no known camera capture format on {sys.platform}")


CAMERA_TRIES = 4  # failed opens in a row (about 2 s with the backoff) before a local camera is given up


def camera_source(device: str, fps: float = 1.0, width: int | None = None, height: int | None = None,
                  stats: ReaderStats | None = None, fmt: str | None = None,
                  max_failures: int = CAMERA_TRIES) -> AsyncIterator[Frame]:
    """A local camera: ``/dev/video0`` (Linux), ``0`` (macOS), ``video=NAME`` (Windows).

    ``fmt`` overrides the platform's capture format (e.g. ``lavfi`` for FFmpeg's test sources). A
    device that cannot be opened ``max_failures`` times in a row (absent, busy, unplugged) ends the
    source with a ValueError that says what to check.
    """
    fmt = fmt or camera_format()
    opts = {"video_size": f"{width}x{height}"} if width and height else {}

    def make(stopped) -> Iterator[Frame]:
        frames = live_frames(lambda: av.open(device, format=fmt, options=opts), fps, reconnect=True, stats=stats,
                             stop=stopped, max_failures=max_failures, name=f"camera {device!r} ({fmt})")
        try:
            yield from frames
        except ValueError as exc:
            hint = " (ls /dev/video* lists the cameras there are)" if fmt == "v4l2" else ""
            raise ValueError(f"{exc}: is it connected and not in use by another program?{hint} "
                             "--camera-format picks another capture format") from None

    return iterate_in_thread(make, name="camera")
