"""WebRTC ingest with a real aiortc peer on loopback: its synthetic camera track feeds a session."""

import asyncio
import time

import aiohttp
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from av import VideoFrame

from streamer.events import FrameStats
from streamer.sources.webrtc import WebRTCIngest
from tests.engines import engine_for
from vl3live.config import Config


@pytest.fixture
def loopback_ice(monkeypatch):
    """This host's ICE candidates on loopback only (aioice otherwise offers just eth0 addresses)."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


class MovingSquare(VideoStreamTrack):
    """A synthetic camera: a square moving across a grey field, 30 fps, real pts."""

    def __init__(self):
        super().__init__()
        self.n = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        img = np.full((240, 320, 3), 90, np.uint8)
        x = (self.n * 4) % 280
        img[100:140, x:x + 40] = (220, 40, 40)
        self.n += 1
        frame = VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


@pytest.mark.parametrize("transport", ["thread", "cluster"])  # cluster: /offer on a Ray-backed engine
def test_an_aiortc_peer_streams_into_a_session(lm, loopback_ice, transport):
    async def main():
        cfg = Config()
        cfg.engine.fps = 4.0
        cfg.session.frame_pixels = 28 * 28 * 12
        async with engine_for(lm, cfg, transport) as engine:
            ingest = WebRTCIngest(engine)
            port = await ingest.start("127.0.0.1", 0)
            sub = engine.bus.subscribe(maxsize=10000)
            client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            client.addTrack(MovingSquare())
            await client.setLocalDescription(await client.createOffer())
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/") as r:
                    assert r.status == 200 and "RTCPeerConnection" in await r.text()
                async with http.post(f"http://127.0.0.1:{port}/offer", json={"sdp": "nonsense", "type": "offer"}) as r:
                    assert r.status == 400 and "no video" in (await r.json())["error"]
                async with http.post(f"http://127.0.0.1:{port}/offer", data="{not json") as r:
                    assert r.status == 400
                async with http.post(f"http://127.0.0.1:{port}/offer", json={
                        "sdp": client.localDescription.sdp, "type": client.localDescription.type}) as r:
                    answer = await r.json()
            await client.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
            session = engine.get(answer["session"])
            end = time.monotonic() + 30
            while session.processed < 6:
                assert time.monotonic() < end, "no frames arrived over WebRTC"
                await asyncio.sleep(0.1)
            ts = [e.t for e in sub.peek() if isinstance(e, FrameStats) and e.session == session.id]
            assert all(b > a for a, b in zip(ts, ts[1:])) and ts[0] < 1.0
            assert np.allclose(np.diff(ts), 0.25, atol=0.04)  # sampled at 4 fps by the track's pts
            assert session.state.cache_len > 0 and session.errors == 0
            await client.close()
            end = time.monotonic() + 30
            while session.id in engine.sessions:  # the peer left: its session (and KV cache) is freed
                assert time.monotonic() < end, "session not closed after the peer left"
                await asyncio.sleep(0.1)
            assert ingest.peers == {}
            await ingest.close()
    asyncio.run(main())


def test_a_headless_chromium_streams_its_camera_into_a_session(tmp_path):
    """Debian's chromium with a fake camera opens the served page, inside a loopback-only namespace."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    assert shutil.which("chromium") and shutil.which("unshare"), "needs chromium and unshare (see .ci/run)"
    shot = tmp_path / "webrtc_page.png"
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["unshare", "-n", "sh", "-c", f"ip link set lo up && {sys.executable} -m tests.browser_rig {shot}"],
                       capture_output=True, text=True, timeout=180, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["processed"] >= 4 and out["cache_len"] > 0 and out["errors"] == 0, out
    assert out["status"].startswith("streaming to session") and out["last_t"] > 1.0
    assert shot.stat().st_size > 1000
    artifacts = root / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / shot.name)
