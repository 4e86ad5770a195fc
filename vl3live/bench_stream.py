"""``vl3live bench --stream-hours H``: hours of synthetic camera through one budgeted session.

Proves the KV budget by measurement: the cache never passes ``session.budget.max_tokens``,
process memory stays flat (RSS at the start, middle and end), and per-frame ingest time does not
drift (median over frames 10-20 % against the last 10 %), in wall time and in process CPU time
(which a shared machine's noisy neighbours do not inflate). A question every ``ask_every`` seconds
of stream time exercises recall.
"""

from __future__ import annotations

import ctypes
import dataclasses
import statistics
import time

import torch
import transformers

from model.checkpoints.loading import load_model
from model.checkpoints.synthetic import SyntheticCamera
from model.config import SessionConfig
from model.sampling import Sampling
from model.session import StreamSession
from vl3live.bench import device_name, rss_mb, sync


def _trimmed_rss_mb() -> float | None:
    """RSS after glibc returns its free heap pages (malloc_trim): what is left once allocator slack is gone."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return round(rss_mb(), 1)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


def run_stream_bench(cfg, session_cfg: SessionConfig, progress=None) -> dict:
    """Stream ``cfg.stream_hours`` of synthetic video at ``cfg.fps``; return the figures as a dict."""
    budget = session_cfg.budget
    if budget.max_tokens is None:
        raise ValueError("--stream-hours needs a KV budget: set session.budget.max_tokens")
    n = int(round(cfg.stream_hours * 3600 * cfg.fps))
    if n < 20:
        raise ValueError(f"--stream-hours {cfg.stream_hours} at --fps {cfg.fps} is {n} frames; need at least 20")
    spec = f"random-{cfg.size}" if cfg.size else cfg.model
    lm = load_model(spec, device=cfg.device, dtype=cfg.dtype, attn=cfg.attn, quant=cfg.quant)
    dev = lm.device
    scfg = dataclasses.replace(session_cfg, frame_pixels=cfg.height * cfg.width)
    session = StreamSession(lm, scfg)
    cam = SyntheticCamera(cfg.height, cfg.width)
    ask_every = max(1, int(round((cfg.ask_every or 600.0) * cfg.fps)))
    ingest_ms, ingest_cpu_ms, rss = [], [], {}
    max_cache, kept, total, questions, full_frame = 0, 0, 0, 0, None
    start = time.perf_counter()
    for i in range(n):
        t = i / cfg.fps
        frame = cam.frame(t)
        sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        r = session.add_frame(frame, t)
        sync(dev)
        ingest_ms.append((time.perf_counter() - t0) * 1e3)
        ingest_cpu_ms.append((time.process_time() - c0) * 1e3)
        max_cache = max(max_cache, r.cache_len)
        kept, total = kept + r.tokens_kept, total + r.tokens_total
        if (i + 1) % ask_every == 0:
            for _ in session.ask(cfg.question, Sampling(max_new_tokens=cfg.max_new_tokens)):
                max_cache = max(max_cache, session.cache_len)
            questions += 1
        if "full" not in rss and session.evicted_frames:
            rss["full"] = rss_mb()  # the cache reached the budget: from here on memory should stay flat
            full_frame = i
        if i == 0:
            rss["start"] = rss_mb()
        elif i == n // 2:
            rss["mid"] = rss_mb()
        if progress and (i + 1) % max(1, n // 20) == 0:
            st = session.stats()
            progress(f"{i + 1}/{n} frames ({t / 3600:.2f} h): cache {r.cache_len}/{st.max_tokens}, "
                     f"evicted {st.evicted_frames}, stored {st.recall_stored}, rss {rss_mb():.0f} MB, "
                     f"ingest p50 {statistics.median(ingest_ms[-max(1, n // 20):]):.1f} ms")
    rss["end"] = rss_mb()
    rss["trimmed"] = _trimmed_rss_mb()
    early, late = ingest_ms[n // 10: n // 5], ingest_ms[n - n // 10:]
    early_cpu, late_cpu = ingest_cpu_ms[n // 10: n // 5], ingest_cpu_ms[n - n // 10:]
    st = session.stats()
    out = {
        "device": device_name(dev),
        "model": spec, "dtype": str(lm.dtype).removeprefix("torch."), "layout": scfg.layout,
        "stream_hours": cfg.stream_hours, "fps": cfg.fps, "frames": n, "frame_size": [cfg.height, cfg.width],
        "budget_tokens": session.max_tokens, "max_cache_len": max_cache,
        "evicted_frames": st.evicted_frames, "evicted_exchanges": st.evicted_exchanges,
        "recall": scfg.budget.recall, "questions": questions, "recalled_frames": st.recalled_frames,
        "recall_stored": st.recall_stored, "recall_dropped": st.recall_dropped,
        "recall_mb": round(st.recall_mb, 2),
        "ingest_ms_p50_early": _median(early), "ingest_ms_p50_late": _median(late),
        "ingest_drift": round(statistics.median(late) / statistics.median(early), 3),
        "ingest_cpu_ms_p50_early": _median(early_cpu), "ingest_cpu_ms_p50_late": _median(late_cpu),
        "ingest_cpu_drift": round(statistics.median(late_cpu) / statistics.median(early_cpu), 3),
        "rss_mb_start": round(rss["start"], 1), "rss_mb_budget_full": round(rss.get("full", float("nan")), 1),
        "budget_full_at_frame": full_frame, "rss_mb_mid": round(rss.get("mid", rss["start"]), 1),
        "rss_mb_end": round(rss["end"], 1), "rss_mb_end_trimmed": rss["trimmed"], "tokens_kept_ratio": round(kept / total, 4),
        "wall_s": round(time.perf_counter() - start, 1),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if dev.type == "cuda":
        out["gpu_mem_peak_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return out
