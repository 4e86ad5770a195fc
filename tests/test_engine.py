"""The live engine: latest-wins backpressure, fair interleaving, questions and alerts mid-stream, shutdown."""

import asyncio
import threading

import numpy as np
import pytest

from model.checkpoints.synthetic import SyntheticCamera
from model.sampling import Sampling
from streamer.bus import EventBus
from streamer.engine import EngineError
from streamer.events import (
    Alert,
    Error,
    FrameCounts,
    FrameStats,
    ResponseCreated,
    ResponseDelta,
    ResponseDone,
)
from streamer.sources import Frame
from tests.conftest import eventually
from tests.engines import TRANSPORTS, engine_for
from vl3live.bench import rss_mb
from vl3live.config import Config


def _config(**engine):
    cfg = Config()
    cfg.session.frame_pixels = 84 * 112
    for k, v in engine.items():
        setattr(cfg.engine, k, v)
    return cfg


async def _camera(n, fps, size=(84, 112), pace=0.0, burst=1):
    """A source far faster than the model: a few camera frames, re-sent with increasing pts
    (``burst`` frames back to back, then a pause of ``pace`` seconds)."""
    cam = SyntheticCamera(*size)
    shots = [cam.frame(i * 1.3) for i in range(8)]
    for i in range(n):
        yield Frame(i / fps, shots[i % 8])
        if (i + 1) % burst == 0:
            await asyncio.sleep(pace)


def _drain(sub):
    out = []
    while (e := sub.get_nowait()) is not None:
        out.append(e)
    return out


def test_backpressure_keeps_the_latest_frame_and_counts_every_drop(lm):
    async def main():
        cfg = _config(fps=1000.0)
        cfg.session.frame_pixels = 448 * 336  # whole 448x336 frames: the model takes ~10 ms+ each
        async with engine_for(lm, cfg) as eng:
            session = await eng.open_session()
            await asyncio.sleep(0)
            before = rss_mb()
            # 0.45 MB frames, at least 10x faster than the model takes them
            await eng.attach(session, _camera(1500, 1000.0, size=(336, 448), pace=0.0005, burst=4))
            assert await eventually(lambda: session.processed + session.dropped == session.accepted), session.counters()
            grown = rss_mb() - before
            c = session.counters()
            assert c.accepted == 1500 and c.sampled_out == 0 and c.refused == c.pending == 0
            assert c.source_frames == 1500 and eng.frame_counts().accepted == 1500
            assert c.dropped == c.accepted - c.processed
            assert c.processed >= 10 and c.dropped >= 9 * c.processed  # produced >= 10x processed
            assert grown < 150, f"RSS grew {grown:.0f} MB over 1500 frames of 0.45 MB"
            assert (await eng.snapshot(session)).state.last_t == pytest.approx(1499 / 1000.0)  # the newest won
    asyncio.run(main())


def test_sampler_uses_pts_not_arrival_time(lm):
    async def main():
        async with engine_for(lm, _config(fps=2.0)) as eng:
            session = await eng.open_session()
            sub = eng.bus.subscribe(session.id, maxsize=1000)
            for i in range(40):  # 10 fps of pts, pushed one by one as the model takes them
                eng.push_frame(session, Frame(i / 10, np.full((84, 112, 3), i * 5, np.uint8)))
                await eng.settled(session)
            ts = [e.t for e in _drain(sub) if isinstance(e, FrameStats)]
            assert ts == [i / 2 for i in range(8)] and session.sampled_out == 32 and session.dropped == 0
    asyncio.run(main())


def test_a_long_answer_does_not_hold_another_stream_back(lm):
    async def main():
        async with engine_for(lm, _config(fps=1000.0, max_new_tokens=48)) as eng:
            a, b = await eng.open_session(), await eng.open_session()
            sub = eng.bus.subscribe(maxsize=100000)
            eng.push_frame(a, Frame(0.0, SyntheticCamera(84, 112).frame(0.0)))
            assert await eventually(lambda: a.processed == 1)
            feed = eng.attach(b, _camera(100000, 100.0, pace=0.001))
            rid = eng.ask(a, "Describe everything in detail.", Sampling(max_new_tokens=48))
            assert await eventually(lambda: any(isinstance(e, ResponseDone) for e in sub.peek()), timeout=120)
            feed.cancel()
            events = _drain(sub)
            start = next(i for i, e in enumerate(events) if isinstance(e, ResponseCreated))
            end = next(i for i, e in enumerate(events) if isinstance(e, ResponseDone))
            window = [e for e in events[start:end] if isinstance(e, (ResponseDelta, FrameStats))]
            deltas = [e for e in window if e.session == a.id]
            b_stats = [e for e in window if e.session == b.id]
            assert len(deltas) >= 10 and all(e.response_id == rid for e in deltas)
            assert all(e.t == 0.0 for e in deltas)  # tagged with the stream time asked about (a's last frame)
            # a's answer and b's frames share the steps: a decodes in every one of them, and b (whose next
            # frame is preprocessed on its own thread meanwhile) ingests in nearly all
            steps = [rows for _, rows, _ in await eng.recent_steps()]
            first = next(i for i, rows in enumerate(steps) if a.id in rows and b.id in rows)
            last = max(i for i, rows in enumerate(steps) if a.id in rows)
            answer = steps[first: last + 1]
            assert len(answer) >= 10 and all(a.id in rows for rows in answer)
            assert sum(b.id in rows for rows in answer) >= 0.75 * len(answer)
            assert len(b_stats) >= 0.75 * len(deltas)
    asyncio.run(main())


def test_frames_arriving_during_an_answer_go_in_right_after_it(lm):
    async def main():
        async with engine_for(lm, _config(fps=1000.0, max_new_tokens=400)) as eng:
            session = await eng.open_session()
            sub = eng.bus.subscribe(session.id, maxsize=100000)
            shots = [SyntheticCamera(84, 112).frame(i * 0.1) for i in range(30)]
            eng.push_frame(session, Frame(0.0, shots[0]))
            assert await eventually(lambda: session.processed == 1)
            eng.ask(session, "What is there?", Sampling(max_new_tokens=400))
            assert await eventually(lambda: eng.answering(session))
            for i in range(1, 30):
                eng.push_frame(session, Frame(i * 0.1, shots[i]))
            await eng.settled(session)
            events = [e for e in _drain(sub) if isinstance(e, (FrameStats, ResponseCreated, ResponseDone))]
            assert [type(e) for e in events] == [FrameStats, ResponseCreated, ResponseDone, FrameStats]
            assert events[-1].t == pytest.approx(2.9)  # the newest frame, right after the answer
            assert session.dropped == 28 and session.processed == 2
    asyncio.run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_requests_are_refused_and_the_stream_goes_on(lm, transport):
    async def main():
        async with engine_for(lm, _config(max_queued_questions=2, max_question_chars=50), transport) as eng:
            session = await eng.open_session()
            sub = eng.bus.subscribe(session.id)
            with pytest.raises(EngineError, match="limit is 50"):
                eng.ask(session, "x" * 51)
            with pytest.raises(EngineError, match="non-empty"):
                eng.ask(session, "  ")
            # queued at once: the third is refused before the core has started any
            eng.ask(session, "one?", Sampling(max_new_tokens=2))
            eng.ask(session, "two?", Sampling(max_new_tokens=2))
            with pytest.raises(EngineError, match="already waiting"):
                eng.ask(session, "three?")
            eng.push_frame(session, Frame(0.0, np.zeros((84, 112, 3), np.float32)))  # wrong dtype
            assert await eventually(lambda: session.errors >= 1)
            eng.push_frame(session, Frame(1.0, np.zeros((84, 112, 3), np.uint8)))
            assert await eventually(lambda: session.processed == 1)
            await eng.settled(session)
            events = _drain(sub)
            err = next(e for e in events if isinstance(e, Error))
            assert err.code == "bad_frame" and "uint8" in err.message
            assert sum(isinstance(e, ResponseDone) for e in events) == 2
            with pytest.raises(EngineError, match="no session"):
                eng.get("nope")
            for bad, field in (({"temperature": 0}, "temperature"), ({"top_p": 1.5}, "top_p"),
                               ({"beam": 2}, "beam"), ({"seed": "x"}, "seed")):
                with pytest.raises((ValueError, TypeError), match=field):  # refused when the value is made
                    eng.update(session, sampling=session.sampling.replace(**bad))
            with pytest.raises(EngineError, match="at most 256"):
                eng.update(session, sampling=Sampling(max_new_tokens=257))
            with pytest.raises(EngineError, match="fps"):
                eng.update(session, fps=0)
            with pytest.raises(EngineError, match="unexpected keyword"):
                eng.update(session, colour="red")
            assert session.sampling == Sampling(max_new_tokens=256) and session.settings.fps == 1.0  # nothing changed
            eng.update(session, sampling=session.sampling.replace(do_sample=True, temperature=0.7, seed=1), fps=4.0)
            assert session.sampling.temperature == 0.7 and session.settings.fps == 4.0
            assert (await eng.snapshot(session)).settings.fps == 4.0  # the core has them too
    asyncio.run(main())


async def _run_with_instruction(eng, instruction, seconds):
    """One frame per stream second with a standing instruction; all events once everything settled."""
    session = await eng.open_session()
    sub = eng.bus.subscribe(session.id, maxsize=100000)
    eng.set_instruction(session, instruction)
    for i in range(seconds):
        eng.push_frame(session, Frame(float(i), SyntheticCamera(84, 112).frame(float(i))))
        await eng.settled(session)
    return session, _drain(sub)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_proactive_stream_layout_speaks_on_its_own_decision_with_a_cooldown(lm, transport):
    async def main():
        cfg = _config(fps=1000.0, proactive_threshold=0.0, proactive_cooldown=3.0, proactive_max_new_tokens=3)
        cfg.session.layout = "stream"
        async with engine_for(lm, cfg, transport) as eng:
            session, events = await _run_with_instruction(eng, "Tell me when something red appears.", 12)
            alerts = [e for e in events if isinstance(e, Alert)]
            assert len(alerts) >= 3 and all(b.t - a.t >= 3.0 for a, b in zip(alerts, alerts[1:]))
            assert sum(isinstance(e, FrameStats) for e in events) == 12  # frame stats kept coming
            created = [e for e in events if isinstance(e, ResponseCreated)]
            assert created[0].question == "Tell me when something red appears."  # asked once, pinned
            assert all(e.proactive for e in created[1:])
            assert (await eng.snapshot(session)).stats.pinned_tokens > 0  # the instruction stays in the cache
            # a new instruction is answered at once: the cooldown is between answers to one instruction
            sub = eng.bus.subscribe(session.id, maxsize=100000)
            eng.set_instruction(session, "Tell me when something blue appears.")
            assert 11.5 - alerts[-1].t < 3.0
            eng.push_frame(session, Frame(11.5, SyntheticCamera(84, 112).frame(11.5)))
            await eng.settled(session)
            new = [e for e in _drain(sub) if isinstance(e, Alert)]
            assert [(e.t, e.instruction) for e in new] == [(11.5, "Tell me when something blue appears.")]
    asyncio.run(main())


def test_proactive_video_turn_reasks_and_alerts_only_on_news(lm):
    async def main():
        cfg = _config(fps=1000.0, proactive_every=4.0, proactive_max_new_tokens=4)
        async with engine_for(lm, cfg) as eng:
            session, events = await _run_with_instruction(eng, "Is anyone at the door?", 13)
            alerts = [e for e in events if isinstance(e, Alert)]
            asked = len(alerts) + session.proactive_suppressed
            assert asked == 4  # at t = 0, 4, 8, 12
            texts = [a.text for a in alerts]
            assert all(x != y for x, y in zip(texts, texts[1:]))  # each alert says something new
            assert all(e.proactive for e in events if isinstance(e, ResponseCreated))
    asyncio.run(main())


def _stats(session: str, t: float) -> FrameStats:
    return FrameStats(session=session, t=t, counts=FrameCounts(), tokens_kept=1, tokens_total=1, cache_len=1,
                      max_tokens=None, evicted_frames=0, ingest_ms=1.0, latency_ms=1.0)


def test_slow_subscribers_lose_stats_never_answers():
    async def main():
        bus = EventBus()
        slow = bus.subscribe(maxsize=8)
        for i in range(50):
            bus.publish(_stats("s", i))
            if i % 10 == 0:
                bus.publish(ResponseDelta(session="s", response_id="r", text=str(i)))
        got = _drain(slow)
        assert [e.text for e in got if isinstance(e, ResponseDelta)] == ["0", "10", "20", "30", "40"]
        assert slow.dropped == 50 - sum(isinstance(e, FrameStats) for e in got) and not slow.closed
        for i in range(20):  # nothing but answers and a reader that never reads
            bus.publish(ResponseDelta(session="s", response_id="r", text=str(i)))
        rest = _drain(slow)
        assert slow.closed and slow.overflowed and isinstance(rest[-1], Error)
        assert rest[-1].code == "subscriber_overflow"
        assert [e.text for e in rest if isinstance(e, ResponseDelta)] == [str(i) for i in range(8)]
    asyncio.run(main())


def test_shutdown_closes_every_task_thread_and_subscription(lm, tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 112, 84, "yuv420p"
        for i in range(100):
            f = av.VideoFrame.from_ndarray(np.full((84, 112, 3), i, np.uint8), format="rgb24")
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)

    async def main():
        from streamer.sources import file_source

        eng = engine_for(lm, _config(fps=5.0))
        await eng.start()
        session = await eng.open_session()
        sub = eng.bus.subscribe()
        eng.attach(session, file_source(path, fps=5.0, realtime=True))
        assert await eventually(lambda: session.processed >= 3)
        eng.ask(session, "Anything?", Sampling(max_new_tokens=50))
        await eng.close()
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        assert not eng.alive
        assert [t.name for t in threading.enumerate() if t.name.startswith(("file:", "vl3live"))] == []
        assert sub.closed and session.closed
        assert 3 <= session.processed < 50  # paced in real time: 10 s of video was not read in a flash
    asyncio.run(main())


def test_an_attached_source_continues_the_session_clock(lm):
    async def main():
        async with engine_for(lm, _config(fps=2.0)) as eng:
            session = await eng.open_session()
            shot = SyntheticCamera(84, 112).frame(0.0)
            eng.push_frame(session, Frame(10.0, shot))  # the session already ran to t=10
            await eng.settled(session)
            await eng.attach(session, _camera(3, 2.0, pace=0.3), continue_clock=True)  # a source whose pts start at 0
            await eng.settled(session)
            snap = await eng.snapshot(session)
            assert snap.frames_in_cache == (10.0, 10.5, 11.0, 11.5) and snap.state.counts.sampled_out == 0
            eng.update(session, fps=4.0)  # a new sampler keeps the clock: an old pts is still refused
            eng.push_frame(session, Frame(11.5, shot))
            await eng.settled(session)
            eng.push_frame(session, Frame(11.75, shot))
            await eng.settled(session)
            assert (await eng.snapshot(session)).frames_in_cache[-2:] == (11.5, 11.75) and session.sampled_out == 1
    asyncio.run(main())


def test_a_cancelled_reader_stops_even_when_an_event_arrives_at_the_same_moment():
    """The server's per-connection writer reads with a timeout; its cancellation must never be lost
    (asyncio.wait_for can swallow it up to Python 3.11, and the writer then loops for ever)."""
    async def main():
        bus = EventBus()
        sub = bus.subscribe()
        got = []

        async def reader():
            while True:
                got.append(await sub.get(timeout=5.0))

        for _ in range(50):
            task = asyncio.create_task(reader())
            await asyncio.sleep(0)  # waiting inside get()
            bus.publish(_stats("s1", 0.0))  # wakes it ...
            task.cancel()  # ... and cancels it in the same turn of the loop
            done, _ = await asyncio.wait({task}, timeout=2.0)
            assert done and task.cancelled(), "the reader lost its cancellation and went on reading"
        while sub.get_nowait() is not None:  # (the events the cancelled readers left)
            pass
        t0 = asyncio.get_running_loop().time()
        assert await sub.get(timeout=0.05) is None and asyncio.get_running_loop().time() - t0 >= 0.04
    asyncio.run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_closing_sessions_never_disturbs_the_others(lm, transport):
    """The worker frees a closed session between two steps; the answer running in one session and the
    frames streaming into another go on as if nothing happened (no error, no frame run twice)."""
    async def main():
        async with engine_for(lm, _config(fps=1000.0, max_new_tokens=250), transport) as eng:
            a, c = await eng.open_session(), await eng.open_session()
            sub = eng.bus.subscribe(maxsize=100000)
            eng.push_frame(a, Frame(0.0, SyntheticCamera(84, 112).frame(0.0)))
            await eng.settled(a)
            eng.ask(a, "Describe everything.", Sampling(max_new_tokens=250, ignore_eos=True))
            feed = eng.attach(c, _camera(400, 1000.0, pace=0.002))
            assert await eventually(lambda: eng.answering(a) and c.processed > 2)
            for _ in range(8):  # while a answers and c streams
                b = await eng.open_session()
                await asyncio.sleep(0.01)
                await eng.close_session(b.id)
            await feed
            await eng.settled(a)
            await eng.settled(c)
            events = _drain(sub)
            assert [e for e in events if isinstance(e, Error)] == []
            done = [e for e in events if isinstance(e, ResponseDone) and e.session == a.id]
            assert len(done) == 1 and not done[0].cancelled
            assert sum(isinstance(e, ResponseDelta) for e in events) >= 150
            counts = eng.counters(c)
            assert counts.refused == 0 and counts.accepted == 400
            assert counts.processed == sum(isinstance(e, FrameStats) and e.session == c.id for e in events)
    asyncio.run(main())


def test_frames_faster_than_the_core_wait_one_per_session_and_each_is_counted(lm):
    """Frames that reach the core's inbox while the session's previous one still waits there replace it:
    the inbox never holds more than one frame per session, and each replaced frame still passes the
    sampler and is counted (dropped, or sampled out)."""
    async def main():
        async with engine_for(lm, _config(fps=10.0)) as eng:
            session = await eng.open_session()
            shot = SyntheticCamera(84, 112).frame(0.0)
            for k in range(200):  # one turn of the loop: the core sees them all in one inbox
                eng.push_frame(session, Frame(k * 0.05, shot))
            await eng.settled(session)
            c = (await eng.snapshot(session)).state.counts
            assert c.accepted == 200 and c.accepted == c.sampled_out + c.dropped + c.processed + c.refused
            assert c.processed == 1 and c.sampled_out == 100 and c.dropped == 99  # 10 fps of 20 fps pts
            assert (await eng.snapshot(session)).frames_in_cache == (9.9,)  # the newest won
    asyncio.run(main())
