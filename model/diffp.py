"""DiffFP: prune merged tokens whose pixels did not change enough.

Two references:

* ``previous`` -- the paper and transformers' ``_get_compression_mask``: mean |diff| of the
  normalized pixels vs the previous frame, x 255, kept if > threshold (0.1); ties to the first
  ``min_tokens`` positions when too few survive.
* ``last_kept`` -- the live default: each token is compared with the last version of that token
  that was *kept*, in grey levels of the 0-255 image. Sensor noise never accumulates past the
  threshold, while slow drift does and is eventually sent. When too few survive, the most changed
  tokens are kept.

The first frame (and any frame whose grid differs from the last one) is kept whole.
"""

from __future__ import annotations

import torch

from .frames import PixelFrame


class DiffPruner:
    """Stateful per-stream DiffFP; :meth:`__call__` returns the keep mask of one frame."""

    def __init__(self, reference: str, threshold: float, min_tokens: int = 1,
                 grey_scale: torch.Tensor | None = None):
        if reference not in ("previous", "last_kept"):
            raise ValueError(f"unknown DiffFP reference {reference!r}")
        if reference == "last_kept" and grey_scale is None:
            raise ValueError("last_kept DiffFP needs the per-element grey-level scale")
        self.reference = reference
        self.threshold = float(threshold)
        self.min_tokens = int(min_tokens)
        self.grey_scale = grey_scale
        self._weights: torch.Tensor | None = None  # grey_scale / D, on the frames' device
        self._ref: torch.Tensor | None = None  # (tokens, D) normalized pixels
        self._grid: tuple[int, int, int] | None = None

    def reset(self) -> None:
        self._ref = None
        self._grid = None

    def scores(self, frame: PixelFrame) -> torch.Tensor | None:
        """Per-token difference vs the reference (None when the frame must be kept whole)."""
        if self._ref is None or self._grid != frame.grid_thw:
            return None
        diff = torch.sub(frame.token_pixels(), self._ref).abs_()  # (tokens, D)
        if self.reference == "previous":
            return diff.mean(dim=-1) * 255
        if self._weights is None or self._weights.device != diff.device:  # the mean of diff x scale: one matvec
            self._weights = (self.grey_scale / self.grey_scale.numel()).to(diff.device, diff.dtype)
        return diff @ self._weights

    def mask(self, frame: PixelFrame) -> torch.Tensor:
        """Keep mask for ``frame`` without changing state."""
        score = self.scores(frame)
        if score is None:
            return torch.ones(frame.num_tokens, dtype=torch.bool, device=frame.pixel_values.device)
        keep = score > self.threshold
        need = min(self.min_tokens, frame.num_tokens)
        if int(keep.sum()) < need:
            if self.reference == "previous":
                keep[:need] = True  # transformers' rule
            else:
                keep[score.topk(need).indices] = True
        return keep

    def commit(self, frame: PixelFrame, keep: torch.Tensor) -> None:
        """Record ``frame`` as seen with ``keep`` as its kept tokens."""
        tokens = frame.token_pixels()
        if self.reference == "previous":
            self._ref = tokens  # a frame's pixels are never written after preprocessing
        elif self._ref is None or self._grid != frame.grid_thw:
            self._ref = tokens.clone()  # updated in place below
        else:
            self._ref[keep] = tokens[keep]
        self._grid = frame.grid_thw

    def __call__(self, frame: PixelFrame) -> torch.Tensor:
        keep = self.mask(frame)
        self.commit(frame, keep)
        return keep
