"""Samples to token ids, labels and frames: the live session's layout, piece by piece.

The text is rendered with ``model.layout.LayoutRenderer`` and tokenized in the same pieces
``model.StreamSession`` tokenizes, frames go through the same ``FramePreprocessor`` and
``DiffPruner``, so a rendered stream sample is token for token what a live session holds after
the same frames, questions and answers (``tests/test_training_data.py`` checks it).

Labels (-100 elsewhere): the answer tokens and the ``<|im_end|>`` that closes them; in the
``stream`` layout also the decision after each frame that the model makes itself: the
``<|im_start|>`` of an assistant turn it opens (speak now) or the next frame's
``<|stream_start|>`` (keep watching). Keep-watching labels are subsampled to
``train.decision_ratio`` per speak-now label (at least one per sample), seeded per sample; a
``train.decision_changed`` share of them goes first to the frames that changed most (the most tokens
DiffFP kept): the moments where speaking up is tempting and wrong.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.config import SessionConfig
from model.diffp import DiffPruner
from model.frames import FramePreprocessor
from model.layout import STREAM_START, ChatPieces, LayoutRenderer
from model.video import read_video_file
from training.config import TrainConfig

from .samples import Sample, SampleError, check_files, check_turns

IGNORE = -100


@dataclass
class Rendered:
    """One sample as the model trains on it: input ids, labels, pixel values and grids."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # per frame (patches, 3*14*14)
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    keeps: list[torch.Tensor] = field(default_factory=list)  # per frame (tokens,) bool
    tokens_total: int = 0  # visual tokens before DiffFP
    tokens_kept: int = 0


class FrameCache:
    """Decoded videos, least recently used evicted first, at most ``limit_bytes`` of RGB in all: a video
    that several samples cut (the stream samples and clips of one synthetic video) is decoded once, not
    once per sample. A video is decoded as far as a sample needed it, and further when a later one
    needs more; one larger than the whole limit is never kept."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.used = 0
        self.hits = self.misses = 0
        self._videos: OrderedDict[tuple, tuple[list[tuple[float, np.ndarray]], float | None, int]] = OrderedDict()

    def frames(self, path: str, fps: float, until: float | None) -> list[tuple[float, np.ndarray]]:
        """(pts, RGB) of ``path`` at ``fps`` up to ``until`` seconds (None: to its end)."""
        key = (str(Path(path).resolve()), fps)
        held = self._videos.get(key)
        if held is not None and (held[1] is None or (until is not None and until <= held[1])):
            self._videos.move_to_end(key)
            self.hits += 1
            return [f for f in held[0] if until is None or f[0] <= until]
        self.misses += 1
        frames = [(f.pts_seconds, f.rgb) for f in read_video_file(path, fps=fps, max_seconds=until)]
        if held is not None:
            self.used -= held[2]
            del self._videos[key]
        size = sum(rgb.nbytes for _, rgb in frames)
        if size <= self.limit:
            self._videos[key] = (frames, until, size)
            self.used += size
            while self.used > self.limit:
                _, (_, _, gone) = self._videos.popitem(last=False)
                self.used -= gone
        return frames


class SampleRenderer:
    """Renders a sample with the live session's own layout renderer, preprocessing and DiffFP."""

    def __init__(self, processor, session: SessionConfig, train: TrainConfig):
        self.tok = processor.tokenizer
        self.session, self.train = session, train
        self.pieces = ChatPieces.from_processor(processor, session.system_prompt)
        self.prep = FramePreprocessor(session.frame_pixels, session.min_pixels, "cpu")
        self.cache = FrameCache(train.frame_cache_mb * 2**20)
        self.video_id = self.tok.convert_tokens_to_ids(getattr(processor, "video_token", "<|video_pad|>"))
        self.im_start = self.tok.convert_tokens_to_ids("<|im_start|>")
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.stream_start = self.tok.convert_tokens_to_ids(STREAM_START)
        if session.layout == "stream" and self.stream_start in (None, self.tok.unk_token_id):
            raise ValueError(f"layout 'stream' needs the token {STREAM_START} in the tokenizer")

    def _enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def frames(self, sample: Sample) -> list[tuple[float, np.ndarray]]:
        """(time from the clip start, RGB) of the sample's visuals, at most ``train.max_frames``."""
        cfg = self.train
        if sample.kind == "image":
            from PIL import Image

            out = []
            for i, p in enumerate(sample.images):
                try:
                    with Image.open(p) as img:
                        out.append((float(i), np.array(img.convert("RGB"))))
                except OSError as exc:
                    raise SampleError(sample.where, f"unreadable image {p}: {exc}") from None
            return out
        if sample.video is None:
            return []
        try:
            frames = [(pts - sample.start, rgb) for pts, rgb in self.cache.frames(sample.video, cfg.fps, sample.end)
                      if pts >= sample.start]
        except (ValueError, FileNotFoundError) as exc:
            raise SampleError(sample.where, str(exc)) from None
        if not frames:
            raise SampleError(sample.where, f"no frames in {sample.video} between {sample.start} and {sample.end} s")
        if len(frames) > cfg.max_frames:  # evenly resampled, as VideoLLaMA3 does
            idx = np.linspace(0, len(frames) - 1, cfg.max_frames).round().astype(int)
            frames = [frames[i] for i in idx]
        return frames

    def layout_of(self, sample: Sample) -> str:
        """The sample's own layout; else ``stream`` for one that speaks by itself; else the config's.
        Images, videos and text samples are always ``video-turn``."""
        if sample.kind != "stream":
            return "video-turn"
        if sample.layout is not None:
            return sample.layout
        return "stream" if sample.speaks_by_itself() else self.session.layout

    def render(self, sample: Sample, seed: int = 0) -> Rendered:
        check_files(sample)
        layout = self.layout_of(sample)
        check_turns(sample, layout)
        if layout == "stream" and self.stream_start in (None, self.tok.unk_token_id):
            raise SampleError(sample.where, f"the stream layout needs the token {STREAM_START}, which this "
                                            "checkpoint's tokenizer does not have (use a converted official "
                                            'checkpoint, or "layout": "video-turn" for a sample with questions only)')
        r = LayoutRenderer(layout, self.pieces, self.session.stream_timestamps)
        out = Rendered(self._enc(r.start()), [])
        out.labels = [IGNORE] * len(out.input_ids)
        pruner = DiffPruner(self.session.diffp_reference, self.session.threshold, self.session.diffp_min_tokens,
                            grey_scale=self.prep.grey_scale()) if sample.kind in ("stream", "video") else None
        events: list[tuple[float, int, object]] = [(t, 0, rgb) for t, rgb in self.frames(sample)]
        if sample.kind == "stream":  # a message at time t comes after the frames up to t
            events += [(m.time, 1, m) for m in sample.messages]
            events.sort(key=lambda e: (e[0], e[1]))
        else:  # the visuals open the first user turn
            events += [(float("inf"), 1, m) for m in sample.messages]
        pending: list[int] = []  # the close of the last answer: tokenized on its own, sent with the next part
        decisions: list[tuple[int, bool, int]] = []  # (position, speak now, tokens the frame before kept)
        after_frame = question_open = False
        kept = 0  # tokens DiffFP kept of the last frame
        for t, kind, item in events:
            if kind == 0:
                pf = self.prep(item)
                keep = pruner(pf) if pruner is not None else torch.ones(pf.num_tokens, dtype=torch.bool)
                ft = r.frame_text(t)
                self._flush(out, pending)
                pending = []
                lead, sep, stamp = self._enc(ft.lead), self._enc(ft.sep), self._enc(ft.stamp)
                if after_frame and layout == "stream":  # the next frame's <|stream_start|>: keep watching
                    decisions.append((len(out.input_ids) + len(lead) + len(sep), False, kept))
                for ids in (lead, sep, stamp):
                    self._add(out, ids, labelled=False)
                self._add(out, [self.video_id] * int(keep.sum()), labelled=False)
                self._add(out, self._enc(ft.after), labelled=False)
                out.pixel_values.append(pf.pixel_values)
                out.grids.append(pf.grid_thw)
                out.keeps.append(keep)
                out.tokens_total += pf.num_tokens
                kept = int(keep.sum())
                out.tokens_kept += kept
                after_frame = True
                continue
            m = item
            self._flush(out, pending)
            pending = []
            if m.role == "user":
                self._add(out, self._enc(r.question(m.content)), labelled=False)
                question_open = True
            else:
                if not question_open:  # the model speaks by itself (stream layout): its <|im_start|>
                    if after_frame:
                        decisions.append((len(out.input_ids), True, kept))
                    self._add(out, self._enc(r.assistant_open()), labelled=False)
                self._add(out, self._enc(m.content), labelled=True)
                pending = self._enc(r.answer_close())
                question_open = False
            after_frame = False
        self._flush(out, pending)
        self._label_decisions(out, decisions, seed)
        if len(out.input_ids) > self.train.max_length:
            raise SampleError(sample.where, f"{len(out.input_ids)} tokens, over train.max_length "
                                            f"{self.train.max_length}")
        return out

    def _flush(self, out: Rendered, pending: list[int]) -> None:
        """The close of an answer: its <|im_end|> is a target (the model ends its answer), the rest not."""
        start = len(out.input_ids)
        self._add(out, pending, labelled=False)
        if pending and pending[0] == self.im_end:
            out.labels[start] = self.im_end

    @staticmethod
    def _add(out: Rendered, ids: list[int], labelled: bool) -> None:
        out.input_ids += ids
        out.labels += list(ids) if labelled else [IGNORE] * len(ids)

    def _label_decisions(self, out: Rendered, decisions: list[tuple[int, bool, int]], seed: int) -> None:
        speak = [p for p, s, _ in decisions if s]
        watch = [(p, kept) for p, s, kept in decisions if not s]
        n = min(max(1, round(self.train.decision_ratio * len(speak))) if watch else 0, len(watch))
        rng = random.Random(seed)
        changed = round(n * self.train.decision_changed)
        taken = [p for p, _ in sorted(rng.sample(watch, len(watch)), key=lambda w: -w[1])[:changed]] \
            if changed else []  # ties at random
        chosen = set(taken)
        rest = [p for p, _ in watch if p not in chosen]
        for p in speak + taken + rng.sample(rest, n - changed):
            out.labels[p] = out.input_ids[p]
