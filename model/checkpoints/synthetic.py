"""A synthetic camera for benchmarks: a textured static scene, sensor noise, and a visitor.

No files or downloads: the scene is procedural (smooth colour fields and shapes), each frame adds
Gaussian sensor noise, and every ``visit_every`` seconds a coloured object crosses the view, so
DiffFP has both noise to prune and real change to keep.
"""

from __future__ import annotations

import numpy as np


class SyntheticCamera:
    """A deterministic moving scene with sensor noise: frames for tests and benchmarks without a camera."""

    def __init__(self, height: int = 336, width: int = 448, seed: int = 0, noise_sigma: float = 2.0,
                 visit_every: float = 20.0, visit_seconds: float = 6.0):
        rng = np.random.default_rng(seed)
        self.height, self.width = height, width
        self.noise_sigma = noise_sigma
        self.visit_every, self.visit_seconds = visit_every, visit_seconds
        self._rng = np.random.default_rng(seed + 1)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        scene = np.zeros((height, width, 3), np.float32)
        for c in range(3):  # smooth colour fields
            for _ in range(4):
                fy, fx, ph = rng.uniform(0.002, 0.03), rng.uniform(0.002, 0.03), rng.uniform(0, 6.28)
                scene[..., c] += 30 * np.sin(fy * yy + fx * xx + ph)
        scene += 110
        for _ in range(12):  # furniture: flat rectangles with edges
            y0, x0 = rng.integers(0, height - 20), rng.integers(0, width - 20)
            h, w = rng.integers(10, height // 3), rng.integers(10, width // 3)
            scene[y0:y0 + h, x0:x0 + w] = rng.uniform(20, 235, size=3)
        self.scene = scene
        self.visitor_color = np.array([220.0, 40.0, 40.0], np.float32)

    def frame(self, t: float) -> np.ndarray:
        """The RGB uint8 frame at stream time ``t`` seconds."""
        img = self.scene.copy()
        phase = t % self.visit_every
        if phase < self.visit_seconds:
            size = self.height // 4
            x = int((phase / self.visit_seconds) * (self.width + size)) - size
            y = self.height // 2 - size // 2
            img[y:y + size, max(x, 0):max(x + size, 0)] = self.visitor_color
        img += self._rng.normal(0.0, self.noise_sigma, size=img.shape).astype(np.float32)
        return np.clip(img, 0, 255).astype(np.uint8)
