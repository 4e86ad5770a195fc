import numpy as np
import pytest
import torch

from model.config import DIFFP_LAST_KEPT_THRESHOLD
from model.diffp import DiffPruner
from model.frames import FramePreprocessor
from tests.conftest import clip_pixels, scene_frames


@pytest.mark.parametrize("h, w, n", [(333, 501, 6), (120, 200, 5)])
def test_previous_mode_equals_transformers_compression_mask(lm, h, w, n):
    frames = scene_frames(n, h, w)
    frames[3] = frames[2].copy()  # an unchanged frame: transformers keeps its first token only
    budget = 28 * 28 * 40
    ref = clip_pixels(lm, frames, budget)
    expected = lm.processor.video_processor._get_compression_mask(
        ref["pixel_values_videos"], ref["video_grid_thw"], ref["video_merge_sizes"])
    prep = FramePreprocessor(frame_pixels=budget)
    pruner = DiffPruner("previous", 0.1, 1)
    ours = torch.cat([pruner(prep(f)) for f in frames])
    assert torch.equal(ours, expected)
    per_frame = ours.view(n, -1).sum(1)
    assert per_frame[0] == ours.numel() // n and per_frame[3] == 1 and 1 < per_frame[1] < per_frame[0]


def _pruner(threshold: float = DIFFP_LAST_KEPT_THRESHOLD) -> tuple[FramePreprocessor, DiffPruner]:
    prep = FramePreprocessor(frame_pixels=28 * 28 * 16)
    return prep, DiffPruner("last_kept", threshold, 1, grey_scale=prep.grey_scale())


def test_last_kept_prunes_noise_but_sends_slow_drift():
    prep, pruner = _pruner(threshold=6.0)
    rng = np.random.default_rng(0)
    scene = rng.integers(40, 200, (112, 112, 3)).astype(np.float32)
    kept_noise, kept_drift = [], []
    sent = torch.zeros(4, 2, dtype=torch.bool)
    for i in range(12):  # +1 grey level per frame in the left half, noise everywhere
        img = scene + rng.normal(0, 2, scene.shape)
        img[:, :56] += i
        keep = pruner(prep(np.clip(img, 0, 255).astype(np.uint8))).view(4, 4)
        if i:
            kept_noise.append(int(keep[:, 2:].sum()))
            kept_drift.append(int(keep[:, :2].sum()))
            sent |= keep[:, :2]
    assert sum(kept_noise) == 0  # noise never accumulates; the min-token floor goes to the drift
    # drift of 1 grey/frame crosses 6 grey levels after ~6 frames: then the whole drifting half is re-sent
    assert kept_drift[:4] == [1] * 4
    assert bool(sent.all()) and max(kept_drift) >= 2  # threshold crossings, not only the floor


def test_previous_mode_never_sends_slow_drift():
    prep = FramePreprocessor(frame_pixels=28 * 28 * 16)
    pruner = DiffPruner("previous", 3.0 / 0.226, 1)  # about 3 grey levels per step in previous mode
    scene = np.full((112, 112, 3), 100, np.uint8)
    sent = 0
    for i in range(12):
        keep = pruner(prep(scene + np.uint8(i)))
        sent += int(keep.sum()) if i else 0
    assert sent == 11  # only the min-token floor: 1 grey/frame never exceeds the per-step threshold


def test_min_tokens_keeps_the_most_changed_token_in_last_kept_mode():
    prep, pruner = _pruner(threshold=50.0)
    a = np.full((112, 112, 3), 100, np.uint8)
    b = a.copy()
    b[84:, 84:] = 120  # bottom-right token changes by 20 grey levels (< threshold)
    pruner(prep(a))
    keep = pruner(prep(b)).view(4, 4)
    assert keep.sum() == 1 and keep[3, 3]


def test_grid_change_resets_to_whole_frame():
    prep, pruner = _pruner()
    pruner(prep(np.zeros((112, 112, 3), np.uint8)))
    keep = pruner(prep(np.zeros((56, 224, 3), np.uint8)))
    assert bool(keep.all())


def test_default_threshold_on_real_noisy_static_footage():
    """The measurement behind the default (README, `python -m tests.footage`), shortened."""
    from tests.footage import change_recall, film, kept_fraction, photograph

    scene = photograph()
    static, _ = film(scene, 8, noise=2.0, gop_seconds=1.0)
    assert kept_fraction(static, "previous", 0.1) > 0.95  # the paper threshold keeps nearly everything
    assert kept_fraction(static, "last_kept", DIFFP_LAST_KEPT_THRESHOLD) < 0.02
    moving, clean = film(scene, 8, noise=2.0, gop_seconds=1.0, walker=True, seed=1)
    assert change_recall(moving, clean, DIFFP_LAST_KEPT_THRESHOLD) > 0.97
