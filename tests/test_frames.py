import numpy as np
import pytest
import torch

from model.frames import FramePreprocessor, validate_frame
from tests.conftest import clip_pixels


@pytest.mark.parametrize("h, w, budget", [(333, 501, 448 * 336), (480, 640, 448 * 336), (21, 37, 28 * 28 * 4),
                                          (720, 1280, 28 * 28 * 60)])
def test_patches_equal_transformers_video_processor(lm, h, w, budget):
    rng = np.random.default_rng(h * w)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2)]
    prep = FramePreprocessor(frame_pixels=budget)
    ours = [prep(f) for f in frames]
    ref = clip_pixels(lm, frames, budget)
    gt, gh, gw = ref["video_grid_thw"][0].tolist()
    assert gt == 2 and ours[0].grid_thw == (1, gh, gw)
    assert ours[0].size == (gh * 14, gw * 14)
    assert gh * gw * 14 * 14 <= max(budget, 28 * 28 * 4)
    ours_all = torch.cat([p.pixel_values for p in ours])
    assert ours_all.shape == ref["pixel_values_videos"].shape
    assert torch.allclose(ours_all, ref["pixel_values_videos"], atol=1e-6)


@pytest.mark.parametrize("frame, message", [
    (np.zeros((10, 10, 3), np.float32), "uint8"),
    (np.zeros((10, 10), np.uint8), "HxWx3"),
    (np.zeros((10, 10, 4), np.uint8), "3 channels"),
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((1, 500, 3), np.uint8), "aspect ratio"),
    ([[1, 2, 3]], "numpy"),
])
def test_bad_frames_are_rejected(frame, message):
    with pytest.raises(ValueError, match=message):
        validate_frame(frame)


def test_torch_and_noncontiguous_frames_are_accepted():
    f = np.zeros((40, 60, 3), np.uint8)[:, ::-1]
    assert validate_frame(f).flags["C_CONTIGUOUS"]
    assert validate_frame(torch.zeros(40, 60, 3, dtype=torch.uint8)).shape == (40, 60, 3)
