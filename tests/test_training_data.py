"""Training data: a rendered stream sample is exactly what a live session holds; labels; bad samples."""

import json

import numpy as np
import pytest
import torch

from model import StreamSession
from model.config import SessionConfig
from model.video import read_video_file
from tests import ws_rig
from training.config import TrainConfig
from training.data.render import IGNORE, FrameCache, SampleRenderer
from training.data.samples import SampleError, parse_sample, read_samples

FRAME_PIXELS = 28 * 28 * 12


def _stream_sample(tmp_path, seconds=6.0):
    clip = ws_rig.write_clip(tmp_path / "clip.mp4", seconds=seconds)
    return {"video": clip.name, "start_time": 1.0, "end_time": 5.0, "conversation": [
        {"role": "user", "content": "What is moving?", "time": 2.2},
        {"role": "assistant", "content": "A red ball rolls to the left.", "time": 2.2},
        {"role": "assistant", "content": "The ball stopped.", "time": 3.6},
        {"role": "user", "content": "Where is it now?", "time": 4.1},
        {"role": "assistant", "content": "In the corner.", "time": 4.1},
    ]}


@pytest.mark.parametrize("layout, stamps", [("stream", True), ("stream", False), ("video-turn", True)])
def test_a_rendered_stream_sample_is_what_the_live_session_holds(lm, tmp_path, layout, stamps):
    raw = _stream_sample(tmp_path)
    if layout == "video-turn":  # no proactive turns in this layout
        del raw["conversation"][2]
    session_cfg = SessionConfig(layout=layout, frame_pixels=FRAME_PIXELS, stream_timestamps=stamps)
    train_cfg = TrainConfig(fps=2.0)
    sample = parse_sample(raw, tmp_path, "test:1")
    out = SampleRenderer(lm.processor, session_cfg, train_cfg).render(sample)

    live = StreamSession(lm, session_cfg)  # the same frames, questions and answers, live
    frames = [(f.pts_seconds - 1.0, f.rgb) for f in read_video_file(tmp_path / "clip.mp4", fps=2.0, max_seconds=5.0)
              if f.pts_seconds >= 1.0]
    events = [(t, 0, rgb) for t, rgb in frames] + [(m["time"] - 1.0, 1, m) for m in raw["conversation"]]
    question = None
    for t, kind, item in sorted(events, key=lambda e: (e[0], e[1])):
        if kind == 0:
            live.add_frame(item, t)
        elif item["role"] == "user":
            question = item["content"]
        else:
            live.add_exchange(question, item["content"])
            question = None
    live.add_frame(frames[-1][1], frames[-1][0] + 1.0)  # flushes the last answer's close into the cache
    ids = live.token_ids()
    assert out.input_ids == ids[: len(out.input_ids)]
    tail = ids[len(out.input_ids):]
    assert tail and tail[0] != lm.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")  # the close is included
    assert out.tokens_kept < out.tokens_total and len(out.keeps) == len(frames)
    cached = lm.processor.tokenizer.decode(ids)
    assert ("Time 1.0s:" in cached) == stamps or layout == "video-turn"  # the released format has no times
    assert sum(int(k.sum()) for k in out.keeps) == out.input_ids.count(live.video_token_id) == out.tokens_kept

    tok = lm.processor.tokenizer
    labelled = [i for i, lab in enumerate(out.labels) if lab != IGNORE]
    assert all(out.labels[i] == out.input_ids[i] for i in labelled)
    text = tok.decode([out.input_ids[i] for i in labelled])
    answers = [m["content"] for m in raw["conversation"] if m["role"] == "assistant"]
    im_end, im_start = "<|im_end|>", "<|im_start|>"
    stream_start = "<|stream_start|>"
    for a in answers:
        assert a + im_end in text  # every answer and its <|im_end|>, nothing of the questions
    assert "What is moving?" not in text and "Time" not in text and "stream\n" not in text
    if layout == "stream":
        assert text.count(im_start) == 1  # the one turn the model opened by itself
        assert 1 <= text.count(stream_start) <= 1  # keep-watching labels, balanced 1:1 against it
    else:
        assert im_start not in text and stream_start not in text


def test_samples_of_one_video_decode_it_once_and_render_as_if_decoded_each_time(lm, tmp_path):
    raw = _stream_sample(tmp_path)
    sample = parse_sample(raw, tmp_path, "test:1")
    cfg = SessionConfig(layout="stream", frame_pixels=FRAME_PIXELS)
    uncached = SampleRenderer(lm.processor, cfg, TrainConfig(fps=2.0, frame_cache_mb=0))
    cached = SampleRenderer(lm.processor, cfg, TrainConfig(fps=2.0))
    first, again = cached.render(sample), cached.render(sample)
    plain = uncached.render(sample)
    assert (cached.cache.misses, cached.cache.hits) == (1, 1)  # the second sample of the video: no decode
    assert (uncached.cache.misses, uncached.cache.hits, uncached.cache.used) == (1, 0, 0)  # 0 MiB: never kept
    for out in (first, again):
        assert out.input_ids == plain.input_ids and out.labels == plain.labels
        assert all(torch.equal(a, b) for a, b in zip(out.pixel_values, plain.pixel_values))

    clip = str(tmp_path / "clip.mp4")
    cache = FrameCache(64 * 2**20)
    short = cache.frames(clip, 2.0, 2.0)
    longer = cache.frames(clip, 2.0, 5.0)  # further than it was decoded: decoded again, as far as asked
    assert cache.misses == 2 and [t for t, _ in longer][: len(short)] == [t for t, _ in short]
    assert max(t for t, _ in short) <= 2.0 < max(t for t, _ in longer) <= 5.0
    assert [t for t, _ in cache.frames(clip, 2.0, 3.0)] == [t for t, _ in longer if t <= 3.0] and cache.hits == 1
    whole = sum(rgb.nbytes for _, rgb in longer)
    assert cache.used == whole
    tight = FrameCache(whole - 1)  # a video larger than the whole cache is not kept
    tight.frames(clip, 2.0, 5.0)
    assert tight.used == 0


def test_decision_ratio_balances_keep_watching_labels(lm, tmp_path):
    raw = _stream_sample(tmp_path)
    sample = parse_sample(raw, tmp_path, "test:1")
    tok = lm.processor.tokenizer
    sid = tok.convert_tokens_to_ids("<|stream_start|>")
    counts = []
    for ratio in (0.0, 1.0, 3.0, 100.0):
        out = SampleRenderer(lm.processor, SessionConfig(layout="stream", frame_pixels=FRAME_PIXELS),
                             TrainConfig(fps=2.0, decision_ratio=ratio)).render(sample)
        counts.append(sum(1 for i, lab in enumerate(out.labels) if lab == sid))
    frames_followed_by_frames = counts[-1]
    assert counts[:3] == [1, 1, 3] and frames_followed_by_frames >= 4  # at least one; 100x = all of them


def test_decision_changed_gives_keep_watching_labels_to_the_frames_that_changed_most(lm, tmp_path):
    sample = parse_sample(_stream_sample(tmp_path), tmp_path, "test:1")
    sid = lm.processor.tokenizer.convert_tokens_to_ids("<|stream_start|>")

    def render(**train):
        return SampleRenderer(lm.processor, SessionConfig(layout="stream", frame_pixels=FRAME_PIXELS),
                              TrainConfig(fps=2.0, **train)).render(sample)

    every = render(decision_ratio=100.0)
    starts = [i for i, t in enumerate(every.input_ids) if t == sid]  # frame k opens with the k-th of them
    change = {p: int(every.keeps[k - 1].sum()) for k, p in enumerate(starts) if k}  # what the frame before kept
    candidates = [p for p in starts if every.labels[p] == sid]
    assert len({change[p] for p in candidates}) > 1  # the frames differ in change: the choice can go wrong
    out = render(decision_ratio=2.0, decision_changed=1.0)
    chosen = [p for p in candidates if out.labels[p] == sid]
    others = [p for p in candidates if out.labels[p] != sid]
    assert len(chosen) == 2 and min(change[p] for p in chosen) >= max(change[p] for p in others)
    half = render(decision_ratio=2.0, decision_changed=0.5)
    assert sum(half.labels[p] == sid for p in candidates) == 2
    assert max(change[p] for p in candidates if half.labels[p] == sid) == max(change[p] for p in candidates)
    with pytest.raises(ValueError, match="decision_changed"):
        TrainConfig(decision_changed=1.5)


def test_llava_samples_and_bad_samples_are_reported_per_line(lm, tmp_path):
    from PIL import Image

    Image.fromarray(ws_rig.frames(1)[0]).save(tmp_path / "a.png")
    ws_rig.write_clip(tmp_path / "v.mp4", seconds=2.0)
    (tmp_path / "broken.mp4").write_bytes(b"\0" * 100)
    lines = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                             {"from": "gpt", "value": "A ball."}]},
        {"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nDescribe."},
                                             {"from": "gpt", "value": "It moves."},
                                             {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"image": "missing.png", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]},
        {"video": "broken.mp4", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]},
        {"video": "v.mp4", "start_time": 0, "end_time": 2, "conversation": [
            {"role": "user", "content": "late?", "time": 9}]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    items = list(read_samples(path))
    assert [type(x).__name__ for x in items] == ["Sample"] * 5 + ["SampleError"] * 2
    assert "outside the clip" in str(items[5]) and ":6" in str(items[5]) and "not valid JSON" in str(items[6])
    r = SampleRenderer(lm.processor, SessionConfig(frame_pixels=FRAME_PIXELS), TrainConfig(fps=2.0))
    image, video, text = (r.render(items[i]) for i in range(3))
    assert len(image.keeps) == 1 and image.tokens_kept == image.tokens_total  # an image is kept whole
    assert len(video.keeps) == 4 and text.keeps == []
    tok = lm.processor.tokenizer
    assert tok.decode([t for t, lab in zip(video.input_ids, video.labels) if lab != IGNORE]) == \
        "It moves.<|im_end|>Red.<|im_end|>"
    with pytest.raises(SampleError, match="file not found"):
        r.render(items[3])
    with pytest.raises(SampleError, match="broken.mp4"):
        r.render(items[4])
    with pytest.raises(SampleError, match="max_length"):
        SampleRenderer(lm.processor, SessionConfig(frame_pixels=FRAME_PIXELS),
                       TrainConfig(fps=2.0, max_length=20)).render(items[1])
    assert np.all([m.role in ("user", "assistant") for m in items[1].messages])
