"""The websocket API end to end on loopback: the Python client, resume, limits, sources, auth, metrics, the CLIs."""

import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from model.sampling import Sampling
from streamer.sources import file_source
from streamer.sources.spec import parse_pattern, source_allowed
from streamer.websocket import protocol as P
from streamer.websocket.client import Client, ClientError
from streamer.websocket.config import ServerConfig
from streamer.websocket.server import Server
from tests import ws_rig
from tests.conftest import eventually, wait_for_line, with_ctrl_c
from tests.engines import SERVER_TRANSPORTS
from tests.test_sources import _free_port, _start_server, _stop


def _get(url: str, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in metrics"
    return float(m.group(1))


async def _ack(c: Client, pred, timeout: float = 60.0, log: list | None = None) -> P.FrameAck:
    """The newest frame.ack if it satisfies ``pred``, else the next one that does; events read on the
    way are appended to ``log`` (default: the client's ``seen`` list)."""
    log = log if log is not None else c.__dict__.setdefault("seen", [])
    last = next((ev for ev in reversed(log) if isinstance(ev, P.FrameAck)), None)
    if last is not None and pred(last):
        return last

    async def find():
        async for ev in c.events():
            log.append(ev)
            if isinstance(ev, P.FrameAck) and pred(ev):
                return ev
        raise ConnectionError(c.closed)
    return await asyncio.wait_for(find(), timeout)


@pytest.mark.parametrize("transport", SERVER_TRANSPORTS)
def test_client_streams_a_clip_asks_twice_mid_stream_and_gets_an_alert(lm, tmp_path, transport):
    clip = ws_rig.write_clip(tmp_path / "clip.mp4", seconds=6.0)
    cfg = ws_rig.config()
    cfg.engine.proactive_every = 2.0

    async def main():
        async with ws_rig.serving(lm, cfg, transport) as (engine, server, url), Client(url) as c:
            assert c.session.protocol == P.PROTOCOL_VERSION and not c.session.resumed
            updated = await c.update(instruction="Tell me when the red ball moves.", fps=2)
            assert updated.settings["instruction"] == "Tell me when the red ball moves." and updated.settings["fps"] == 2
            answers: dict[str, list] = {}

            async def ask(text):
                answers[text] = [ev async for ev in c.ask(text)]

            asks, sent = [], 0
            async for frame in file_source(clip, fps=2.0, realtime=False):
                await c.send_frame(frame.rgb, pts=frame.pts_seconds, event_id=f"f{sent}")
                sent += 1
                await _ack(c, lambda a, n=sent: a.processed + a.dropped + a.sampled_out >= n)
                if sent in (4, 8):
                    asks.append(asyncio.create_task(ask("What is in the picture?" if sent == 4 else "Where is the ball?")))
            await asyncio.gather(*asks)
            assert await eventually(lambda: any(ev.type == "alert" for ev in c.seen + c.peek()), timeout=60)
            final = await _ack(c, lambda a: a.received == sent)
            events = c.seen + c.peek()
            status, metrics = await asyncio.to_thread(_get, url.replace("ws://", "http://") + "metrics")
            status_h, health = await asyncio.to_thread(_get, url.replace("ws://", "http://") + "health")
        assert sent == 12 and final.rejected == 0 and final.rate_dropped == 0
        assert final.processed + final.dropped + final.sampled_out == sent and final.processed >= 6
        assert final.tokens_total and final.cache_len and final.last_event_id == f"f{sent - 1}"
        times = []
        for text, evs in answers.items():
            created, *deltas, done = evs
            assert isinstance(created, P.ResponseCreated) and created.question == text and not created.proactive
            assert isinstance(done, P.ResponseDone) and done.event_id == created.event_id and not done.cancelled
            assert deltas and all(isinstance(d, P.ResponseDelta) and d.response_id == done.response_id for d in deltas)
            assert done.text == "".join(d.text for d in deltas) and done.ttft_ms > 0
            assert created.t == done.t and 0 < created.t < 5.5  # asked mid-stream, tagged with its stream time
            times.append(created.t)
        assert times[0] < times[1]
        alert = next(ev for ev in events if ev.type == "alert")
        done = next(ev for ev in events if ev.type == "response.done" and ev.response_id == alert.response_id)
        assert alert.instruction == "Tell me when the red ball moves." and alert.text == done.text and done.proactive
        assert events.index(done) < events.index(alert)
        assert status == 200 and status_h == 200 and json.loads(health)["status"] == "ok"
        assert _metric(metrics, "vl3live_ttft_seconds_count") >= 3  # two questions and the proactive answer
        assert _metric(metrics, "vl3live_frame_latency_seconds_count") == final.processed
        assert _metric(metrics, 'vl3live_frames_total{outcome="received"}') == sent
        assert _metric(metrics, 'vl3live_sessions{state="connected"}') == 1
    asyncio.run(main())


def test_resume_keeps_the_session_rotates_its_token_and_an_expired_token_is_refused(lm):
    cfg = ws_rig.config(resume_seconds=1.0)
    shots = ws_rig.frames(6)

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url):
            c = Client(url)
            await c.connect()
            for i in range(3):
                await c.send_frame(ws_rig.png(shots[i]), pts=float(i))
                before = (await _ack(c, lambda a, n=i + 1: a.processed == n)).cache_len
            token, sid = c.session.resume_token, c.session.session_id
            await c.disconnect()  # going away (1001), not done: the session waits
            async with Client(url, resume=token) as c2:
                assert c2.session.resumed and c2.session.session_id == sid and len(engine.sessions) == 1
                assert c2.session.resume_token != token  # every resume rotates the token
                assert (await _ack(c2, lambda a: True)).cache_len == before  # a resumed client is told where it is
                for i in range(3, 6):
                    await c2.send_frame(ws_rig.png(shots[i]), pts=float(i))
                    after = await _ack(c2, lambda a, n=i + 1: a.processed == n)
                assert after.cache_len > before and after.received == 6
                done = [ev async for ev in c2.ask("What changed?")][-1]
                assert isinstance(done, P.ResponseDone) and done.t == 5.0
                with pytest.raises(ClientError) as info:  # the first token worked once
                    await Client(url, resume=token).connect()
                assert info.value.code == "resume_failed"
                stolen = c2.session.resume_token
                async with Client(url, resume=stolen) as c3:  # the session from a second connection (a thief)
                    assert c3.session.session_id == sid and c3.session.resume_token != stolen
                    assert await eventually(lambda: c2.closed is not None, timeout=10)
                    assert c2.closed[0] == 4003
                    with pytest.raises(ClientError) as info:  # the owner cannot take it back with its old token
                        await Client(url, resume=stolen).connect()
                    assert info.value.code == "resume_failed" and c3.closed is None
                    latest = c3.session.resume_token
                    await c3.disconnect()
            await asyncio.sleep(1.5)  # past resume_seconds: the session is gone
            assert len(engine.sessions) == 0 and len(server.sessions) == 0
            async with websockets.connect(url + f"?resume={latest}") as ws:
                err = await ws_rig.recv_json(ws)
                assert err["type"] == "error" and err["code"] == "resume_failed"
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 4001
    asyncio.run(main())


def test_an_empty_or_malformed_resume_is_refused_and_failed_attempts_are_throttled(lm):
    cfg = ws_rig.config(resume_failures_per_minute=6.0)

    async def refused(target, **kw) -> tuple[int | None, str | None]:
        """(close code, error code) of a handshake to ``target``, or (HTTP status, None) if it was refused."""
        try:
            async with websockets.connect(target, **kw) as ws:
                err = await ws_rig.recv_json(ws)
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                return ws.close_code, err.get("code")
        except InvalidStatus as exc:
            return exc.response.status_code, None

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url):
            for query in ("?resume=", "?resume", "?resume=short", "?resume=" + "x" * 31 + "!",
                          "?resume=" + "A" * 32, "?resume=a&resume=b"):
                assert await refused(url + query) == (4001, "resume_failed"), query
            assert len(engine.sessions) == 0  # none of them opened a session
            for _ in range(4):  # 6 per minute, bursts of 10: the 11th failure in a row is throttled
                await refused(url + "?resume=" + "B" * 32)
            assert await refused(url + "?resume=" + "C" * 32) == (429, None)
            other = await refused(url + "?resume=" + "C" * 32, local_addr=("127.0.0.2", 0))
            assert other == (4001, "resume_failed")  # another address is not affected
            async with Client(url) as c:  # nor are new sessions from the throttled address
                assert c.session.session_id
            status, metrics = await asyncio.to_thread(_get, url.replace("ws://", "http://") + "metrics")
            assert _metric(metrics, 'vl3live_handshakes_refused_total{reason="resume_throttled"}') == 1
    asyncio.run(main())


def test_every_limit_answers_with_its_code_and_the_session_survives(lm):
    cfg = ws_rig.config(max_sessions=2, max_fps=5.0, max_frame_bytes=20000, max_messages_per_second=40.0,
                        source_allow=["rtsp://127.0.0.1"])
    cfg.engine.max_queued_questions = 2
    cfg.engine.max_question_chars = 100
    shots = ws_rig.frames(4)
    noise = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)

    async def expect(ws, message, code, eid=None, pts=None):
        if pts is not None:
            await ws.send(json.dumps({"type": "input_frame.meta", "pts": pts}))
        await (ws.send(message) if isinstance(message, bytes) else ws.send(json.dumps(message)))
        err = await ws_rig.recv_json(ws, ("error",))
        assert err["code"] == code, err
        if eid is not None:
            assert err["event_id"] == eid
        return err

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url):
            ws = await websockets.connect(url, max_size=None)
            created = await ws_rig.recv_json(ws, ("session.created",))
            other = await websockets.connect(url)
            await ws_rig.recv_json(other, ("session.created",))
            async with websockets.connect(url) as third:  # max_sessions = 2
                assert (await ws_rig.recv_json(third))["code"] == "too_many_sessions"
                with pytest.raises(websockets.ConnectionClosed):
                    await third.recv()
                assert third.close_code == 1013
            await other.close()
            for i in range(2):
                await ws.send(json.dumps({"type": "input_frame.meta", "pts": float(i), "event_id": f"f{i}"}))
                await ws.send(ws_rig.png(shots[i]))
                await asyncio.sleep(0.25)  # under max_fps
            ack = await ws_rig.recv_json(ws, ("frame.ack",))
            while ack["processed"] < 2:
                ack = await ws_rig.recv_json(ws, ("frame.ack",))
            cache_len = ack["cache_len"]
            await asyncio.sleep(0.5)  # refill the fps bucket
            await expect(ws, ws_rig.png(noise), "frame_too_large", pts=2.0)  # 30 KB > 20000 bytes
            await expect(ws, ws_rig.png(np.zeros((3, 700, 3), np.uint8)), "bad_frame", pts=3.0)  # aspect ratio 233
            await expect(ws, {"type": "question", "text": "x" * 101, "event_id": "long"}, "question_too_long", "long")
            await expect(ws, {"type": "response.cancel", "event_id": "c"}, "nothing_to_cancel", "c")
            await expect(ws, {"type": "session.update", "session": {"layout": "stream"}, "event_id": "u"},
                         "session_started", "u")
            await expect(ws, {"type": "session.update", "session": {"fps": 50}, "event_id": "u2"},
                         "invalid_field", "u2")  # over server.max_fps
            for url_ in ("file:///etc/passwd", "/etc/passwd", "rtsp://10.0.0.1/cam", "http://127.0.0.1/cam",
                         "rtsp://127.0.0.1.evil.example/cam"):
                await expect(ws, {"type": "source.attach", "url": url_, "event_id": "a"}, "source_forbidden", "a")
            await expect(ws, {"type": "source.detach"}, "source_busy")
            await asyncio.sleep(0.3)
            for i in range(20):  # 20 frames at once: 5 fps allowed, burst 5
                await ws.send(json.dumps({"type": "input_frame", "pts": 10.0 + i,
                                          "image": base64.b64encode(ws_rig.jpeg(shots[i % 4])).decode()}))
            ack = await ws_rig.recv_json(ws, ("frame.ack",))
            while ack["received"] < 24:
                ack = await ws_rig.recv_json(ws, ("frame.ack",))
            assert ack["rate_dropped"] >= 10 and ack["rejected"] == 1  # the 30 KB one
            assert ack["accepted"] + ack["rate_dropped"] + ack["rejected"] == 24
            await asyncio.sleep(1.0)
            codes = []  # 4 questions at once: one answering, two waiting, the rest refused
            for i in range(4):
                await ws.send(json.dumps({"type": "question", "text": f"question {i}?", "event_id": f"q{i}"}))
            done = 0
            while done + len(codes) < 4:
                ev = await ws_rig.recv_json(ws, ("error", "response.done"))
                if ev["type"] == "error":
                    codes.append(ev["code"])
                else:
                    done += 1
            assert set(codes) == {"queue_full"} and done >= 2  # q0 may still wait behind the frames
            await asyncio.sleep(2.5)  # refill the message bucket
            for i in range(200):  # a flood: 40/s allowed, burst 80
                await ws.send(json.dumps({"type": "ping", "event_id": f"p{i}"}))
            replies = [await ws_rig.recv_json(ws, ("pong", "error")) for _ in range(200)]
            limited = [r for r in replies if r["type"] == "error"]
            assert all(r["code"] == "rate_limited" for r in limited) and 100 <= len(limited) <= 125
            assert sorted(r["event_id"] for r in replies) == sorted(f"p{i}" for i in range(200))
            await asyncio.sleep(2.5)
            await ws.send(ws_rig.png(noise).ljust(cfg.server.max_frame_bytes * 2 + 70000, b"\0"))  # over the transport
            with pytest.raises(websockets.ConnectionClosed):
                await ws_rig.recv_json(ws, ("never",))
            assert ws.close_code == 1009
            async with Client(url, resume=created["resume_token"]) as c:  # nothing sent earlier is lost
                ack = await _ack(c, lambda a: True)
                assert ack.cache_len >= cache_len and ack.processed >= 2
                events = [ev async for ev in c.ask("Still there?")]
                done = events[-1]
                assert isinstance(done, P.ResponseDone) and done.text
                assert done.text == "".join(e.text for e in events if isinstance(e, P.ResponseDelta))
            status, metrics = await asyncio.to_thread(_get, url.replace("ws://", "http://") + "metrics")
            assert _metric(metrics, 'vl3live_errors_total{code="rate_limited"}') == len(limited)
            assert _metric(metrics, 'vl3live_frames_total{outcome="rate_dropped"}') == ack.rate_dropped
    asyncio.run(main())


@pytest.mark.parametrize("transport", SERVER_TRANSPORTS)
def test_session_update_reshapes_a_fresh_session_and_tunes_a_live_one(lm, transport):
    async def main():
        async with ws_rig.serving(lm, transport=transport) as (engine, server, url), Client(url) as c:
            session = engine.get(c.session.session_id)
            up = await c.update(layout="stream", memory_budget=4096, frame_pixels=28 * 28 * 6, diffp_threshold=3.0,
                                proactive_threshold=0.8, generation={"do_sample": True, "temperature": 0.5, "seed": 3,
                                                                     "max_new_tokens": 5})
            assert up.settings["layout"] == "stream" and up.settings["memory_budget"] == 4096
            snap = await engine.snapshot(session)  # what the core holds
            cfg = snap.config
            assert (cfg.layout, cfg.budget.max_tokens, cfg.frame_pixels, cfg.threshold) == ("stream", 4096, 4704, 3.0)
            assert snap.settings.proactive_threshold == 0.8 and snap.sampling.max_new_tokens == 5
            assert snap.sampling == Sampling(max_new_tokens=5, do_sample=True, temperature=0.5, seed=3)
            with pytest.raises(ClientError, match="budget") as info:
                await c.update(memory_budget=10)  # below the minimum: refused, nothing changed
            assert info.value.code == "invalid_field" and (await engine.snapshot(session)).config.budget.max_tokens == 4096
            with pytest.raises(ClientError) as info:
                await c.update(generation={"max_new_tokens": 10_000})  # over the server's limit
            assert info.value.code == "invalid_field"
            await c.send_frame(ws_rig.png(ws_rig.frames(1)[0]), pts=0.0)
            await c.next_event("frame.ack")
            await c.update(diffp_threshold=9.0, fps=4)  # live settings change on a started session
            snap = await engine.snapshot(session)
            assert snap.config.threshold == 9.0 and snap.settings.fps == 4
            with pytest.raises(ClientError) as info:
                await c.update(layout="video-turn")
            assert info.value.code == "session_started" and (await engine.snapshot(session)).config.layout == "stream"
            done = [ev async for ev in c.ask("What now?")][-1]
            assert isinstance(done, P.ResponseDone)
    asyncio.run(main())


def test_cache_limit_is_an_error_event(lm):
    cfg = ws_rig.config()
    cfg.session.budget.max_tokens = None
    cfg.session.max_cache_tokens = 100

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url), Client(url) as c:
            for i, shot in enumerate(ws_rig.frames(12)):
                await c.send_frame(ws_rig.png(shot), pts=float(i))
                await asyncio.sleep(0.05)
            err = await c.next_event("error")
            assert err.code == "cache_limit" and "100" in err.message
            assert await c.ping() >= 0  # the connection is up
    asyncio.run(main())


def test_source_attach_pulls_an_allowed_rtsp_camera(lm):
    port = _free_port()
    camera = _start_server(port)
    cfg = ws_rig.config(source_allow=["rtsp://127.0.0.1:*"])
    shot = ws_rig.png(ws_rig.frames(1)[0])

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url), Client(url) as c:
            await c.send_frame(shot, pts=0.0)
            await _ack(c, lambda a: a.processed == 1)
            await c.attach(f"rtsp://127.0.0.1:{port}/cam")
            await _ack(c, lambda a: a.processed >= 4, timeout=60)  # the camera's frames, sampled at 2 fps
            await c.send_frame(shot, pts=100.0, event_id="mine")
            err = await c.next_event("error")
            assert err.code == "source_busy" and err.event_id == "mine"
            await c.send_json({"type": "source.attach", "url": f"rtsp://127.0.0.1:{port}/cam", "event_id": "a2"})
            err = await c.next_event("error")
            assert err.code == "source_busy" and err.event_id == "a2"
            await c.send_json({"type": "source.detach"})
            await asyncio.sleep(0.3)
            messages = []
            with socket.socket() as mute:  # a port that accepts and says nothing, and one that is closed
                mute.bind(("127.0.0.1", 0))
                mute.listen()
                for i, port_ in enumerate((_free_port(), mute.getsockname()[1])):  # allowed, but no camera
                    await c.send_json({"type": "source.attach", "url": f"rtsp://127.0.0.1:{port_}/cam",
                                       "event_id": f"a{i}"})
                    err = await c.next_event("error", timeout=60)
                    assert err.code == "source" and err.event_id == f"a{i}" and "retrying" in err.message
                    messages.append(err.message)
                    await c.send_json({"type": "source.detach"})
                    await asyncio.sleep(0.3)
            assert messages[0] == messages[1]  # refused or silent: the client cannot tell (no port scanning)
            session = next(iter(engine.sessions.values()))
            times = (await engine.snapshot(session)).frames_in_cache
            assert times[0] == 0.0 and all(b > a for a, b in zip(times, times[1:]))  # camera continues the clock
            n = session.processed
            await c.send_frame(shot, pts=times[-1] + 1.0)
            ack = await _ack(c, lambda a: a.processed == n + 1)
            assert ack.last_pts == times[-1] + 1.0
    try:
        asyncio.run(main())
    finally:
        _stop(camera)


def test_source_allow_list_matches_the_parsed_host_not_the_string():
    allow = ["rtsp://127.0.0.1:*", "rtsp://cam-*.local:8554", "rtsps://*.example.com", "RTSP://192.168.1.*",
             "rtsp://[::1]:8554"]
    for url in ("rtsp://127.0.0.1:9000/cam", "rtsp://127.0.0.1/cam", "rtsp://user:pw@cam-3.local:8554/stream",
                "RTSPS://a.example.com/x", "rtsp://192.168.1.7/cam", "rtsp://192.168.1.7:554/cam",
                "rtsp://192.168.1.7./cam", "rtsp://[::1]:8554/cam"):
        assert source_allowed(url, allow), url
    for url in ("rtsp://192.168.1.attacker.example/cam",  # a * is a whole octet, never a suffix
                "rtsp://192.168.1.7.nip.io/cam", "rtsp://192.168.1.7:8554/cam",  # no port in the pattern: 554 only
                "rtsps://a.b.example.com/x",  # a * is one DNS label
                "rtsp://cam-3.local:9000/x", "rtsp://cam-3.local/x",
                "rtsp://0300.0250.1.1/", "rtsp://192.168.1.07/", "rtsp://3232235777/", "rtsp://0x7f000001/",
                "rtsp://127.1/", "rtsp://127.0.0.1%2e/", "rtsp://[::2]:8554/",  # numeric spellings resolvers accept
                "http://127.0.0.1/", "file:///etc/passwd", "/etc/passwd", "rtsp://127.0.0.2/", "rtsp://example.com/",
                "rtsp://127.0.0.1/ x", "rtsp://127.0.0.1:99999/", "concat:rtsp://127.0.0.1/a|file:/etc/passwd",
                "rtsp:///cam"):
        assert not source_allowed(url, allow), url
    assert not source_allowed("rtsp://127.0.0.1/", [])
    assert source_allowed("rtsp://cam.local:8554/x", ["rtsp://cam.local:8554"])
    assert not source_allowed("rtsp://cam.local/x", ["rtsp://cam.local:8554"])
    with pytest.raises(ValueError, match="source_allow"):
        ServerConfig(source_allow=["127.0.0.1"])
    for bad in ("rtsp://192.168.1.0*", "rtsp://10.*", "rtsp://1.2.3.256", "rtsp://h:70000", "rtsp://a_b.local"):
        with pytest.raises(ValueError, match="source_allow"):
            parse_pattern(bad)


def test_binding_beyond_loopback_needs_a_token_and_a_wrong_token_is_refused(lm, monkeypatch):
    monkeypatch.delenv("VL3LIVE_TOKEN", raising=False)
    with pytest.raises(ValueError, match="needs a token"):
        Server.check(ServerConfig(host="0.0.0.0"))
    env = {k: v for k, v in os.environ.items() if k != "VL3LIVE_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "vl3live", "serve", "--host", "0.0.0.0", "--model", "tiny"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "needs a token" in r.stderr and "loading" not in r.stderr
    cfg = ws_rig.config(host="0.0.0.0", token="s3cret", allowed_origins=["http://good.example"])

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, _):
            url = f"ws://127.0.0.1:{server.port}/"
            http = f"http://127.0.0.1:{server.port}/"
            for headers, target in (({}, url), ({"Authorization": "Bearer wrong"}, url), ({}, url + "?token=wrong")):
                with pytest.raises(InvalidStatus) as info:
                    await websockets.connect(target, additional_headers=headers)
                assert info.value.response.status_code == 401
            async with Client(url, token="s3cret") as c:
                assert await c.ping() >= 0
            async with Client(url + "?token=s3cret") as c:
                assert c.session.session_id
            with pytest.raises(InvalidStatus) as info:
                await websockets.connect(url + "?token=s3cret", origin="http://evil.example")
            assert info.value.response.status_code == 403
            async with Client(url, token="s3cret", origin="http://good.example") as c:
                assert c.session.session_id
            assert (await asyncio.to_thread(_get, http + "metrics"))[0] == 401
            assert (await asyncio.to_thread(_get, http + "metrics", {"Authorization": "Bearer s3cret"}))[0] == 200
            assert (await asyncio.to_thread(_get, http + "health"))[0] == 200
            assert (await asyncio.to_thread(_get, http + "nope?token=s3cret"))[0] == 404
    asyncio.run(main())


@pytest.mark.parametrize("transport", SERVER_TRANSPORTS)
def test_cli_serve_and_cli_client(tmp_path, transport):
    clip = ws_rig.write_clip(tmp_path / "clip.mp4", seconds=3.0)
    where = ["--set", f"engine.transport={transport}"] if transport != "cluster" else \
        ["--set", "cluster.worker_cpus=0.5"]  # and serve --cluster local:2 (a local Ray, two worker actors)
    serve = subprocess.Popen(with_ctrl_c([sys.executable, "-m", "vl3live", "--set", "server.port=0", *where,
                              "--set", f"session.frame_pixels={ws_rig.H * ws_rig.W}", "--set", "engine.max_new_tokens=8",
                              "serve", "--model", "tiny", *(["--cluster", "local:2"] if transport == "cluster" else [])]),
                             stderr=subprocess.PIPE, text=True)  # with Ctrl-C, as a background job would not have it
    lines: list[str] = []
    try:
        m, lines = wait_for_line(serve, r"serving ws://127\.0\.0\.1:(\d+)/")  # and keeps draining stderr
        assert m, f"serve did not start: {''.join(lines)}"
        port = int(m.group(1))
        family = descendants(serve.pid)  # with --cluster local:2: Ray's own processes and the two workers
        assert transport != "cluster" or len(family) >= 4, family
        serve.send_signal(signal.SIGUSR1)  # prints every thread's stack and goes on serving
        deadline = time.monotonic() + 10
        while not any("vl3live-model" in x or "Thread 0x" in x for x in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("Thread 0x" in x for x in lines), "".join(lines)
        r = subprocess.run([sys.executable, "-m", "vl3live", "client", str(clip), "--url",
                            f"ws://127.0.0.1:{port}/", "--fps", "2", "--ask", "What do you see?", "--ask-at", "1"],
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert re.search(r"@1\.\d+s \S", r.stdout), r.stdout  # the answer, tagged with its stream time
        assert re.search(r"session (\S+-)?s1\b", r.stderr) and re.search(r"\[ack\] sent [1-6] processed [1-6]", r.stderr)
        r = subprocess.run([sys.executable, "-m", "vl3live", "client", str(clip), "--url",
                            f"ws://127.0.0.1:{port}/", "--token", "x"], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0  # no token configured on loopback: any is ignored
        r = subprocess.run([sys.executable, "-m", "vl3live", "client", str(clip), "--url",
                            f"ws://127.0.0.1:{port}/nowhere"], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 2 and "HTTP 404" in r.stderr and "Traceback" not in r.stderr
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.send_signal(signal.SIGUSR1)  # its threads' stacks, to say where it is stuck
            time.sleep(2)
            serve.kill()
            raise AssertionError(f"serve did not stop within 30 s of Ctrl-C; it said: {''.join(lines)}") from None
    assert serve.returncode == 0, "".join(lines)
    assert eventually_gone(family), f"still running after serve stopped: {alive_of(family)}"


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (from /proc): pid -> command line."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                try:
                    found[child] = open(f"/proc/{child}/cmdline").read().replace("\0", " ")[:120]
                except OSError:
                    continue
                frontier.append(child)
    return found


def alive_of(family: dict[int, str]) -> dict[int, str]:
    out = {}
    for pid, cmd in family.items():
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out[pid] = cmd
    return out


def eventually_gone(family: dict[int, str], timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while alive_of(family):
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


def test_a_server_bug_is_an_internal_error_and_the_session_goes_on(lm):
    async def main():
        async with ws_rig.serving(lm) as (engine, server, url), Client(url) as c:
            real_ask = engine.ask

            def broken(*args, **kwargs):  # a fault injected once into the question path
                engine.ask = real_ask
                raise RuntimeError("boom")
            engine.ask = broken
            with pytest.raises(ClientError, match="boom") as info:
                async for _ in c.ask("First?"):
                    pass
            assert info.value.code == "internal"
            events = [ev async for ev in c.ask("Second?")]
            done = events[-1]
            assert isinstance(done, P.ResponseDone) and done.text
            assert done.text == "".join(e.text for e in events if isinstance(e, P.ResponseDelta))
    asyncio.run(main())


def test_events_lost_while_disconnected_are_announced_on_resume(lm):
    cfg = ws_rig.config(resume_seconds=30.0)
    cfg.engine.subscriber_queue = 8
    cfg.engine.max_new_tokens = 40

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url):
            c = Client(url)
            await c.connect()
            await c.send_frame(ws_rig.png(ws_rig.frames(1)[0]), pts=0.0)
            await c.next_event("frame.ack")
            await c.send_json({"type": "question", "text": "Tell me everything.", "event_id": "q"})
            await c.disconnect()  # gone while the answer is generated: its 40 deltas overflow the 8-event buffer
            session = engine.get(c.session.session_id)
            assert await eventually(lambda: engine.idle(session) and session.processed == 1, timeout=60)
            await asyncio.sleep(0.1)
            async with Client(url, resume=c.session.resume_token) as c2:
                err = await c2.next_event("error")
                assert err.code == "subscriber_overflow"
                assert await c2.ping() >= 0  # the resumed connection goes on with a fresh buffer
                done = [ev async for ev in c2.ask("And now?", max_new_tokens=3)][-1]
                assert isinstance(done, P.ResponseDone)
    asyncio.run(main())
