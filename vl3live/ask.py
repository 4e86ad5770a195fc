"""``vl3live ask VIDEO QUESTION``: stream a local video file through a session and answer."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from model.sampling import Sampling

from .config import Config, add_dataclass_arguments, dataclass_from_args, load_config
from .terminal import load


@dataclass
class AskConfig:
    """``vl3live ask`` options."""

    video: str = field(default="", metadata={"help": "video file to stream (any format PyAV/FFmpeg reads)"})
    question: str = field(default="", metadata={"help": "question asked after the video"})
    fps: float = field(default=1.0, metadata={"help": "frames per second sampled from the file"})
    max_seconds: float | None = field(default=None, metadata={"help": "stop reading after this many seconds"})
    max_new_tokens: int = field(default=256, metadata={"help": "answer length limit in tokens"})
    model: str | None = field(default=None, metadata={"help": "overrides model.spec (tiny | dir | hub id)"})

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError("--fps must be > 0")
        if not self.question.strip():
            raise ValueError("the question must not be empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("--max-seconds must be > 0")


def run_ask(cfg: AskConfig, config: Config, out=sys.stdout, err=sys.stderr) -> str:
    from model import CacheLimitError, StreamSession
    from model.checkpoints.loading import preflight
    from streamer.sources import read_video_file

    preflight(config.model, cfg.model)  # settings and checkpoint, then the input: before minutes of loading
    if not Path(cfg.video).is_file():
        raise FileNotFoundError(f"video file not found: {cfg.video}")
    lm = load(cfg.model, config, err)
    session = StreamSession(lm, config.session)
    n = kept = 0
    for frame in read_video_file(cfg.video, fps=cfg.fps, max_seconds=cfg.max_seconds):
        try:
            r = session.add_frame(frame.rgb, t=frame.pts_seconds)
        except CacheLimitError as exc:
            print(f"stopping at t={frame.pts_seconds:.1f}s: {exc}", file=err, flush=True)
            break
        n, kept = n + 1, kept + r.tokens_kept
        print(f"\rframe {n} t={r.t:.1f}s kept {r.tokens_kept}/{r.tokens_total} cache {r.cache_len}",
              end="", file=err, flush=True)
    print(file=err)
    if n == 0:
        raise ValueError(f"no frames could be read from {cfg.video}")
    text = []
    for delta in session.ask(cfg.question, Sampling(max_new_tokens=cfg.max_new_tokens)):
        text.append(delta.text)
        print(delta.text, end="", file=out, flush=True)
    print(file=out)
    return "".join(text)


HELP = "stream a video file through a session and answer a question"


def add_arguments(p) -> None:
    add_dataclass_arguments(p, AskConfig, positional=("video", "question"))


def run(args) -> int:
    run_ask(dataclass_from_args(AskConfig, args), load_config(args.config, args.overrides))
    return 0
