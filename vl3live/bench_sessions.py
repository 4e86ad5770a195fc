"""``vl3live bench --sessions N``: many synthetic cameras through the ``Engine``, batched against
``engine.batching: off`` in the same run.

Three measurements; the first two run in both modes, on the same model, pool and inputs, for
``--seconds`` of wall time each:

* **frames** (frame-bound): every camera sends ``--flood-fps`` frames per second (far more than
  the engine takes; the newest wins, the rest are counted dropped), no questions. Reports
  frames/s processed and per-frame latency p50/p99 (arrival to its stats event).
* **answers** (answer-bound): cameras at ``--fps`` in wall time, and every session asks again as
  soon as its answer ends. Reports answer tokens/s and TTFT p50/p99.
* **Real time** (``max_streams``): N cameras at ``--fps`` in wall time, questions as above; a run
  keeps up when at least 95 % of the frames offered are processed and TTFT p99 is under 250 ms.
  N doubles from ``--sessions`` while it keeps up (up to ``--max-streams-limit``), then bisects;
  each probe runs ``--probe-seconds``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from model.checkpoints.synthetic import SyntheticCamera
from model.executor import default_attention
from model.sampling import Sampling
from streamer.engine import Engine
from streamer.events import FrameStats, ResponseDelta, ResponseDone
from streamer.sources import Frame

from .bench import BenchConfig, device_name, percentile
from .config import Config

TTFT_GOAL_MS = 250.0
KEEP_UP = 0.95


async def drive_cameras(eng: Engine, n: int, cfg: BenchConfig, seconds: float, fps: float,
                 keep_asking: bool = False, asking: bool = True) -> dict:
    """Run ``n`` cameras sending ``fps`` frames per second for ``seconds``; questions every
    ``ask_every`` seconds of stream time or, with ``keep_asking``, each right after the last answer
    (driven by the engine's events, so the bench itself takes next to no CPU). What the engine did."""
    sessions = [await eng.open_session() for _ in range(n)]
    index = {session.id: i for i, session in enumerate(sessions)}
    cams = [SyntheticCamera(cfg.height, cfg.width, seed=i) for i in range(n)]
    shots = [[cam.frame(k * 0.7) for k in range(6)] for cam in cams]
    period = 1.0 / fps
    every = max(1, round((cfg.ask_every or 5.0) * fps))  # frames between questions
    offered, sent = [0] * n, [0] * n
    ttft: list[float] = []
    latency: list[float] = []
    tokens = [0]
    running = [True]
    last_delta: dict[int, float] = {}
    intervals: list[float] = []  # ms between one session's consecutive answer tokens, as the client sees them

    def ask(i: int) -> None:
        session = sessions[i]
        if running[0] and not session.counts.questions_waiting and not session.sent_questions \
                and not eng.answering(session):
            eng.ask(session, cfg.question, Sampling(max_new_tokens=cfg.max_new_tokens))

    def push(i: int) -> None:
        if not running[0]:
            return
        k = sent[i]
        sent[i] += 1
        eng.push_frame(sessions[i], Frame(k * period, shots[i][k % 6]))
        offered[i] += 1
        if asking and not keep_asking and k % every == every - 1:
            ask(i)

    def observe(ev) -> None:
        i = index.get(ev.session)
        if i is None:
            return
        match ev:
            case ResponseDelta():
                tokens[0] += 1
                now = time.perf_counter()
                if i in last_delta:
                    intervals.append((now - last_delta[i]) * 1e3)
                last_delta[i] = now
            case ResponseDone():
                last_delta.pop(i, None)
                if ev.ttft_ms is not None:
                    ttft.append(ev.ttft_ms)
                if keep_asking:
                    ask(i)
            case FrameStats():
                latency.append(ev.latency_ms)
    eng.bus.observe(observe)

    async def camera(i: int) -> None:
        phase = period * i / n  # cameras are not in step with each other
        while running[0]:
            await asyncio.sleep(max(0.0, start + phase + sent[i] * period - time.perf_counter()))
            if time.perf_counter() < end:
                push(i)
    steps0 = eng.stats()
    start = time.perf_counter()
    end = start + seconds
    for i in range(n):
        if keep_asking:
            ask(i)
    cameras = [asyncio.create_task(camera(i)) for i in range(n)]
    await asyncio.sleep(seconds)
    running[0] = False
    wall = time.perf_counter() - start
    for c in cameras:
        c.cancel()
    await asyncio.gather(*cameras, return_exceptions=True)
    processed = sum([(await eng.snapshot(session)).state.counts.processed for session in sessions])
    snap = await eng.snapshot()
    steps1 = eng.stats()
    ran = [(sum(rows.values()), host) for (k, rows, _), host in zip(snap.recent_steps, snap.host_ms)
           if k > steps0.steps and rows]
    host_us_per_row = [1e3 * host / n for n, host in ran]
    for session in sessions:
        eng.cancel(session)
    for session in sessions:
        await eng.settled(session, timeout=120)
    for session in sessions:
        await eng.close_session(session.id)
    steps = steps1.steps - steps0.steps
    return {"sessions": n, "seconds": round(wall, 2), "frames_offered": sum(offered), "frames_processed": processed,
            "frames_per_s": round(processed / wall, 2), "answer_tokens": tokens[0],
            "answer_tokens_per_s": round(tokens[0] / wall, 2), "answers": len(ttft),
            "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
            "frame_latency_ms_p50": percentile(latency, 50), "frame_latency_ms_p99": percentile(latency, 99),
            "steps": steps, "items_per_step": round((steps1.step_items - steps0.step_items) / max(steps, 1), 2),
            "token_interval_ms_p50": percentile(intervals, 50),
            "host_us_per_row_p50": percentile(host_us_per_row, 50),
            "host_ms_per_step_p50": percentile([h for _, h in ran], 50),
            "kept_up": processed >= KEEP_UP * sum(offered)}


def _ok(run: dict) -> bool:
    return run["kept_up"] and (run["ttft_ms_p99"] is None or run["ttft_ms_p99"] < TTFT_GOAL_MS)


async def _engine_run(lm, config: Config, batching: bool, coro, transport: str = "thread",
                      attention: str | None = None):
    engine_cfg = dataclasses.replace(config.engine, batching=batching, fps=1e6,
                                     attention=attention or config.engine.attention)
    if transport == "process":  # the child loads the same model by its spec
        from streamer.core.process import ProcessEngine

        eng = ProcessEngine.like(lm, config.model, engine_cfg, config.session, config.server.max_sessions)
    else:
        eng = Engine(lm, engine_cfg, config.session, config.server.max_sessions)
    async with eng:
        return await coro(eng), eng.stats().pool


def run_sessions_bench(cfg: BenchConfig, config: Config, progress=None) -> dict:
    """The ``--sessions`` benchmark (module doc); one JSON-able dict."""
    import torch

    from model.checkpoints.loading import load_model

    say = progress or (lambda _msg: None)
    n = cfg.sessions
    spec = f"random-{cfg.size}" if cfg.size else cfg.model
    say(f"bench: loading {spec} ...")
    lm = load_model(spec, device=cfg.device, dtype=cfg.dtype, attn=cfg.attn, quant=cfg.quant)
    limit = max(cfg.max_streams_limit, n)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, max_sessions=limit))
    out: dict = {"model": spec, "device": device_name(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                 "attn": lm.attn, "sessions": n, "fps": cfg.fps, "flood_fps": cfg.flood_fps, "ask_every": cfg.ask_every or 5.0,
                 "frame_size": [cfg.height, cfg.width], "frame_pixels": config.session.frame_pixels,
                 "max_new_tokens": cfg.max_new_tokens, "max_step_tokens": config.engine.max_step_tokens,
                 "torch": torch.__version__}
    out["transport"] = cfg.transport
    base = "off" if cfg.against == "off" else "previous"  # what "ratios" compare the batched engine with
    out["against"] = cfg.against
    modes = [("batched", True, cfg.transport, None),
             (base, cfg.against != "off", cfg.transport, None if cfg.against == "off" else cfg.against)]
    if cfg.transport == "process":  # what the process boundary adds, against the core in a thread, same run
        modes.append(("batched_thread", True, "thread", None))
    for mode, batching, transport, attention in modes:
        loads = [("frames", cfg.flood_fps, False), ("answers", cfg.fps, True)]
        if cfg.transport == "process" and batching:  # frames at --fps, no questions: the transport's own cost
            loads.append(("paced", cfg.fps, False))
        for load, fps, keep in loads:
            say(f"bench: {n} sessions, {load}-bound, batching {'on' if batching else 'off'}, core in a {transport}, "
                f"attention {attention or 'default'}, {cfg.seconds:g} s ...")
            run, pool = asyncio.run(_engine_run(
                lm, config, batching, lambda eng, f=fps, k=keep: drive_cameras(eng, n, cfg, cfg.seconds, f, k, asking=k),
                transport, attention))
            run["attention"] = attention or config.engine.attention or default_attention(lm)
            out.setdefault(mode, {})[load] = run
    if cfg.transport == "process":
        p, t = out["batched"], out["batched_thread"]

        def added(load: str, key: str) -> float | None:
            x, y = p[load][key], t[load][key]
            return round(x - y, 3) if x is not None and y is not None else None
        out["process_adds_ms"] = {"per_frame_latency_p50": added("paced", "frame_latency_ms_p50"),
                                  "per_frame_latency_p50_flooded": added("frames", "frame_latency_ms_p50"),
                                  "per_answer_token_p50": added("answers", "token_interval_ms_p50")}
    out["pool_bytes_per_token"] = pool.bytes_per_token
    out["pool_tokens"] = pool.pool_tokens
    budget = config.session.budget.max_tokens or lm.model.config.text_config.max_position_embeddings
    out["pool_bytes_per_session"] = -(-budget // pool.page_tokens) * pool.page_tokens * pool.bytes_per_token
    b, o = out["batched"], out[base]

    def ratio(load: str, key: str) -> float | None:
        x, y = b[load][key], o[load][key]
        return round(x / y, 3) if x and y else None
    out["ratios"] = {"frames_per_s": ratio("frames", "frames_per_s"),
                     "answer_tokens_per_s": ratio("answers", "answer_tokens_per_s"),
                     "ttft_p99": ratio("answers", "ttft_ms_p99"),
                     "frame_latency_p99": ratio("frames", "frame_latency_ms_p99"),
                     "host_us_per_row_p50": ratio("answers", "host_us_per_row_p50")}
    if not cfg.no_max_streams:
        out["max_streams"], out["max_streams_probes"] = _max_streams(lm, config, cfg, say)
    return out


def _max_streams(lm, config: Config, cfg: BenchConfig, say) -> tuple[int, list[dict]]:
    """The largest N that keeps up in real time with TTFT p99 under the goal (batched)."""
    probes: list[dict] = []

    def probe(k: int) -> bool:
        say(f"bench: max_streams probe: {k} cameras at {cfg.fps:g} fps for {cfg.probe_seconds:g} s ...")
        run, _ = asyncio.run(_engine_run(lm, config, True,
                                         lambda eng: drive_cameras(eng, k, cfg, cfg.probe_seconds, cfg.fps)))
        probes.append({k2: run[k2] for k2 in ("sessions", "frames_offered", "frames_processed", "ttft_ms_p99",
                                             "kept_up")})
        return _ok(run)

    k, good, bad = max(1, cfg.sessions), 0, None
    limit = max(cfg.max_streams_limit, k)
    while k <= limit:
        if probe(k):
            good = k
            if k == limit:
                break
            k = min(2 * k, limit)
        else:
            bad = k
            break
    if good == 0 and bad is not None:  # even the first failed: search below it
        lo, hi = 0, bad
    else:
        lo, hi = good, bad
    while hi is not None and hi - lo > max(1, lo // 8):  # bisect to within 1/8
        mid = (lo + hi) // 2
        if mid == 0:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes

