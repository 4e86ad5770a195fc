"""What only a GPU can show about the step's paths, each with the gpu marker (skipped without CUDA):
preprocessing on the device equals the CPU path within one grey level, and a downscale that CUDA's
antialias kernel refuses is resized on the CPU instead of failing the frame."""

import numpy as np
import pytest
import torch

from model.frames import FramePreprocessor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _grey_levels(a, b, pre: FramePreprocessor) -> float:
    """The largest difference between two preprocessed frames, in grey levels of the 0-255 image."""
    return float(((a.pixel_values.cpu() - b.pixel_values.cpu()).abs() * pre.grey_scale().cpu()).max())


@pytest.mark.parametrize("size", [(336, 448), (1080, 1920), (2160, 3840)])
def test_device_preprocessing_equals_the_cpu_path_within_one_grey_level(size):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    cpu, gpu = FramePreprocessor(448 * 336), FramePreprocessor(448 * 336, device="cuda")
    a, b = cpu(frame), gpu(frame)
    assert a.grid_thw == b.grid_thw
    assert _grey_levels(a, b, cpu) <= 1.0


def test_a_downscale_the_cuda_kernel_refuses_falls_back_to_the_cpu():
    frame = np.random.default_rng(1).integers(0, 256, (4320, 7680, 3), dtype=np.uint8)  # 8K to 28x56
    gpu = FramePreprocessor(28 * 56, device="cuda")
    out = gpu(frame)  # never raises: CUDA or, past its kernel's limit, the CPU
    ref = FramePreprocessor(28 * 56)(frame)
    assert out.pixel_values.device.type == "cuda" and _grey_levels(out, ref, gpu) <= 1.0
