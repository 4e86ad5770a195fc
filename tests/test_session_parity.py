"""The heart of the model layer: the cached stream equals transformers' offline path."""

import numpy as np
import pytest
import torch

from model import SessionConfig, StreamSession
from model.sampling import Sampling
from tests.conftest import clip_pixels, processor_inputs, scene_frames

FP = 28 * 28 * 30  # per-frame budget: 333x501 -> 12x20 patches... (small, fast on CPU)


def _stream(lm, frames, ts, **cfg):
    s = StreamSession(lm, SessionConfig(frame_pixels=FP, **cfg))
    masks = [torch.from_numpy(s.add_frame(f, t).keep_mask.reshape(-1)) for f, t in zip(frames, ts)]
    return s, masks


def _offline_logits(lm, ids: list[int], frames, masks) -> torch.Tensor:
    pix = clip_pixels(lm, frames, FP)
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), video_compression_mask=torch.cat(masks), **pix)
    return out.logits[0]


def test_video_turn_ids_and_greedy_answer_equal_processor_and_generate(lm):
    frames = scene_frames(5)  # 333x501, odd size
    ts = [0.0, 0.5, 1.0, 1.5, 2.0]
    s, masks = _stream(lm, frames, ts, diffp_reference="previous")
    q = "What changed in the video?"
    gen = s.ask(q, Sampling(max_new_tokens=12))
    first = next(gen)
    first_logits = s.next_logits()
    answer = [first.token_id] + [d.token_id for d in gen]

    inputs = processor_inputs(lm, frames, fps=2.0, question=q, frame_pixels=FP)
    ids = inputs["input_ids"][0].tolist()
    assert torch.equal(inputs["video_compression_mask"], torch.cat(masks))
    assert s.token_ids()[: len(ids)] == ids
    assert len(answer) >= 2
    with torch.no_grad():
        ref = lm.model.generate(**inputs, max_new_tokens=12, do_sample=False)
        offline = lm.model(**inputs).logits[0, -1]
    assert answer == ref[0, len(ids):].tolist()[: len(answer)]
    assert (first_logits - offline).abs().max().item() <= 1e-4


def _ask_recorded(s, q, n):
    """Answer tokens, the cache position of the first one, and the logits that chose it."""
    gen = s.ask(q, Sampling(max_new_tokens=n))
    d = next(gen)
    start, logits = s.cache_len, s.next_logits()
    return [d.token_id] + [x.token_id for x in gen], start, logits


def test_two_questions_with_frames_between_equal_one_offline_forward(lm):
    frames = scene_frames(6, seed=1)
    s, masks = _stream(lm, frames[:3], [0.0, 1.0, 2.0])
    a1, start1, _ = _ask_recorded(s, "What is on the left?", 6)
    for f, t in zip(frames[3:], [3.0, 4.0, 5.0]):
        masks.append(torch.from_numpy(s.add_frame(f, t).keep_mask.reshape(-1)))
    a2, start2, q2_logits = _ask_recorded(s, "And now?", 6)
    ids = s.token_ids()
    text = lm.tokenizer.decode(ids)
    assert text.count("<|im_start|>user\n") == 2 and "Time 3.0s:" in text and text.count("<|im_start|>assistant") == 2
    assert ids[start1:start1 + len(a1)] == a1 and ids[start2:] == a2[: len(ids) - start2]
    offline = _offline_logits(lm, ids, frames, masks)
    # every generated token is the offline argmax at the position before it (teacher forcing)
    for answer, start in ((a1, start1), (a2, start2)):
        assert offline[start - 1: start - 1 + len(answer)].argmax(-1).tolist() == answer
    assert (offline[start2 - 1] - q2_logits).abs().max().item() <= 1e-4


def test_stream_layout_prefill_equals_offline_forward(lm):
    frames = scene_frames(4, h=200, w=260, seed=2)
    s = StreamSession(lm, SessionConfig(frame_pixels=FP, layout="stream"))
    probs, masks, ends = [], [], []
    for i, f in enumerate(frames):
        masks.append(torch.from_numpy(s.add_frame(f, float(i)).keep_mask.reshape(-1)))
        probs.append(s.respond_probability())
        ends.append(s.cache_len)
    gen = s.ask("Is anyone there?", Sampling(max_new_tokens=4))
    next(gen)
    q_logits = s.next_logits()
    q_end = len(s.token_ids())
    gen.close()
    ids = s.token_ids()
    text = lm.tokenizer.decode(ids)
    assert text.count("<|stream_start|>stream\nTime ") == 4 and text.count("\n<|stream_end|>\n") == 4
    assert "<|im_start|>user\nIs anyone there?<|im_end|>\n<|im_start|>assistant\n" in text
    offline = _offline_logits(lm, ids, frames, masks)
    im_start, stream_start = lm.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|stream_start|>"])
    for p, end in zip(probs, ends):
        pair = offline[end - 1, [im_start, stream_start]]
        assert abs(torch.softmax(pair, -1)[0].item() - p) < 1e-5
        assert 0.0 < p < 1.0
    assert (offline[q_end - 1] - q_logits).abs().max().item() <= 1e-4


def test_session_continues_after_an_answer_closed_early(lm):
    frames = scene_frames(4, seed=3)
    s, masks = _stream(lm, frames[:2], [0.0, 1.0])
    gen = s.ask("Describe.", Sampling(max_new_tokens=20))
    first = next(gen)
    gen.close()  # the listener went away mid-answer
    masks.append(torch.from_numpy(s.add_frame(frames[2], 2.0).keep_mask.reshape(-1)))
    ids = s.token_ids()
    text = lm.tokenizer.decode(ids)
    assert first.token_id in ids
    assert "<|im_end|>\n<|im_start|>user\nTime 2.0s:" in text  # the turn was closed before the frame
    offline = _offline_logits(lm, ids, frames[:3], masks)
    assert (offline[-1] - s.next_logits()).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", ["video-turn", "stream"])
def test_cache_len_tracks_kv_cache(lm, layout):
    s = StreamSession(lm, SessionConfig(frame_pixels=FP, layout=layout))
    for i, f in enumerate(scene_frames(3, seed=4)):
        r = s.add_frame(f, float(i))
        assert r.cache_len == s.cache_len == s.kv_len == len(s.token_ids())
        assert r.tokens_kept == int(np.count_nonzero(r.keep_mask)) and r.tokens_total == r.keep_mask.size
    s.answer("Hi?", Sampling(max_new_tokens=3))
    assert s.kv_len == s.cache_len
