"""Recall of evicted frames: the store's memory budget, and a planted frame found again by a question."""

import re

import numpy as np
import pytest
import torch

from model import SessionConfig, StreamSession, load_model
from model.checkpoints.synthetic import SyntheticCamera
from model.config import BudgetConfig
from model.executor import Executor
from model.recall import FRAME_OVERHEAD_BYTES, RecallStore
from model.sampling import Sampling
from tests.conftest import assert_answers

H, W = 168, 224  # 48 visual tokens per frame
PLANTED_T = 4.0


def test_store_keeps_the_newest_frames_within_its_memory_and_counts_drops():
    per_frame = 10 * 8 * 4 + 2 * 3 * 5 * 4 + FRAME_OVERHEAD_BYTES  # embeddings + mean keys + bookkeeping
    store = RecallStore(memory_bytes=per_frame * 5, layers=2, kv_heads=3, head_dim=5)
    rng = torch.Generator().manual_seed(0)
    keys = [torch.randn(2, 3, 5, generator=rng) for _ in range(200)]
    for i, k in enumerate(keys):
        store.add(float(i), torch.randn(10, 8, generator=rng), k)
        assert store.nbytes <= store.memory_bytes
    assert len(store) == 5 and store.dropped == 195 and store.stored == 200
    assert [f.t for f in store.frames] == [195.0, 196.0, 197.0, 198.0, 199.0]
    # a query equal to frame 197's key direction (for every query head of the group) finds it first
    q = keys[197].repeat_interleave(2, dim=1).unsqueeze(0)  # (tokens=1, layers, heads=6, dim)
    scores = store.scores(q)
    assert scores.shape == (5,) and scores.argmax().item() == 2 and scores.max().item() == pytest.approx(1.0)
    assert (scores.abs() <= 1 + 1e-6).all()
    assert [f.t for f in store.top(q, 3)] == sorted(f.t for f in store.top(q, 3))  # time order


@pytest.fixture(scope="module")
def crimson():
    """A tiny model whose attention matches like with like, and a word that means the planted colour.

    Random weights know no words, so the test gives the model one piece of meaning: every
    layer's query projection equals its key projection (q . k is then high for similar
    hidden states), and the embedding of " crimson" is the mean projector output of a crimson
    frame. A question using the word should then find the crimson frame among evicted ones.
    """
    lm = load_model("tiny", device="cpu", dtype="float32", seed=0)
    tc = lm.model.config.text_config
    d = tc.hidden_size // tc.num_attention_heads
    group = tc.num_attention_heads // tc.num_key_value_heads
    red = np.zeros((H, W, 3), np.uint8)
    red[..., 0], red[..., 1] = 230, 20
    with torch.no_grad():
        for layer in lm.model.model.language_model.layers:
            a = layer.self_attn
            for h in range(tc.num_attention_heads):
                kv = slice(h // group * d, (h // group + 1) * d)
                a.q_proj.weight[h * d:(h + 1) * d] = a.k_proj.weight[kv]
                a.q_proj.bias[h * d:(h + 1) * d] = a.k_proj.bias[kv]
        probe = StreamSession(lm, SessionConfig(frame_pixels=H * W))
        pf = probe.prepare(red)
        mean = Executor(lm).encode_frames([(pf, torch.ones(pf.num_tokens, dtype=torch.bool))])[0].mean(0)
        (word,) = lm.tokenizer(" crimson", add_special_tokens=False)["input_ids"]
        lm.model.get_input_embeddings().weight[word] = mean
    return lm, red


def _stream_with_planted_frame(lm, red, layout, recall):
    budget = BudgetConfig(max_tokens=500, recent_tokens=100, reserve_tokens=64, recall=recall)
    s = StreamSession(lm, SessionConfig(layout=layout, frame_pixels=H * W, budget=budget))
    cam = SyntheticCamera(H, W, seed=0)
    for i in range(60):
        s.add_frame(red if i == PLANTED_T else cam.frame(float(i)), float(i))
    assert PLANTED_T not in s.frames_in_cache() and s.stats().evicted_frames > 20
    return s


@pytest.mark.parametrize("layout", ["video-turn", "stream"])
def test_recall_on_brings_the_planted_frame_back_for_the_answer_only(crimson, layout):
    lm, red = crimson
    s = _stream_with_planted_frame(lm, red, layout, "on")
    before = s.frames_in_cache()
    question = "Where was the crimson?"
    gen = s.ask(question, Sampling(max_new_tokens=4, ignore_eos=True))
    next(gen)  # the question and the recalled frames are in the cache now
    assert PLANTED_T in s.last_recall and len(s.last_recall) == 4
    during = s.frames_in_cache()
    live = [t for t in during if t not in s.last_recall]
    assert set(s.last_recall) <= set(during) and live == before[len(before) - len(live):]  # room: oldest went
    assert s.cache_len <= s.max_tokens
    text = lm.tokenizer.decode(s.token_ids())
    tail = text[: text.rindex(question)]
    tail = tail[tail.rindex(f"Time {before[-1]:.1f}s:"):]  # after the last live frame: the recalled ones
    assert [float(x) for x in re.findall(r"Time (\d+\.\d)s:", tail)[1:]] == s.last_recall  # in time order
    for _ in gen:
        pass
    assert s.frames_in_cache() == live  # removed again after the answer
    assert s.stats().recalled_frames == 4 and s.cache_len <= s.max_tokens
    assert s.cache_len == s.kv_len
    s.add_frame(red, 60.0)  # the stream goes on
    assert_answers(s, "And now?", 2)


def test_recall_off_leaves_the_planted_frame_out(crimson):
    lm, red = crimson
    s = _stream_with_planted_frame(lm, red, "video-turn", "off")
    s.answer("Where was the crimson?", Sampling(max_new_tokens=4))
    assert s.last_recall == [] and PLANTED_T not in s.frames_in_cache()
    assert s.stats().recall_stored == 0 and s.stats().recalled_frames == 0
