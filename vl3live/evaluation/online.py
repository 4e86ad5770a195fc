"""The online protocol: one live session per video (of each annotation file), questions asked into it at their times.

A video's frames are streamed by pts at ``fps`` into one engine session. Before the first frame
past a probe's time, the probe is asked into that same session and answered from everything the
session holds (its KV cache), then the stream goes on. Stream time stands still while the model
answers, so no frame is dropped and a run is repeatable (a live camera would keep sending; the
engine's latest-frame slot would drop what arrives meanwhile). A proactive item sets the standing
instruction at its time; what the model says by itself until the end of its window is scored
(``formats.score_proactive``). Many videos run as parallel sessions of one engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from model.sampling import Sampling
from model.video import read_video_file
from streamer.engine import Engine
from streamer.events import Alert, FrameStats, ResponseDone
from streamer.sources import Frame

from .formats import PROACTIVE_WINDOW, Probe, VideoJob, parse, score_proactive


def result(probe: Probe, protocol: str, answer: str | None, **extra: object) -> dict:
    """One scored probe, as a results line."""
    out = {"key": probe.key, "benchmark": probe.benchmark, "task": probe.task, "category": probe.category,
           "protocol": protocol, "video": str(probe.video), "time": probe.time, "kind": probe.kind,
           "expected": probe.expected, "answer": answer}
    if probe.kind != "proactive":
        parsed = parse(probe.kind, answer) if answer is not None else None
        out.update(parsed=parsed, unparsable=parsed is None, correct=parsed == probe.expected)
    out.update(extra)
    return out


class _Stream:
    """One video's session: its events, its answers, the instruction window in force."""

    def __init__(self, engine: Engine, session, sink: Callable[[dict], None], max_new_tokens: int):
        self.engine, self.session, self.sink = engine, session, sink
        self.sub = engine.bus.subscribe(session.id, maxsize=1 << 20)
        self.sampling = Sampling(max_new_tokens=max_new_tokens)
        self.done: dict[str, ResponseDone] = {}
        self.alerts: list[tuple[float, str]] = []
        self.kept = 0  # visual tokens kept by DiffFP so far
        self.cache_len = 0
        self.proactive: Probe | None = None

    def drain(self) -> None:
        while (ev := self.sub.get_nowait()) is not None:
            match ev:
                case FrameStats():
                    self.kept += ev.tokens_kept
                    self.cache_len = ev.cache_len
                case ResponseDone():
                    self.done[ev.response_id] = ev
                case Alert():
                    self.alerts.append((ev.t or 0.0, ev.text))

    async def frame(self, pts: float, rgb) -> None:
        self.engine.push_frame(self.session, Frame(pts, rgb))
        await self.engine.settled(self.session, timeout=600)
        self.drain()
        if self.proactive is not None and pts > self.proactive.due + PROACTIVE_WINDOW:
            self.close_window()

    async def ask(self, probe: Probe) -> None:
        if probe.kind == "proactive":
            self.close_window()
            self.alerts = []
            self.proactive = probe
            self.engine.set_instruction(self.session, probe.question)
            # its acknowledgement is in the cache before the next frame, as the question is asked before that
            # frame comes (pushed at once, the frame went first: the worker takes a frame before a question)
            await self.engine.settled(self.session, timeout=600)
            self.drain()
            return
        started = time.perf_counter()
        rid = self.engine.ask(self.session, probe.prompt, self.sampling)
        await self.engine.settled(self.session, timeout=600)
        self.drain()
        done = self.done.pop(rid, None)
        self.sink(result(probe, "online", done.text if done else None,
                         ttft_ms=round(done.ttft_ms, 2) if done and done.ttft_ms is not None else None,
                         answer_ms=round((time.perf_counter() - started) * 1e3, 2),
                         tokens_kept=self.kept, cache_len=self.cache_len))

    def close_window(self) -> None:
        probe, self.proactive = self.proactive, None
        if probe is None:
            return
        self.engine.set_instruction(self.session, None)
        spoken = [(t, text) for t, text in self.alerts if t >= probe.time]
        self.sink(result(probe, "online", spoken[0][1] if spoken else None, alerts=len(spoken),
                         **score_proactive(probe, spoken)))


async def run_job(engine: Engine, job: VideoJob, fps: float, sink: Callable[[dict], None],
                  max_new_tokens: int = 16) -> None:
    """Stream ``job``'s video into a new session and ask its probes at their times."""
    session = await engine.open_session()
    s = _Stream(engine, session, sink, max_new_tokens)
    try:
        probes = list(job.probes)
        frames = await asyncio.to_thread(lambda: list(read_video_file(job.video, fps=fps)))
        for f in frames:
            while probes and probes[0].time < f.pts_seconds:  # the frames up to its time are in
                await s.ask(probes.pop(0))
            await s.frame(f.pts_seconds, f.rgb)
        for p in probes:  # asked after the last frame
            await s.ask(p)
        s.close_window()
    finally:
        s.sub.close()
        await engine.close_session(session.id)


async def run_online(engine: Engine, work: list[VideoJob], fps: float, sink: Callable[[dict], None],
                     parallel: int = 1, max_new_tokens: int = 16) -> None:
    """Every job, ``parallel`` at a time, as sessions of one engine."""
    gate = asyncio.Semaphore(max(1, parallel))

    async def one(job: VideoJob) -> None:
        async with gate:
            await run_job(engine, job, fps, sink, max_new_tokens)
    await asyncio.gather(*(one(job) for job in work))
