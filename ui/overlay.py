"""The DiffFP overlay: which patches of the last frame went into the cache."""

from __future__ import annotations

import numpy as np


def keep_overlay(rgb: np.ndarray, keep: np.ndarray, dim: float = 0.3) -> np.ndarray:
    """``rgb`` with the patches DiffFP dropped dimmed and the kept ones outlined in green.

    ``keep`` is the (rows, cols) mask of merged tokens; each covers an equal share of the frame.
    """
    h, w = rgb.shape[:2]
    rows, cols = keep.shape
    ys = np.minimum(np.arange(h) * rows // h, rows - 1)
    xs = np.minimum(np.arange(w) * cols // w, cols - 1)
    mask = keep[ys][:, xs]  # (h, w): nearest patch
    out = rgb.astype(np.float32)
    out[~mask] *= dim
    edge = np.zeros_like(mask)
    edge[1:, :] |= ys[1:, None] != ys[:-1, None]
    edge[:, 1:] |= xs[None, 1:] != xs[None, :-1]
    out[edge & mask] = (0, 220, 0)
    return out.astype(np.uint8)
