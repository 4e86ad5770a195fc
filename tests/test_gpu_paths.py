"""The step's GPU paths. What only a GPU can show carries the gpu marker (skipped without CUDA): the
paged attention (one flash varlen call per layer over the pool's pages) equals per-session SDPA;
preprocessing on the device equals the CPU path within one grey level, and a downscale that CUDA's
antialias kernel refuses is resized on the CPU instead of failing the frame. Its layout and refusals
are checked on CPU."""

import numpy as np
import pytest
import torch

from model.attention import PagedPlan
from model.executor import Executor, Forward
from model.frames import FramePreprocessor
from model.kvpool import KVPool

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_paged_layout_lists_each_sessions_pages_and_lengths():
    n, lo, base = torch.tensor([1, 30, 5]), torch.tensor([40, 0, 600]), torch.tensor([0, 512, 1024])
    plan = PagedPlan.build(n, lo, base, max_q=30, max_k=605, page=256)
    assert plan.cu_q.tolist() == [0, 1, 31, 36] and plan.lengths.tolist() == [41, 30, 605]
    assert plan.cu_k.tolist() == [0, 41, 71, 676] and plan.table.dtype == torch.int32
    assert plan.table.tolist() == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]  # 3 pages cover the longest (605 keys)
    # a short session in the pool's last page: its unread entries stay inside the pool
    last = PagedPlan.build(torch.tensor([1, 1]), torch.tensor([600, 40]), torch.tensor([0, 1536]), max_q=1,
                           max_k=601, page=256, pool_pages=7)
    assert last.table.tolist() == [[0, 1, 2], [6, 6, 6]] and last.lengths.tolist() == [601, 41]


def test_paged_attention_is_refused_where_it_cannot_run(lm):
    from streamer.config import EngineConfig
    from vl3live.bench import BenchConfig

    with pytest.raises(ValueError, match="engine.attention must be flex, paged, segments, masked, varlen or null"):
        EngineConfig(attention="fast")
    with pytest.raises(ValueError, match="--against must be"):
        BenchConfig(sessions=2, against="fast")
    with pytest.raises(ValueError, match="CUDA, float16 or bfloat16"):
        Executor(lm, attention="paged")  # the tiny model on CPU in fp32
    with pytest.raises(ValueError, match="runs on CPU"):
        Executor(type("LM", (), {"model": lm.model, "attn": "sdpa", "device": torch.device("cuda"),
                                 "dtype": torch.bfloat16})(), attention="flex")


@pytest.mark.gpu
@needs_cuda
def test_paged_attention_equals_per_session_sdpa_on_a_gpu():
    from model import attention as attention_fns
    from model import load_model

    lm = load_model("tiny", device="cuda", dtype="bfloat16")
    layers = lm.model.config.text_config.num_hidden_layers
    results = []
    for mode in ("segments", "paged"):
        ex = Executor(lm, attention=mode)
        pool = KVPool(lm.model.config.text_config, 4096, "cuda", torch.bfloat16, page_size=256)

        def rows(ids):
            return lambda _: lm.model.get_input_embeddings()(torch.tensor(ids, device="cuda"))
        seqs = [pool.open(512) for _ in range(3)]
        history = [list(range(100, 100 + k)) for k in (40, 7, 300)]
        ex.run([Forward(q, len(h), rows(h)) for q, h in zip(seqs, history)])
        before = attention_fns.calls["paged"]
        step = [Forward(seqs[0], 1, rows([17])), Forward(seqs[1], 30, rows(list(range(200, 230))), chunk=12),
                Forward(seqs[2], 5, rows([5, 6, 7, 8, 9]))]
        ex.run(step)
        step[1].chunk = None
        ex.run([step[1]])
        if mode == "paged":
            assert attention_fns.calls["paged"] - before == 2 * layers
        assert all(it.error is None for it in step), [it.error for it in step]
        results.append([it.out_logits.float() for it in step])
    for got, want in zip(results[1], results[0]):
        assert (got - want).abs().max() <= 3e-2  # bf16 kernels, two summation orders


def _grey_levels(a, b, pre: FramePreprocessor) -> float:
    """The largest difference between two preprocessed frames, in grey levels of the 0-255 image."""
    return float(((a.pixel_values.cpu() - b.pixel_values.cpu()).abs() * pre.grey_scale().cpu()).max())


@pytest.mark.parametrize("size", [(336, 448), (1080, 1920), (2160, 3840)])
@pytest.mark.gpu
@needs_cuda
def test_device_preprocessing_equals_the_cpu_path_within_one_grey_level(size):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    cpu, gpu = FramePreprocessor(448 * 336), FramePreprocessor(448 * 336, device="cuda")
    a, b = cpu(frame), gpu(frame)
    assert a.grid_thw == b.grid_thw
    assert _grey_levels(a, b, cpu) <= 1.0


@pytest.mark.gpu
@needs_cuda
def test_a_downscale_the_cuda_kernel_refuses_falls_back_to_the_cpu():
    frame = np.random.default_rng(1).integers(0, 256, (4320, 7680, 3), dtype=np.uint8)  # 8K to 28x56
    gpu = FramePreprocessor(28 * 56, device="cuda")
    out = gpu(frame)  # never raises: CUDA or, past its kernel's limit, the CPU
    ref = FramePreprocessor(28 * 56)(frame)
    assert out.pixel_values.device.type == "cuda" and _grey_levels(out, ref, gpu) <= 1.0
