"""Real sources into the engine: a GStreamer RTSP camera (killed and restarted mid-stream) and files."""

import asyncio
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from streamer.events import Error, FrameStats
from streamer.sources import Frame, ReaderStats, capture, file_source, rtsp_source
from tests.conftest import eventually
from tests.engines import engine_for
from vl3live.config import Config

SERVER = Path(__file__).with_name("rtsp_server.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["/usr/bin/python3", str(SERVER), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"RTSP server did not start: {line!r} {proc.stderr.read()}")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()


def _config(fps):
    cfg = Config()
    cfg.engine.fps = fps
    cfg.session.frame_pixels = 28 * 28 * 12
    return cfg


def test_rtsp_camera_is_sampled_by_pts_and_survives_a_restart(lm):
    port = _free_port()
    server = _start_server(port)

    async def main():
        nonlocal server
        stats = ReaderStats()
        async with engine_for(lm, _config(fps=2.0)) as eng:
            session = await eng.open_session()
            sub = eng.bus.subscribe(session.id, maxsize=10000)
            eng.attach(session, rtsp_source(f"rtsp://127.0.0.1:{port}/cam", fps=2.0, stats=stats))
            assert await eventually(lambda: session.processed >= 6, 30), "no frames from the RTSP camera"
            ts = [e.t for e in sub.peek() if isinstance(e, FrameStats)]
            steps = np.diff(ts)
            assert np.allclose(steps, 0.5, atol=0.051), ts  # 2 fps of the camera's own 10 fps pts
            cache_before, processed_before = session.state.cache_len, session.processed

            _stop(server)  # the camera disappears ...
            down = time.monotonic()
            await asyncio.sleep(2.0)
            server = _start_server(port)  # ... and comes back
            back = time.monotonic()
            assert await eventually(lambda: session.processed >= processed_before + 3, 15), "no frames after the restart"
            reconnect_s = time.monotonic() - back
            assert stats.reconnects >= 1 and session.state.cache_len > cache_before  # same session, same cache
            ts = [e.t for e in sub.peek() if isinstance(e, FrameStats)]
            assert all(b > a for a, b in zip(ts, ts[1:]))  # monotonic across the reconnect
            gap = max(np.diff(ts))
            assert 2.0 <= gap <= (time.monotonic() - down) + 1.0  # stream time counted the outage
            assert reconnect_s < 5.0 + 1.0 / 2.0 * 3  # within 5 s (the 2 s backoff cap, the open) plus three frames at 2 fps

    try:
        asyncio.run(main())
    finally:
        _stop(server)


def test_reconnect_backoff_grows_and_is_capped(monkeypatch):
    # a camera down for long is still polled every MAX_BACKOFF seconds: it is picked up soon after it is back
    slept = []
    monkeypatch.setattr(capture, "_sleep", lambda seconds, stop: slept.append(seconds))

    def refuse():
        raise OSError("connection refused")

    frames = capture.live_frames(refuse, fps=2.0, max_failures=8)
    with pytest.raises(ValueError, match="gave up after 8 tries"):
        next(frames)
    assert slept == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0] and capture.MAX_BACKOFF == 2.0


def test_rtsp_source_refuses_non_rtsp_urls():
    with pytest.raises(ValueError, match="not an RTSP URL"):
        rtsp_source("http://127.0.0.1/cam")


def test_file_source_as_fast_as_possible_and_paced(tmp_path, lm):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 112, 84, "yuv420p"
        for i in range(30):  # 3 s
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((84, 112, 3), i * 8, np.uint8), format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)

    async def read(realtime):
        t0 = time.monotonic()
        frames = [f async for f in file_source(path, fps=2.0, realtime=realtime)]
        return [f.pts_seconds for f in frames], time.monotonic() - t0

    fast_ts, fast_s = asyncio.run(read(False))
    paced_ts, paced_s = asyncio.run(read(True))
    assert fast_ts == paced_ts == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert paced_s >= 2.4 and fast_s < 2.0
    with pytest.raises(FileNotFoundError):
        file_source(tmp_path / "missing.mp4")


def test_camera_source_reads_a_capture_device_by_pts(lm):
    """FFmpeg's lavfi test source stands in for a capture device (same PyAV device path, other format)."""
    from streamer.sources import camera_source
    from streamer.sources.capture import camera_format

    assert camera_format() == "v4l2"  # Linux
    stats = ReaderStats()

    async def main():
        async with engine_for(lm, _config(fps=2.0)) as eng:
            session = await eng.open_session()
            sub = eng.bus.subscribe(session.id, maxsize=1000)
            eng.attach(session, camera_source("testsrc=size=160x120:rate=10,realtime", fps=2.0, fmt="lavfi", stats=stats))
            assert await eventually(lambda: session.processed >= 4, 30)
            ts = [e.t for e in sub.peek() if isinstance(e, FrameStats)]
            assert np.allclose(np.diff(ts), 0.5, atol=0.01) and stats.connects == 1
    asyncio.run(main())


def test_a_broken_source_is_an_error_event_and_the_session_goes_on(lm, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")

    async def main():
        async with engine_for(lm, _config(fps=2.0)) as eng:
            session = await eng.open_session()
            sub = eng.bus.subscribe(session.id)
            await eng.attach(session, file_source(bad, fps=2.0, realtime=False))
            err = next(e for e in sub.peek() if isinstance(e, Error))
            assert err.code == "source" and "cannot read" in err.message
            eng.push_frame(session, Frame(0.0, np.zeros((84, 112, 3), np.uint8)))
            await eng.settled(session)
            assert session.processed == 1
    asyncio.run(main())
