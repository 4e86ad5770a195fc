"""Live state has one owner: what the event loop does to a session (standing instructions set and cleared,
settings changed, sessions closed) never races the model's steps, and standing instructions never pile up.

The interpreter's thread switch interval is shortened, the usual way to make a race show."""

import asyncio
import sys

from model.checkpoints.synthetic import SyntheticCamera
from model.sampling import Sampling
from streamer.events import Error, ResponseDone
from streamer.sources import Frame
from tests.conftest import eventually
from tests.engines import engine_for
from vl3live.config import Config


def _config() -> Config:
    cfg = Config()
    cfg.session.layout = "stream"
    cfg.session.frame_pixels = 56 * 56
    cfg.session.budget.max_tokens = 2400  # hundreds of frames in the cache, evictions every few frames
    cfg.engine.fps = 1000.0
    cfg.engine.proactive_threshold = 0.0  # every frame may make the model speak
    cfg.engine.proactive_cooldown = 0.0
    cfg.engine.proactive_max_new_tokens = 4
    return cfg


def test_instructions_settings_and_closes_from_the_loop_never_race_the_steps(lm):
    async def main():
        cfg = _config()
        errors: list[Error] = []
        async with engine_for(lm, cfg) as eng:
            eng.bus.observe(lambda ev: errors.append(ev) if isinstance(ev, Error) else None)
            streams = [await eng.open_session() for _ in range(3)]
            cam = SyntheticCamera(56, 56)
            shots = [cam.frame(i * 0.9) for i in range(6)]
            running = True

            async def feed(i: int) -> None:
                k = 0
                while running:
                    eng.push_frame(streams[i], Frame(k * 0.01, shots[k % 6]))
                    k += 1
                    if k % 40 == 0 and not eng.answering(streams[i]):
                        try:
                            eng.ask(streams[i], "Describe everything.", Sampling(max_new_tokens=24))
                        except Exception:  # queue full: fine, it is busy
                            pass
                    await asyncio.sleep(0.002)
            feeders = [asyncio.create_task(feed(i)) for i in range(3)]
            previous = sys.getswitchinterval()
            sys.setswitchinterval(1e-4)
            try:
                for n in range(1500):
                    s = streams[n % 3]
                    eng.set_instruction(s, f"Tell me when thing {n} appears." if n % 2 == 0 else None)
                    eng.update(s, fps=500.0 + n % 7)
                    if n % 50 == 49:  # a session comes and goes while the others stream
                        extra = await eng.open_session()
                        eng.push_frame(extra, Frame(0.0, shots[0]))
                        eng.set_instruction(extra, "Say hi.")
                        await eng.close_session(extra.id)
                    await asyncio.sleep(0 if n % 10 else 0.003)
            finally:
                sys.setswitchinterval(previous)
                running = False
                await asyncio.gather(*feeders)
            for s in streams:
                eng.set_instruction(s, None)
            for s in streams:
                await eng.settled(s, timeout=120)
            internal = [e for e in errors if e.code == "internal"]
            assert internal == [], internal[:3]
            # a later question is answered: nothing cleared stays pinned and fills the budget
            done = []
            eng.bus.observe(lambda ev: done.append(ev) if isinstance(ev, ResponseDone) else None)
            for s in streams:
                eng.ask(s, "And now?", Sampling(max_new_tokens=4))
            for s in streams:
                await eng.settled(s, timeout=120)
            late = [e for e in errors if e.code == "cache_limit"]
            assert late == [] and len([d for d in done if not d.proactive]) == 3
    asyncio.run(main())


def test_a_new_instruction_replaces_the_waiting_one_and_clearing_drops_it(lm):
    async def main():
        cfg = _config()
        cfg.session.budget.max_tokens = 420
        cfg.engine.proactive_threshold = 1.0  # the model never speaks by itself here
        async with engine_for(lm, cfg) as eng:
            s = await eng.open_session()
            eng.push_frame(s, Frame(0.0, SyntheticCamera(56, 56).frame(0.0)))
            await eng.settled(s)
            eng.ask(s, "Tell me a long story.", Sampling(max_new_tokens=200, ignore_eos=True))
            assert await eventually(lambda: eng.answering(s))
            for n in range(200):  # while the story runs: each new instruction replaces the waiting one
                eng.set_instruction(s, f"Instruction {n}.")
            snap = await eng.snapshot(s)
            assert snap.state.answering and snap.state.counts.questions_waiting == 1
            eng.set_instruction(s, None)  # clearing drops it
            assert (await eng.snapshot(s)).state.counts.questions_waiting == 0
            await eng.settled(s, timeout=120)
            for n in range(5):  # each one runs: only the newest one's exchange stays pinned
                eng.set_instruction(s, f"Watch for thing number {n}.")
                await eng.settled(s, timeout=120)
                pinned = (await eng.snapshot(s)).stats.pinned_tokens
                assert 0 < pinned < 60, pinned
            eng.set_instruction(s, None)
            await eng.settled(s, timeout=120)
            assert (await eng.snapshot(s)).stats.pinned_tokens == 0
            for n in range(40):  # hammered: the budget never fills with old instructions
                eng.set_instruction(s, f"Watch for thing number {n}.")
                eng.push_frame(s, Frame(1.0 + n, SyntheticCamera(56, 56).frame(float(n))))
            eng.set_instruction(s, None)
            await eng.settled(s, timeout=120)
            errors = []
            eng.bus.observe(lambda ev: errors.append(ev) if isinstance(ev, Error) else None)
            eng.ask(s, "And now?", Sampling(max_new_tokens=8))
            await eng.settled(s, timeout=120)
            assert errors == [] and (await eng.snapshot(s)).stats.pinned_tokens == 0
    asyncio.run(main())


def test_only_the_core_thread_touches_a_model_session(lm, monkeypatch):
    """What the loop does to a session (instructions, settings, closing) reaches its ``StreamSession`` on the
    core's thread alone, between steps: no lock lent out, nothing to race."""
    import threading

    from model.session import StreamSession

    threads: dict[str, set] = {}
    for name in ("unpin", "set_diffp_threshold", "begin_frame", "begin_answer", "close", "stats"):
        original = getattr(StreamSession, name)

        def wrapped(self, *a, _name=name, _original=original, **kw):
            threads.setdefault(_name, set()).add(threading.current_thread().name)
            return _original(self, *a, **kw)
        monkeypatch.setattr(StreamSession, name, wrapped)

    async def main():
        async with engine_for(lm, _config()) as eng:
            threads.clear()  # (the engine's start checked the session settings on a probe session)
            s = await eng.open_session()
            cam = SyntheticCamera(56, 56)
            for k in range(20):
                eng.push_frame(s, Frame(k * 0.01, cam.frame(k * 0.5)))
                eng.set_instruction(s, "Watch." if k % 2 else None)
                eng.update(s, diffp_threshold=1.0 + k % 3, fps=200.0)
                await asyncio.sleep(0.005)
            await eng.settled(s, timeout=60)
            await eng.snapshot(s)
            await eng.close_session(s.id)
    asyncio.run(main())
    assert set(threads) == {"unpin", "set_diffp_threshold", "begin_frame", "begin_answer", "close", "stats"}
    assert all(names == {"vl3live-core"} for names in threads.values()), threads
