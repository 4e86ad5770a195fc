"""``vl3live bench``: streaming session vs the stock transformers path, measured in the same run.

Frames come from :class:`model.checkpoints.synthetic.SyntheticCamera`. The streaming side ingests them one by
one into a :class:`StreamSession`; the stock side answers the same question over the same frames
the way transformers does it offline: ``VideoLlama3VideoProcessor`` on all frames, then
``generate`` re-encoding every frame and re-prefilling the whole prompt (same token sequence and
DiffFP masks as the session, so the two do exactly the same work apart from the cache).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from model.sampling import Sampling

from .config import add_dataclass_arguments, dataclass_from_args, load_config

if TYPE_CHECKING:  # torch and the model load when a bench runs, not when the CLI parses its flags
    import torch

    from model.session import StreamSession


@dataclass
class BenchConfig:
    """``vl3live bench`` options (the model bench, ``--stream-hours``, ``--sessions``)."""

    model: str = field(default="tiny", metadata={"help": '"tiny", a checkpoint dir / hub id, or "random" with --size'})
    size: str | None = field(default=None, metadata={"help": "2b|7b: random weights at real size (GPU)"})
    frames: int = field(default=180, metadata={"help": "frames streamed before the question"})
    fps: float = field(default=1.0, metadata={"help": "stream time between frames is 1/fps"})
    height: int = field(default=336, metadata={"help": "camera frame height"})
    width: int = field(default=448, metadata={"help": "camera frame width"})
    question: str = field(default="What happened in the video so far?", metadata={"help": "the question"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens decoded per answer"})
    repeats: int = field(default=5, metadata={"help": "questions asked on the stream (TTFT p50 over them)"})
    stateless_repeats: int = field(default=3, metadata={"help": "stock-path runs (TTFT p50 over them)"})
    device: str | None = field(default=None, metadata={"help": "cuda|cpu; None = cuda if available"})
    dtype: str | None = field(default=None, metadata={"help": "float32|bfloat16; None = bf16 on cuda"})
    attn: str | None = field(default=None, metadata={"help": "attention backend; None = auto"})
    quant: str | None = field(default=None, metadata={"help": "8bit | 4bit: the LLM through bitsandbytes (CUDA)"})
    stream_hours: float | None = field(default=None, metadata={
        "help": "instead: stream this many hours of synthetic camera through one session with the KV budget "
                "of session.budget (see --config/--set) and report memory, eviction, recall and drift"})
    ask_every: float | None = field(default=None, metadata={
        "help": "seconds of stream time between questions; None = 600 with --stream-hours, 5 with --sessions"})
    sessions: int | None = field(default=None, metadata={
        "help": "instead: N synthetic cameras through the live engine, batched against engine.batching off "
                "(frames/s, answer tokens/s, TTFT, frame latency, max_streams; README \"Engine\")"})
    seconds: float = field(default=20.0, metadata={"help": "with --sessions: wall seconds of each saturated run"})
    flood_fps: float = field(default=30.0, metadata={"help": "with --sessions: frames per second each camera "
                                                              "sends in the frame-bound run"})
    probe_seconds: float = field(default=10.0, metadata={"help": "with --sessions: wall seconds of each "
                                                                  "real-time max_streams probe"})
    max_streams_limit: int = field(default=256, metadata={"help": "with --sessions: the most cameras a "
                                                                   "max_streams probe tries"})
    transport: str = field(default="thread", metadata={
        "help": "with --sessions: the engine core in a thread of this process or in a child process (process: "
                "the batched runs also run on a thread, and process_adds_ms is the difference)"})
    against: str = field(default="off", metadata={
        "help": "with --sessions: what the batched engine is compared with in the same run: off (engine.batching "
                "off) or an engine.attention path (segments: the per-session attention loop, the previous path)"})
    no_max_streams: bool = field(default=False, metadata={"help": "with --sessions: skip the max_streams probes"})
    cluster: str | None = field(default=None, metadata={
        "help": "with --sessions: local:W runs the engine on a local Ray cluster with 1 and W workers against the "
                "in-process engine, same run (frames/s, answer tokens/s, TTFT, what Ray adds)"})
    json: bool = field(default=False, metadata={"help": "print one JSON object only"})

    def __post_init__(self) -> None:
        if self.frames < 1 or self.repeats < 1 or self.stateless_repeats < 1 or self.max_new_tokens < 2:
            raise ValueError("frames, repeats and stateless_repeats must be >= 1 and max_new_tokens >= 2")
        if self.size is not None and self.size not in ("2b", "7b"):
            raise ValueError("--size must be 2b or 7b")
        if self.fps <= 0 or (self.stream_hours is not None and self.stream_hours <= 0) or (
                self.ask_every is not None and self.ask_every <= 0):
            raise ValueError("--fps, --stream-hours and --ask-every must be > 0")
        if self.transport not in ("thread", "process"):
            raise ValueError("--transport must be thread or process")
        if self.against not in ("off", "flex", "paged", "segments", "masked", "varlen"):
            raise ValueError("--against must be off, flex, paged, segments, masked or varlen")
        if self.sessions is not None and (self.sessions < 1 or self.seconds <= 0 or self.probe_seconds <= 0
                                          or self.max_streams_limit < 1 or self.flood_fps <= 0):
            raise ValueError("--sessions, --seconds, --probe-seconds and --max-streams-limit must be > 0")


def sync(device: torch.device) -> None:
    """Wait for the device, so wall-clock timings cover the work (no-op on CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or 'x86'})"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """Current resident memory of this process in MB (the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, rounded to 0.01; None when there are none."""
    return round(float(np.percentile(np.asarray(values), q)), 2) if values else None


def _stateless(lm, frames: list[np.ndarray], prompt_ids: list[int], masks: list[torch.Tensor],
               frame_pixels: int, new_tokens: int) -> tuple[float, float]:
    """Stock path: video processor on all frames + generate(). Returns (TTFT s, decode tokens/s)."""
    import torch

    from model.frames import stock_clip_pixels

    dev = lm.device
    sync(dev)
    t0 = time.perf_counter()
    vids = stock_clip_pixels(lm.processor, frames, frame_pixels)
    inputs = dict(
        input_ids=torch.tensor([prompt_ids], device=dev),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=dev),
        pixel_values_videos=vids["pixel_values_videos"].to(dev, lm.dtype),
        video_grid_thw=vids["video_grid_thw"].to(dev),
        video_merge_sizes=vids["video_merge_sizes"].to(dev),
        video_compression_mask=torch.cat(masks).to(dev),
    )
    stamps = _Stamps(dev)
    with torch.inference_mode():
        lm.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          streamer=stamps)
    sync(dev)
    end = time.perf_counter()
    # stamps.times[0]: prompt handed over; [1]: first new token; the rest: one per decoded token
    ttft = stamps.times[1] - t0
    return ttft, (new_tokens - 1) / max(end - stamps.times[1], 1e-9)


class _Stamps:
    """A generate() streamer that only records when each token arrives."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _ask_timed(session: StreamSession, question: str, new_tokens: int) -> tuple[float, float, list[int]]:
    """One question: (TTFT s, decode tokens/s after the first token, prompt ids at the first token)."""
    dev = session.lm.device
    sync(dev)
    t0 = time.perf_counter()
    first = None
    n = 0
    prompt: list[int] = []
    for _ in session.ask(question, Sampling(max_new_tokens=new_tokens, ignore_eos=True)):
        n += 1
        if first is None:
            sync(dev)
            first = time.perf_counter()
            prompt = session.token_ids()
    sync(dev)
    end = time.perf_counter()
    return first - t0, (n - 1) / max(end - first, 1e-9), prompt


def run_bench(cfg: BenchConfig, progress=None) -> dict:
    import torch
    import transformers

    from model.checkpoints.loading import load_model
    from model.checkpoints.synthetic import SyntheticCamera
    from model.config import BudgetConfig, SessionConfig
    from model.session import StreamSession

    say = progress or (lambda msg: None)
    spec = f"random-{cfg.size}" if cfg.size else cfg.model
    say(f"loading {spec} ...")
    lm = load_model(spec, device=cfg.device, dtype=cfg.dtype, attn=cfg.attn, quant=cfg.quant)
    dev = lm.device
    say(f"model on {device_name(dev)} ({str(lm.dtype).removeprefix('torch.')}, attention {lm.attn}"
        f"{', ' + cfg.quant if cfg.quant else ''}); warming up")
    # No eviction here: the stock path must see exactly the tokens the session holds.
    scfg = SessionConfig(frame_pixels=cfg.height * cfg.width, budget=BudgetConfig(max_tokens=None))
    cam = SyntheticCamera(cfg.height, cfg.width)
    frames = [cam.frame(i / cfg.fps) for i in range(cfg.frames)]
    rss_start = rss_mb()

    # warm-up (kernels, allocator, tokenizer caches) on a throwaway session
    warm = StreamSession(lm, scfg)
    warm_masks = [torch.from_numpy(warm.add_frame(frames[i], t=i / cfg.fps).keep_mask.reshape(-1)) for i in range(2)]
    warm_prompt = _ask_timed(warm, cfg.question, 2)[2]
    _stateless(lm, frames[:2], warm_prompt, warm_masks, scfg.frame_pixels, 2)
    del warm

    session = StreamSession(lm, scfg)
    ingest_ms, masks, kept, total = [], [], 0, 0
    for i, f in enumerate(frames):
        sync(dev)
        t0 = time.perf_counter()
        r = session.add_frame(f, t=i / cfg.fps)
        sync(dev)
        ingest_ms.append((time.perf_counter() - t0) * 1e3)
        masks.append(torch.from_numpy(r.keep_mask.reshape(-1)))
        kept, total = kept + r.tokens_kept, total + r.tokens_total
        if (i + 1) % 30 == 0 or i + 1 == cfg.frames:
            say(f"ingested {i + 1}/{cfg.frames} frames, cache {r.cache_len} tokens")
    frames_cache_len = session.cache_len

    ttfts, rates, prompt_ids = [], [], []
    for k in range(cfg.repeats):
        ttft, rate, prompt = _ask_timed(session, cfg.question, cfg.max_new_tokens)
        ttfts.append(ttft * 1e3)
        rates.append(rate)
        if k == 0:
            prompt_ids = prompt
    say(f"stream: TTFT p50 {statistics.median(ttfts):.1f} ms; running the stock path "
        f"({cfg.stateless_repeats} runs over {cfg.frames} frames)")

    st_ttft, st_rates = [], []
    for _ in range(cfg.stateless_repeats):
        ttft, rate = _stateless(lm, frames, prompt_ids, masks, scfg.frame_pixels, cfg.max_new_tokens)
        st_ttft.append(ttft * 1e3)
        st_rates.append(rate)
        say(f"stock path: run {len(st_ttft)}/{cfg.stateless_repeats}, TTFT {ttft * 1e3:.0f} ms")

    out = {
        "device": device_name(dev),
        "model": spec, "dtype": str(lm.dtype).removeprefix("torch."), "attn": lm.attn, "quant": cfg.quant,
        "frames": cfg.frames, "fps": cfg.fps, "frame_size": [cfg.height, cfg.width],
        "frame_ingest_ms_p50": percentile(ingest_ms, 50),
        "frame_ingest_ms_p95": percentile(ingest_ms, 95),
        "ttft_stream_ms_p50": round(statistics.median(ttfts), 3),
        "ttft_stateless_ms_p50": round(statistics.median(st_ttft), 3),
        "ttft_ratio": round(statistics.median(st_ttft) / statistics.median(ttfts), 2),
        "decode_tok_s": round(statistics.median(rates), 2),
        "decode_tok_s_stock": round(statistics.median(st_rates), 2),
        "decode_ratio": round(statistics.median(rates) / statistics.median(st_rates), 3),
        "tokens_kept_ratio": round(kept / total, 4),
        "cache_len_after_frames": frames_cache_len,
        "prompt_tokens": len(prompt_ids),
        "rss_mb_start": round(rss_start, 1), "rss_mb_peak": round(peak_rss_mb(), 1),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if dev.type == "cuda":
        out["gpu_mem_peak_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return out


HELP = "benchmark the streaming session against stock transformers"


def add_arguments(p) -> None:
    add_dataclass_arguments(p, BenchConfig)


def run(args) -> int:
    import json
    import sys

    cfg = dataclass_from_args(BenchConfig, args)
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  (stdout: the JSON)
    if cfg.cluster is not None:
        if cfg.sessions is None:
            raise ValueError("--cluster goes with --sessions N")
        from .bench_cluster import run_cluster_bench

        result = run_cluster_bench(cfg, load_config(args.config, args.overrides), progress)
    elif cfg.sessions is not None:
        from .bench_sessions import run_sessions_bench

        result = run_sessions_bench(cfg, load_config(args.config, args.overrides), progress)
    elif cfg.stream_hours is not None:
        from .bench_stream import run_stream_bench

        result = run_stream_bench(cfg, load_config(args.config, args.overrides).session, progress)
    else:
        result = run_bench(cfg, progress=progress)
    print(json.dumps(result) if cfg.json else json.dumps(result, indent=2))
    return 0
