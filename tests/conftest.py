"""Shared fixtures: the tiny random-weight model (built once) and frame/processor helpers."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def lm():
    from model import load_model

    return load_model("tiny", device="cpu", dtype="float32")


def scene_frames(n: int, h: int = 333, w: int = 501, seed: int = 0) -> list[np.ndarray]:
    """A random scene whose frames change in a few places (and one frame not at all)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    frames = []
    for i in range(n):
        f = base.copy()
        if i % 3 == 1:
            f[: h // 3, : w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
        elif i % 3 == 2 and i != 2:
            f[h // 2:, w // 2:] = 255 - f[h // 2:, w // 2:]
        frames.append(f)
    return frames


def processor_inputs(lm, frames: list[np.ndarray], fps: float, question: str, frame_pixels: int) -> dict:
    """What stock transformers builds for a clip + question: chat template + processor call."""
    from transformers.video_utils import VideoMetadata

    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = lm.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    meta = VideoMetadata(total_num_frames=len(frames), fps=fps, frames_indices=list(range(len(frames))))
    out = lm.processor(text=[text], videos=[np.stack(frames)], video_metadata=[meta],
                       size={"shortest_edge": 28 * 28, "longest_edge": frame_pixels * len(frames)},
                       return_tensors="pt")
    return {k: v for k, v in out.items() if k != "video_metadata"}


def clip_pixels(lm, frames: list[np.ndarray], frame_pixels: int) -> dict:
    """Stock video-processor tensors for ``frames`` (no compression)."""
    from model.frames import stock_clip_pixels

    return stock_clip_pixels(lm.processor, frames, frame_pixels)


async def eventually(pred, timeout: float = 60.0) -> bool:
    """Poll ``pred`` on the event loop until it holds (True) or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.02)
    return True


# A background job inherits SIGINT ignored, and so would the commands it starts: this launcher gives Ctrl-C
# back (SIGINT to its default), then becomes the command (same pid). Not ``Popen(preexec_fn=...)``: Python run
# in the forked child of a threaded process can deadlock before the exec (it hung a CI run: the child's garbage
# collection freed a PyAV scaler whose worker threads the fork had not copied).
_CTRL_C = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"


def with_ctrl_c(cmd: list[str]) -> list[str]:
    """``cmd`` (its first item a path to the program) started with SIGINT at its default."""
    return [sys.executable, "-c", _CTRL_C, *cmd]


def wait_for_line(proc, pattern: str, timeout: float = 60.0) -> tuple[re.Match | None, list[str]]:
    """Read ``proc.stderr`` (text) in a thread until a line matches ``pattern``: (the match or None
    after ``timeout``, the lines read so far, which keep growing as the process writes)."""
    lines: list[str] = []
    found: list[re.Match] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            m = re.search(pattern, line)
            if m and not found:
                found.append(m)
                ready.set()
    threading.Thread(target=read, daemon=True).start()
    ready.wait(timeout)
    return (found[0] if found else None), lines


def assert_answers(s, question: str, max_new_tokens: int = 3) -> str:
    """``s`` answers ``question``: 1..max_new_tokens tokens, whose text is exactly their detokenization, and
    the question is in its cache (and cache and KV agree). Returns the answer."""
    from model.sampling import Sampling

    deltas = list(s.ask(question, Sampling(max_new_tokens=max_new_tokens)))
    ids, text = [d.token_id for d in deltas], "".join(d.text for d in deltas)
    assert 1 <= len(ids) <= max_new_tokens
    assert text == s.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")  # (a cut-off last character)
    assert question in s.tokenizer.decode(s.token_ids()) and s.kv_len == s.cache_len
    return text
