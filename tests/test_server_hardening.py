"""What a hostile or careless client found (issue 13), each on the real server over loopback: settings
out of range, frames the model refuses, oversized frame budgets, slots held after a clean close,
duplicate headers, cross-site handshakes, absurd timestamps, blank instructions, recall memory."""

import asyncio
import logging
import re

import numpy as np
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from streamer.websocket import protocol as P
from streamer.websocket.client import Client, ClientError
from tests import ws_rig
from tests.conftest import eventually
from tests.test_server import _ack, _get, _metric


def _adds_up(a: P.FrameAck) -> bool:
    return a.accepted == a.sampled_out + a.dropped + a.processed + a.refused + a.pending and \
        a.received == a.accepted - a.source_frames + a.rate_dropped + a.rejected


def test_a_setting_out_of_range_is_refused_and_a_failed_answer_never_bricks_the_session(lm, monkeypatch):
    async def main():
        async with ws_rig.serving(lm) as (engine, server, url), Client(url) as c:
            session = engine.get(c.session.session_id)
            before = session.sampling
            for bad in ({"seed": 2**64}, {"seed": -3}, {"temperature": 1e300}, {"top_k": 2**40}):
                with pytest.raises(ClientError) as info:
                    await c.update(generation={"do_sample": True, **bad})
                assert info.value.code == "invalid_field"
            assert (await engine.snapshot(session)).sampling == before and not before.do_sample  # none applied
            with pytest.raises(ClientError) as info:  # all or nothing: a good fps with a bad seed changes neither
                await c.update(fps=4, generation={"seed": 2**64})
            assert info.value.code == "invalid_field" and (await engine.snapshot(session)).settings.fps == 2.0
            await c.update(generation={"do_sample": True, "seed": 2**63 - 1})  # the largest seed works
            await c.send_frame(ws_rig.png(ws_rig.frames(1)[0]), pts=0.0)
            await _ack(c, lambda a: a.processed == 1)
            done = [ev async for ev in c.ask("First?")][-1]
            assert isinstance(done, P.ResponseDone)

            import model.answering as ms
            real = ms.IncrementalDetokenizer

            def broken(*args, **kwargs):  # a failure of any kind once an answer has started
                monkeypatch.setattr(ms, "IncrementalDetokenizer", real)
                raise RuntimeError("injected")
            monkeypatch.setattr(ms, "IncrementalDetokenizer", broken)
            events = []
            with pytest.raises(ClientError, match="injected") as info:
                async for ev in c.ask("Second?"):
                    events.append(ev)
            assert info.value.code == "internal" and info.value.error.event_id
            await c.send_frame(ws_rig.png(ws_rig.frames(2)[1]), pts=1.0)  # frames and questions go on
            ack = await _ack(c, lambda a: a.processed == 2)
            assert ack.refused == 0
            events = [ev async for ev in c.ask("Third?")]
            done = events[-1]
            assert isinstance(done, P.ResponseDone) and done.text
            assert done.text == "".join(e.text for e in events if isinstance(e, P.ResponseDelta))
    asyncio.run(main())


def test_every_frame_has_exactly_one_outcome_in_acks_stats_and_metrics(lm):
    cfg = ws_rig.config(max_fps=1000.0)
    shots = ws_rig.frames(6)

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url), Client(url) as c:
            seen = []
            await c.send_frame(ws_rig.png(shots[0]), pts=0.0, event_id="f0")
            await c.send_frame(ws_rig.png(np.zeros((10, 3000, 3), np.uint8)), pts=1.0, event_id="wide")  # ratio 300
            err = await c.next_event("error")
            assert err.code == "bad_frame" and err.event_id == "wide" and "aspect" in err.message
            await c.send_frame(b"GIF89a not an image", pts=2.0, event_id="gif")
            assert (await c.next_event("error")).event_id == "gif"
            for i in range(1, 6):  # a few more, some faster than the session's 2 fps (sampled out)
                await c.send_frame(ws_rig.png(shots[i]), pts=2.0 + i * 0.3, event_id=f"f{i}")
            final = await _ack(c, lambda a: a.received == 8 and a.pending == 0 and a.processed >= 2, log=seen)
            acks = [ev for ev in seen if isinstance(ev, P.FrameAck)]
            assert acks and all(_adds_up(a) for a in acks)  # every ack on the way adds up
            assert (final.received, final.accepted, final.rejected, final.refused) == (8, 7, 1, 1)
            assert final.sampled_out >= 1 and final.processed + final.dropped + final.sampled_out == 6
            # a stats event may go out before the final ack (acks wait for frames in transit, stats do not)
            sent = [ev for ev in seen if isinstance(ev, P.Stats)]
            stats = sent[-1] if sent else await c.next_event("stats", timeout=10)
            st = stats.stats
            assert st["accepted"] == st["sampled_out"] + st["dropped"] + st["processed"] + st["refused"] + \
                st["pending"]
            _, metrics = await asyncio.to_thread(_get, url.replace("ws://", "http://") + "metrics")
            m = {k: _metric(metrics, f'vl3live_frames_total{{outcome="{k}"}}') for k in
                 ("received", "accepted", "source_frames", "rate_dropped", "rejected", "sampled_out", "dropped",
                  "processed", "refused")}
            pending = _metric(metrics, "vl3live_frames_pending")
            assert m["accepted"] == m["sampled_out"] + m["dropped"] + m["processed"] + m["refused"] + pending
            assert m["received"] == m["accepted"] - m["source_frames"] + m["rate_dropped"] + m["rejected"]
            assert (m["received"], m["refused"], m["processed"]) == (8, 1, final.processed)
    asyncio.run(main())


def test_a_session_cannot_ask_for_frames_larger_than_the_server_allows(lm):
    cfg = ws_rig.config()  # session.frame_pixels = 84 x 112: the cap defaults to 4x that
    cap = 4 * cfg.session.frame_pixels

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url), Client(url) as c:
            assert c.session.limits["max_session_frame_pixels"] == cap
            with pytest.raises(ClientError, match="max_session_frame_pixels") as info:
                await c.update(frame_pixels=cap + 1)
            assert info.value.code == "invalid_field"
            assert (await engine.snapshot(engine.get(c.session.session_id))).config.frame_pixels == cfg.session.frame_pixels
            up = await c.update(frame_pixels=cap)
            assert up.settings["frame_pixels"] == cap
    asyncio.run(main())
    cfg = ws_rig.config(max_session_frame_pixels=28 * 28 * 2)

    async def configured():
        async with ws_rig.serving(lm, cfg) as (engine, server, url), Client(url) as c:
            with pytest.raises(ClientError, match="at most 1568"):
                await c.update(frame_pixels=28 * 28 * 3)
    asyncio.run(configured())


def test_a_clean_close_or_session_close_frees_the_slot_at_once(lm):
    cfg = ws_rig.config(max_sessions=2, resume_seconds=60.0)

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url):
            for _ in range(3):  # more than max_sessions, one after another, each closed cleanly (1000)
                async with Client(url) as c:
                    await c.send_frame(ws_rig.png(ws_rig.frames(1)[0]), pts=0.0)
                    await _ack(c, lambda a: a.processed == 1)
            assert await eventually(lambda: not server.sessions and not engine.sessions, timeout=10)
            c1 = Client(url)
            await c1.connect()
            closed = await c1.end()  # session.close: answered, then the server closes with 1000
            assert closed.session_id == c1.session.session_id and c1.closed[0] == 1000
            tail = [ev.type async for ev in c1.events()]
            assert tail[-2:] == ["frame.ack", "session.closed"]  # the final counts come first
            assert not server.sessions and not engine.sessions
            a, b = Client(url), Client(url)  # the server is empty again: two fit
            await a.connect()
            await b.connect()
            await b.disconnect()  # going away (1001): held for a resume, so the server is full
            assert await eventually(lambda: len(server.sessions) == 2 and server.sessions, timeout=10)
            with pytest.raises(ClientError) as info:
                await Client(url).connect()
            assert info.value.code == "too_many_sessions"
            await a.close()
    asyncio.run(main())


async def _raw_handshake(port: int, headers: list[tuple[str, str]]) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = ["GET / HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
             *(f"{k}: {v}" for k, v in headers)]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    status = (await asyncio.wait_for(reader.readline(), 10)).decode()
    writer.close()
    return status


def test_duplicate_headers_are_a_bad_request_with_one_log_line(lm, caplog):
    cfg = ws_rig.config(token="s3cret")

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url):
            port = server.port
            with caplog.at_level(logging.WARNING):
                for doubled in ([("Origin", "http://127.0.0.1"), ("Origin", "http://evil.example")],
                                [("Authorization", "Bearer s3cret"), ("Authorization", "Bearer guess")]):
                    status = await _raw_handshake(port, doubled)
                    assert status.startswith("HTTP/1.1 400"), status
                ok = await _raw_handshake(port, [("Authorization", "Bearer s3cret")])
                assert ok.startswith("HTTP/1.1 101"), ok
            assert not engine.sessions or len(engine.sessions) == 1  # only the good handshake got one
            records = [r for r in caplog.records if "duplicate" in r.getMessage()]
            assert len(records) == 2 and all(r.exc_info is None for r in records)
            assert not any(r.exc_info for r in caplog.records)  # no traceback anywhere
    asyncio.run(main())


def test_by_default_only_programs_and_loopback_pages_may_connect(lm):
    async def main():
        async with ws_rig.serving(lm) as (engine, server, url):  # default config: no token, allowed_origins null
            for evil in ("http://evil.example", "https://127.0.0.1.evil.example", "null", "file://"):
                with pytest.raises(InvalidStatus) as info:
                    await websockets.connect(url, origin=evil)
                assert info.value.response.status_code == 403, evil
            for page in ("http://127.0.0.1:7860", "http://localhost:3000", "http://[::1]:8080"):
                async with Client(url, origin=page) as c:
                    assert c.session.session_id
            async with Client(url) as c:  # no Origin: not a browser
                assert c.session.session_id
            _, metrics = await asyncio.to_thread(_get, url.replace("ws://", "http://") + "metrics")
            assert _metric(metrics, 'vl3live_handshakes_refused_total{reason="origin"}') == 4
    asyncio.run(main())
    cfg = ws_rig.config(allowed_origins=["https://app.example.com"])

    async def listed():
        async with ws_rig.serving(lm, cfg) as (engine, server, url):
            async with Client(url, origin="https://app.example.com") as c:
                assert c.session.session_id
            with pytest.raises(InvalidStatus):  # a list replaces the loopback default
                await websockets.connect(url, origin="http://127.0.0.1:7860")
    asyncio.run(listed())


def test_pts_jumps_blank_instructions_and_the_server_wide_recall_bound(lm):
    cfg = ws_rig.config(max_pts_jump=100.0, max_sessions=4, recall_memory_mb=0.08)
    cfg.session.budget.max_tokens = 600
    cfg.session.budget.recent_tokens = 100
    shots = ws_rig.frames(4)

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url), Client(url) as c:
            session = engine.get(c.session.session_id)
            await c.send_frame(ws_rig.png(shots[0]), pts=1.0)
            await _ack(c, lambda a: a.processed == 1)
            await c.send_frame(ws_rig.png(shots[1]), pts=1e8, event_id="far")  # finite but absurd
            err = await c.next_event("error")
            assert err.code == "invalid_field" and err.event_id == "far" and "max_pts_jump" in err.message
            await c.send_frame(ws_rig.png(shots[2]), pts=50.0)  # within the bound: the clock goes on
            ack = await _ack(c, lambda a: a.processed == 2)
            assert ack.last_pts == 50.0 and ack.rejected == 1
            for text, code in ((" ", "invalid_field"), ("\n\t", "invalid_field"), ("x" * 3000, "question_too_long")):
                with pytest.raises(ClientError) as info:
                    await c.update(instruction=text)
                assert info.value.code == code, text
            assert (await engine.snapshot(session)).instruction is None
            # each session's recall store gets server.recall_memory_mb / max_sessions at most
            assert (await engine.snapshot(session)).config.budget.recall_memory_mb == pytest.approx(0.02)
            rng = np.random.default_rng(0)
            for i in range(40):  # enough to evict frames into the (tiny) store and past its cap
                await c.send_frame(ws_rig.png(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)), pts=51.0 + i)
                await _ack(c, lambda a, n=3 + i: a.processed + a.refused + a.dropped + a.sampled_out >= n)
            st = (await engine.snapshot(session)).stats
            assert st.evicted_frames > 0 and st.recall_stored > 0 and st.recall_dropped > 0
            assert st.recall_mb <= 0.02
    asyncio.run(main())


def test_a_cross_site_page_in_a_real_browser_cannot_use_the_local_server(lm, tmp_path):
    """Chromium on a page from another site opens ws://127.0.0.1:PORT/: the server refuses it (403);
    the same page served from loopback connects."""
    import http.server
    import threading

    from playwright.sync_api import sync_playwright

    from tests.browser_rig import CHROMIUM_FLAGS

    (tmp_path / "index.html").write_text("<!doctype html><script>window.result = new Promise(done => {"
                                         "const ws = new WebSocket(location.hash.slice(1));"
                                         "ws.onmessage = m => done(JSON.parse(m.data).type);"
                                         "ws.onerror = () => done('refused'); });</script>")
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **kw)  # noqa: E731
    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    page_port = pages.server_address[1]
    with ws_rig.ServerThread(lm) as srv:
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
                    *CHROMIUM_FLAGS, "--host-resolver-rules=MAP evil.example 127.0.0.1"])
                outcomes = {}
                for site in (f"http://evil.example:{page_port}/", f"http://127.0.0.1:{page_port}/"):
                    page = browser.new_page()
                    page.goto(site + "#" + srv.url)
                    outcomes[site.split(":")[1]] = page.evaluate("window.result")
                    page.close()
                browser.close()
        finally:
            pages.shutdown()
        _, metrics = _get(srv.url.replace("ws://", "http://") + "metrics")
    assert outcomes == {"//evil.example": "refused", "//127.0.0.1": "session.created"}, outcomes
    assert _metric(metrics, 'vl3live_handshakes_refused_total{reason="origin"}') == 1
    assert re.search(r"^vl3live_connections_total 1\.0$", metrics, re.M)  # the refused one never got a session


def test_a_ray_backed_door_places_each_session_on_the_freest_worker_and_refuses_when_none_has_room(lm):
    cfg = ws_rig.config(max_sessions=8)
    cfg.session.budget.max_tokens = 1000
    cfg.engine.kv_pool_tokens = 1500  # one session's budget per worker, two workers

    async def main():
        async with ws_rig.serving(lm, cfg, "cluster") as (engine, server, url):
            async with websockets.connect(url) as first, websockets.connect(url) as second:
                a = await ws_rig.recv_json(first, ("session.created",))
                b = await ws_rig.recv_json(second, ("session.created",))
                placed = {engine.worker_of(engine.get(x["session_id"])) for x in (a, b)}
                assert len(placed) == 2  # one on each: the other had the free pool
                async with websockets.connect(url) as third:
                    err = await ws_rig.recv_json(third)
                    assert err["code"] == "too_many_sessions" and "KV pool" in err["message"]
                    with pytest.raises(websockets.ConnectionClosed):
                        await third.recv()
                    assert third.close_code == 1013
                _, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/metrics")
                assert "vl3live_kv_pool_tokens 2976.0" in body and "vl3live_kv_sessions 2.0" in body
                for w in placed:
                    assert f'vl3live_worker_sessions{{worker="{w}"}} 1.0' in body
            assert await eventually(lambda: not engine.sessions, timeout=10)
            async with websockets.connect(url) as fourth:  # the pages came back
                assert (await ws_rig.recv_json(fourth, ("session.created",)))["type"] == "session.created"
    asyncio.run(main())


def test_a_session_the_kv_pool_cannot_hold_is_refused_with_1013_until_another_closes(lm):
    cfg = ws_rig.config(max_sessions=8)
    cfg.session.budget.max_tokens = 1000
    cfg.engine.kv_pool_tokens = 1500  # one session's budget, not two

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url):
            async with websockets.connect(url) as first:
                await ws_rig.recv_json(first, ("session.created",))
                async with websockets.connect(url) as second:
                    err = await ws_rig.recv_json(second)
                    assert err["code"] == "too_many_sessions" and "KV pool" in err["message"]
                    with pytest.raises(websockets.ConnectionClosed):
                        await second.recv()
                    assert second.close_code == 1013
                assert len(engine.sessions) == 1
                _, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/metrics")
                assert "vl3live_kv_pool_tokens 1488.0" in body and "vl3live_kv_sessions 1.0" in body
                assert "vl3live_kv_bytes_per_token 512.0" in body
            assert await eventually(lambda: not engine.sessions, timeout=10)
            async with websockets.connect(url) as third:  # the pages came back
                assert (await ws_rig.recv_json(third, ("session.created",)))["type"] == "session.created"
    asyncio.run(main())


def test_a_rate_limited_frame_is_counted_once_with_its_event_id(lm):
    """Frames over the message rate (binary with their meta, or input_frame with its image inline) are
    received and rate-dropped in the counts, and their error carries their event_id."""
    cfg = ws_rig.config(max_messages_per_second=5.0, max_fps=1000.0)

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url):
            async with websockets.connect(url, max_size=None) as ws:
                await ws_rig.recv_json(ws, ("session.created",))
                png = ws_rig.png(ws_rig.frames(1)[0])
                b64 = __import__("base64").b64encode(png).decode().ljust(70000)  # a big text message
                for i in range(12):  # 36 messages at once: the bucket (burst 10) refuses most of them
                    await ws.send(f'{{"type": "input_frame.meta", "pts": {i}, "event_id": "b{i}"}}')
                    await ws.send(png)
                    await ws.send(f'{{"type": "input_frame", "image": "{b64.strip()}", "event_id": "t{i}"}}')
                limited = []
                while True:  # until an ack counts them all (acks are coalesced)
                    ev = await ws_rig.recv_json(ws, ("error", "frame.ack"), timeout=10)
                    if ev["type"] == "error":
                        assert ev["code"] == "rate_limited", ev
                        limited.append(ev)
                    elif ev["received"] >= 24 and ev["pending"] == 0:
                        break
                ack = P.FrameAck.model_validate(ev)
                assert ack.received == 24, ack  # every frame that reached the server, once
                assert _adds_up(ack) and ack.rate_dropped >= 10
                frame_ids = {e["event_id"] for e in limited if e["code"] == "rate_limited"} - {None}
                assert any(i.startswith("b") for i in frame_ids) and any(i.startswith("t") for i in frame_ids)
    asyncio.run(main())
