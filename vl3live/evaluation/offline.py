"""The benchmarks' own protocol, for comparison: every question a fresh, stateless call.

The clip is cut at the question's time (OVO-Bench's chunked videos; StreamingBench's
``context_time`` keeps only its last seconds), and stock transformers answers it: the chat template
and ``VideoLlama3Processor`` on every frame of the clip, then ``generate``. Proactive items poll
as StreamingBench does: every second from the instruction's time to 4 s past the due time, "Is it
the right time to output ...? You can only answer yes or no."; on a yes, the question itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from model.video import read_video_file

from .formats import SB_PROACTIVE_PROMPT, Probe, VideoJob, score_proactive
from .online import result


class Stateless:
    """One stateless answer over a clip, on the stock transformers path."""

    def __init__(self, lm, fps: float, frame_pixels: int, max_new_tokens: int = 16):
        self.lm, self.fps, self.frame_pixels, self.max_new_tokens = lm, fps, frame_pixels, max_new_tokens

    def answer(self, frames: list[np.ndarray], prompt: str) -> tuple[str, float]:
        """The answer and its time to first token (ms: processing the clip, encoding it, the prefill)."""
        from transformers.video_utils import VideoMetadata

        started = time.perf_counter()
        lm = self.lm
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = lm.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        meta = VideoMetadata(total_num_frames=len(frames), fps=self.fps, frames_indices=list(range(len(frames))))
        inputs = lm.processor(text=[text], videos=[np.stack(frames)], video_metadata=[meta],
                              size={"shortest_edge": 28 * 28, "longest_edge": self.frame_pixels * len(frames)},
                              return_tensors="pt")
        inputs = {k: (v.to(lm.device, lm.dtype) if torch.is_floating_point(v) else v.to(lm.device))
                  for k, v in inputs.items() if k != "video_metadata" and hasattr(v, "to")}
        stamps = _FirstToken()
        with torch.inference_mode():
            out = lm.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, streamer=stamps)
        ms = ((stamps.first or time.perf_counter()) - started) * 1e3
        new = out[0, inputs["input_ids"].shape[1]:]
        return lm.tokenizer.decode(new, skip_special_tokens=True), ms


class _FirstToken:
    """A ``generate`` streamer that notes when the first new token comes (its first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.calls, self.first = 0, None

    def put(self, value: object) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _clip(frames: list[tuple[float, np.ndarray]], t: float, context: float | None) -> list[np.ndarray]:
    start = -1.0 if context is None else t - context
    clip = [rgb for pts, rgb in frames if start <= pts <= t]
    return clip or [frames[0][1]]


def run_offline(lm, work: list[VideoJob], fps: float, frame_pixels: int, sink: Callable[[dict], None],
                context: float | None = None, max_new_tokens: int = 16) -> None:
    """Every probe of every job, each a fresh call on the clip up to its time."""
    model = Stateless(lm, fps, frame_pixels, max_new_tokens)
    for job in work:
        frames = [(f.pts_seconds, f.rgb) for f in read_video_file(job.video, fps=fps)]
        for probe in job.probes:
            if probe.kind == "proactive":
                sink(_proactive(model, frames, probe, context))
                continue
            answer, ms = model.answer(_clip(frames, probe.time, context), probe.prompt)
            sink(result(probe, "offline", answer, ttft_ms=round(ms, 2),
                        frames=len(_clip(frames, probe.time, context))))


def _proactive(model: Stateless, frames, probe: Probe, context: float | None) -> dict:
    """StreamingBench's polling: yes/no every second until 4 s past the due time."""
    query = (f"{probe.question} Is it the right time to output \"{probe.expected}\"? You can only answer "
             "yes or no.")
    t, end, spoken = probe.time + 1.0, probe.due + 4.0, []
    calls = 0
    while t <= end:
        clip = [rgb for pts, rgb in frames if probe.time <= pts <= t] or _clip(frames, t, context)
        reply, _ = model.answer(clip, SB_PROACTIVE_PROMPT.format(query))
        calls += 1
        if "yes" in reply.strip().lower():
            text, _ = model.answer(clip, SB_PROACTIVE_PROMPT.format(probe.question))
            spoken.append((t, text))
            break
        t += 1.0
    return result(probe, "offline", spoken[0][1] if spoken else None, calls=calls, **score_proactive(probe, spoken))
