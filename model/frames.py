"""Frame preprocessing: RGB uint8 ``HxWx3`` -> normalized pixel patches in transformers' order.

Matches ``VideoLlama3VideoProcessor`` for one frame: ``smart_resize`` (factor 28) to a per-frame
pixel budget, bicubic antialiased resize of the uint8 image, fused rescale+normalize, and the
same patchify permutation (merge-block-major), all as whole-tensor torch ops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

from .upstream import smart_resize

log = logging.getLogger(__name__)

PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE
MAX_ASPECT = 200


@dataclass
class PixelFrame:
    """One preprocessed frame."""

    pixel_values: torch.Tensor  # (gh*gw, 3*14*14) float32, normalized, patch order of transformers
    grid_thw: tuple[int, int, int]  # (1, gh, gw) in patches
    size: tuple[int, int]  # resized (height, width) in pixels

    @property
    def num_tokens(self) -> int:
        """LLM tokens of the whole frame (after 2x2 merge)."""
        return self.grid_thw[1] * self.grid_thw[2] // (MERGE * MERGE)

    def token_pixels(self) -> torch.Tensor:
        """Pixels grouped per merged token: (num_tokens, 4*3*14*14)."""
        return self.pixel_values.view(self.num_tokens, -1)


def stock_clip_pixels(processor: object, frames: list[np.ndarray], frame_pixels: int) -> dict:
    """transformers' own ``VideoLlama3VideoProcessor`` on a clip at the same per-frame budget (no
    compression): the stock path that :class:`FramePreprocessor` equals and the benchmark times."""
    out = processor.video_processor(
        videos=[np.stack(frames)], size={"shortest_edge": FACTOR * FACTOR, "longest_edge": frame_pixels * len(frames)},
        use_token_compression=False, do_sample_frames=False, return_tensors="pt")
    return {k: out[k] for k in ("pixel_values_videos", "video_grid_thw", "video_merge_sizes")}


def validate_frame(frame: object) -> np.ndarray:
    """Return ``frame`` as a C-contiguous uint8 HxWx3 array or raise a clear ``ValueError``."""
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"frame must be a numpy uint8 array of shape HxWx3, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must have dtype uint8 (RGB 0-255), got {frame.dtype}")
    if frame.ndim != 3:
        raise ValueError(f"frame must have shape HxWx3, got shape {frame.shape}")
    if frame.shape[2] != 3:
        raise ValueError(f"frame must have 3 channels (RGB), got {frame.shape[2]} in shape {frame.shape}")
    h, w = frame.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"frame is empty: shape {frame.shape}")
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise ValueError(f"frame aspect ratio {max(h, w) / min(h, w):.0f} exceeds {MAX_ASPECT}: shape {frame.shape}")
    return np.ascontiguousarray(frame)


class FramePreprocessor:
    """Turns RGB frames into :class:`PixelFrame` on ``device`` with a fixed per-frame pixel budget."""

    def __init__(self, frame_pixels: int, min_pixels: int = FACTOR * FACTOR, device: torch.device | str = "cpu"):
        self.frame_pixels = frame_pixels
        self.min_pixels = min_pixels
        self.device = torch.device(device)
        # Fused rescale + normalize, as transformers does: (x - 255 mean) / (255 std).
        self.mean = torch.tensor(IMAGENET_STANDARD_MEAN, device=self.device).view(3, 1, 1) * 255.0
        self.std = torch.tensor(IMAGENET_STANDARD_STD, device=self.device).view(3, 1, 1) * 255.0
        self.cpu_fallbacks = 0  # frames the device's resize refused, resized on the CPU

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, factor=FACTOR, min_pixels=self.min_pixels, max_pixels=self.frame_pixels)

    def __call__(self, frame: object) -> PixelFrame:
        rgb = validate_frame(frame)
        rh, rw = self.target_size(*rgb.shape[:2])
        x = torch.from_numpy(rgb).to(self.device, non_blocking=True).permute(2, 0, 1)  # (3, H, W) uint8
        x = self._resize(x, rh, rw)
        x = (x.to(torch.float32) - self.mean) / self.std  # (3, rh, rw)
        gh, gw = rh // PATCH, rw // PATCH
        # (C, gh/m, m, p, gw/m, m, p) -> (gh/m, gw/m, m, m, C, p, p): merge-block-major like transformers
        x = x.view(3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH).permute(1, 4, 2, 5, 0, 3, 6)
        patches = x.reshape(gh * gw, 3 * PATCH * PATCH)
        return PixelFrame(pixel_values=patches, grid_thw=(1, gh, gw), size=(rh, rw))

    def _resize(self, x: torch.Tensor, rh: int, rw: int) -> torch.Tensor:
        """Bicubic antialiased resize on the frame's device. CUDA's antialias kernel refuses very large
        downscales (its filter support is bounded): such a frame is resized on the CPU instead of failing."""
        try:
            return tvF.resize(x, [rh, rw], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        except RuntimeError as exc:
            if x.device.type == "cpu":
                raise
            self.cpu_fallbacks += 1
            if self.cpu_fallbacks == 1:
                log.warning("a %dx%d frame resized on the CPU: %s", x.shape[2], x.shape[1], str(exc).splitlines()[0])
            small = tvF.resize(x.cpu(), [rh, rw], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
            return small.to(x.device)

    def grey_scale(self) -> torch.Tensor:
        """Per-element factor that turns a normalized-pixel difference into grey levels (0-255)."""
        per_channel = self.std.view(3, 1).expand(3, PATCH * PATCH).reshape(-1)  # (3*14*14,)
        return per_channel.repeat(MERGE * MERGE)  # (4*3*14*14,) one merged token
