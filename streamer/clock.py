"""Stream time, in the two places it is made up: the one place these rules live.

- A frame that carries no pts (a webcam in the demo, a websocket client that sends none) is stamped
  with its arrival time (:class:`ArrivalClock`).
- A source attached to a session that already ran (a file or camera starting at pts 0) is shifted
  so its first frame comes one sampling period after the session's newest (:func:`continued_offset`).

Either way a session's clock only goes forward, whichever source fed it last.
"""

from __future__ import annotations

import time


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


def continued_offset(newest: float | None, period: float, first_pts: float) -> float:
    """What to add to a new source's pts so its first frame comes one sampling period after the session's
    newest frame (``newest``; None: the session has none, nothing to add)."""
    return 0.0 if newest is None else newest + period - first_pts
