"""Stream time, in the two places it is made up: the one place these rules live.

- A frame that carries no pts (a webcam in the demo, a websocket client that sends none) is stamped
  with its arrival time (:class:`ArrivalClock`).
- A source attached to a session that already ran (a file or camera starting at pts 0) is shifted
  so its first frame comes one sampling period after the session's newest (:func:`continued`).

Either way a session's clock only goes forward, whichever source fed it last.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from .sources import FpsSampler, Frame


class ArrivalClock:
    """Seconds since the session opened, continued past the session's newest frame when another source
    (a file, an RTSP camera with its own pts) ran the clock ahead meanwhile."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def now(self, newest: float | None, period: float) -> float:
        """The stream time of a frame arriving now, given the session's newest frame and sampling period."""
        t = time.monotonic() - self.t0
        if newest is not None and t <= newest:
            self.t0 -= newest + period - t
            t = newest + period
        return t


async def continued(source: AsyncIterator[Frame], sampler: FpsSampler) -> AsyncIterator[Frame]:
    """``source`` with its pts shifted to start one sampling period after ``sampler``'s newest frame."""
    offset = None
    try:
        async for f in source:
            if offset is None:
                last = sampler.last
                offset = 0.0 if last is None else last + sampler.period - f.pts_seconds
            yield Frame(f.pts_seconds + offset, f.rgb)
    finally:
        close = getattr(source, "aclose", None)
        if close is not None:
            await close()
