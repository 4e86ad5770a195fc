"""The frame every source produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Frame:
    """One decoded video frame: presentation time in seconds (from the source) and RGB uint8 HxWx3."""

    pts_seconds: float
    rgb: np.ndarray
