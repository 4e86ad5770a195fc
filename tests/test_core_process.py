"""The engine core in a child process: nothing but commands and outputs crosses, and when the child dies
every session is told (``worker_lost``), the server stays up and ``/health`` says the truth."""

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request

import pytest

from model.checkpoints.synthetic import SyntheticCamera
from streamer.engine import EngineError
from streamer.events import Error, FrameStats
from streamer.websocket.client import Client
from tests import ws_rig
from tests.conftest import eventually


def _health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_killing_the_cores_process_tells_every_session_and_the_server_stays_up(lm):
    async def main():
        cfg = ws_rig.config()
        async with ws_rig.serving(lm, cfg, "process") as (engine, server, url):
            errors: list[Error] = []
            engine.bus.observe(lambda ev: errors.append(ev) if isinstance(ev, Error) else None)
            clients = [Client(url), Client(url)]
            for c in clients:
                await c.connect()
            cam = SyntheticCamera(ws_rig.H, ws_rig.W)
            for k in range(3):  # both stream: the core is busy with them
                for c in clients:
                    await c.send_frame(ws_rig.png(cam.frame(float(k))), pts=float(k))
            assert await eventually(lambda: all(s.processed >= 1 for s in engine.sessions.values()), 60)
            assert (await asyncio.to_thread(_health, server.port))[0] == 200 and engine.alive
            os.kill(engine.pid, signal.SIGKILL)  # mid-stream
            for k in range(3, 6):
                for c in clients:
                    await c.send_frame(ws_rig.png(cam.frame(float(k))), pts=float(k))
            assert await eventually(lambda: len({e.session for e in errors if e.code == "worker_lost"}) == 2, 30)
            for c in clients:  # each client is told, on its open connection
                err = await c.next_event("error", timeout=10)
                while err.code != "worker_lost":
                    err = await c.next_event("error", timeout=10)
                assert "gone" in err.message
            status, body = await asyncio.to_thread(_health, server.port)
            assert status == 503 and body["status"] == "engine core stopped" and not engine.alive
            with pytest.raises(EngineError) as info:
                await engine.open_session()
            assert info.value.code == "worker_lost"
            for c in clients:
                await c.close()
    asyncio.run(main())


def test_a_bad_session_config_is_refused_at_start_naming_the_minimum(lm):
    """A budget below the session minimum is a configuration error when the engine starts, in either
    transport, not an ``internal`` error for every session later."""
    async def main(transport: str):
        cfg = ws_rig.config()
        cfg.session.budget.max_tokens = 100
        from tests.engines import engine_for

        with pytest.raises(ValueError, match=r"too small: the minimum is \d+"):
            async with engine_for(lm, cfg, transport):
                pass
    for transport in ("thread", "process"):
        asyncio.run(main(transport))


def test_frames_answers_and_counters_cross_the_process_boundary(lm):
    from tests.engines import engine_for

    async def main():
        cfg = ws_rig.config()
        async with engine_for(lm, cfg, "process") as eng:
            s = await eng.open_session()
            stats = []
            eng.bus.observe(lambda ev: stats.append(ev) if isinstance(ev, FrameStats) else None)
            cam = SyntheticCamera(ws_rig.H, ws_rig.W)
            for k in range(4):
                eng.push_frame(s, cam.frame(float(k)))  # no pts: stamped on arrival in the core
                await asyncio.sleep(0.6)
            await eng.settled(s)
            snap = await eng.snapshot(s, overlay=True)
            c = snap.state.counts
            assert c.accepted == 4 and c.accepted == c.sampled_out + c.dropped + c.processed + c.refused + c.pending
            assert c.processed == len(stats) >= 3 and snap.overlay[0].shape == (ws_rig.H, ws_rig.W, 3)
            assert eng.frame_counts().accepted == 4 and eng.stats().steps >= 3
    asyncio.run(main())
