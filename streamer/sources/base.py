"""The frame every source produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Frame:
    """One decoded video frame: presentation time in seconds (from the source) and RGB uint8 HxWx3."""

    pts_seconds: float
    rgb: np.ndarray


class FpsSampler:
    """Keeps frames at most ``fps`` apart by their pts; frames whose pts do not increase are refused."""

    def __init__(self, fps: float):
        self.period = 1.0 / fps
        self._next: float | None = None
        self._last: float | None = None

    def accept(self, pts: float) -> bool:
        if self._last is not None and pts <= self._last:
            return False
        if self._next is not None and pts + 1e-6 < self._next:
            return False
        self._last = pts
        self._next = pts + self.period
        return True
