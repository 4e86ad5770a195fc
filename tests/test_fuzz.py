"""Fuzz: thousands of malformed and hostile messages (a seeded generator) across sessions, while a
well-formed session alongside keeps getting exactly the answers a direct ``StreamSession`` gives."""

import asyncio
import base64
import json
import random
import string

import websockets

from model import StreamSession
from model.sampling import Sampling
from streamer.websocket import images
from streamer.websocket.client import Client
from tests import ws_rig
from tests.test_protocol import png_header

FUZZERS, SEQUENTIAL, BURST = 4, 400, 150  # 4 x 550 = 2200 hostile messages
QUESTIONS = ["What is in the picture?", "Where is the ball now?", "What changed?", "Describe the colours.",
             "Is anything moving?", "What is at the top left?"]
FRAMES_PER_ROUND = 4


def _config():
    cfg = ws_rig.config(max_messages_per_second=400.0, max_fps=1e6, max_frame_bytes=100_000,
                        source_allow=["rtsp://127.0.0.1"])
    cfg.engine.max_new_tokens = 10
    return cfg


class Hostile:
    """A seeded stream of bad messages, each with the error code it must get (or the close code)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        shot = ws_rig.frames(1, seed=seed)[0]
        self.jpeg, self.png = ws_rig.jpeg(shot), ws_rig.png(shot)
        self.n = 0

    def _eid(self) -> str:
        self.n += 1
        return f"x{self.n}"

    def _bytes(self, n: int) -> bytes:
        return bytes(self.rng.getrandbits(8) for _ in range(n))

    def _junk(self) -> object:
        r = self.rng
        return r.choice([r.randint(-10**12, 10**12), r.random() * 1e9, "".join(r.choices(string.printable, k=20)),
                         [1, "a", None], {"k": [1, {}]}, None, True])

    def message(self, closers: bool = True) -> tuple[str | bytes, str, str | None, bool]:
        """(message, expected code or close code, its event_id, sent as a text frame)."""
        r = self.rng
        kind = r.randrange(24 if closers else 22)
        eid = self._eid()
        if kind == 0:
            return b"\x00" + self._bytes(r.randint(1, 3000)), "bad_image", None, False
        if kind == 1:
            return images.JPEG_MAGIC + self._bytes(r.randint(1, 3000)), "bad_image", None, False
        if kind == 2:
            return self.jpeg[: r.randint(3, len(self.jpeg) // 2)], "bad_image", None, False
        if kind == 3:
            return self.png[: r.randint(8, len(self.png) - 20)], "bad_image", None, False
        if kind == 4:
            return png_header(r.randint(5000, 60000), r.randint(5000, 60000)), "frame_too_many_pixels", None, False
        if kind == 5:
            return b"", "bad_image", None, False
        if kind == 6:
            return images.PNG_MAGIC + bytes(r.randint(100_001, 110_000)), "frame_too_large", None, False
        if kind == 7:
            text = "".join(r.choices(string.printable, k=r.randint(1, 200)))
            return "{" + text, "invalid_json", None, True
        if kind == 8:
            return json.dumps(r.choice([[1, 2], 3.5, "type", None, [{"type": "ping"}]])), "invalid_json", None, True
        if kind == 9:
            depth = r.randint(2000, 90000)  # deep, yet under the transport limit
            return "[" * depth + "]" * depth, "invalid_json", None, True
        if kind == 10:
            t = r.choice(["frame", "Question", "session.delete", "", "ping ", "input_frame.meta.x", 7, None])
            return json.dumps({"type": t, "event_id": eid}), "unknown_type", eid, True
        if kind == 11:
            bad = r.choice([
                {"type": "question", "text": self._junk() if r.random() < 0.5 else ""},
                {"type": "question"},
                {"type": "input_frame", "image": r.randint(0, 9)},
                {"type": "input_frame.meta", "pts": r.choice(["1.0", -5, [1]])},
                {"type": "session.update", "session": r.choice([[], "fast", None, 3])},
                {"type": "source.attach", "url": r.choice([None, 5, ["rtsp://127.0.0.1/"]])},
                {"type": "question", "text": "hi", "max_new_tokens": r.choice([0, -1, "5", 2.5])},
            ])
            if bad.get("text", 1) is None or bad.get("text") is True:
                bad["text"] = 5
            return json.dumps({**bad, "event_id": eid}), "invalid_field", eid, True
        if kind == 12:
            msg = {"type": "ping", "event_id": eid, "".join(r.choices(string.ascii_lowercase, k=6)): self._junk()}
            return json.dumps(msg), "invalid_field", eid, True
        if kind == 13:
            return json.dumps({"type": "question", "text": "is \ud83d this ok", "event_id": eid}), "invalid_text", eid, True
        if kind == 14:
            return json.dumps({"type": "input_frame", "image": "%%not-base64%%" + "A" * r.randint(0, 50),
                               "event_id": eid}), "bad_image", eid, True
        if kind == 15:
            data = base64.b64encode(self._bytes(r.randint(1, 2000))).decode()
            return json.dumps({"type": "input_frame", "image": data, "event_id": eid}), "bad_image", eid, True
        if kind == 16:
            session = r.choice([{"fps": 0}, {"layout": "sideways"}, {"memory_budget": 0}, {"frame_pixels": 10},
                                {"proactive_threshold": 1.5}, {"generation": {"temperature": 0}},
                                {"generation": {"top_p": 0}}, {"diffp_threshold": -1}, {"fps": 1e9}])
            return json.dumps({"type": "session.update", "session": session, "event_id": eid}), "invalid_field", eid, True
        if kind == 17:
            url = r.choice(["file:///etc/passwd", "/etc/shadow", "rtsp://10.1.2.3/cam", "http://127.0.0.1:80/",
                            "concat:rtsp://127.0.0.1/a|file:/etc/passwd", "rtsp://127.0.0.1.evil.com/",
                            "rtsp://[::1]/cam", "subfile,,start,0,end,0,,:/etc/passwd"])
            return json.dumps({"type": "source.attach", "url": url, "event_id": eid}), "source_forbidden", eid, True
        if kind == 18:
            return json.dumps({"type": "question", "text": "why " * 600, "event_id": eid}), "question_too_long", eid, True
        if kind == 19:
            return json.dumps({"type": "response.cancel", "event_id": eid}), "nothing_to_cancel", eid, True
        if kind == 20:
            return json.dumps({"type": "source.detach", "event_id": eid}), "source_busy", eid, True
        if kind == 21:
            return f'{{"type": "input_frame.meta", "pts": NaN, "event_id": "{eid}"}}', "invalid_field", eid, True
        if kind == 22:
            return b'{"type": "ping", "text": "\xff\xfe"}', "1007", None, True  # not UTF-8: the RFC's close
        return b"\0" * 300_000, "1009", None, False  # over the transport limit


async def _send(ws, message, text: bool) -> None:
    await ws.send(message, text=True) if isinstance(message, bytes) and text else await ws.send(message)


async def _reply(ws, timeout: float = 30.0) -> dict:
    return await ws_rig.recv_json(ws, ("error", "pong", "session.updated"), timeout)


async def _fuzzer(url: str, seed: int, stats: dict) -> str:
    gen = Hostile(seed)
    ws = await websockets.connect(url, max_size=None)
    created = await ws_rig.recv_json(ws, ("session.created",))
    sid, token = created["session_id"], created["resume_token"]
    for _ in range(SEQUENTIAL):
        message, expect, eid, text = gen.message()
        await _send(ws, message, text)
        stats["sent"] += 1
        if expect.isdigit():  # documented close: resume the session and go on
            try:
                await ws_rig.recv_json(ws, ("never",))
            except websockets.ConnectionClosed:
                pass
            assert ws.close_code == int(expect), (expect, ws.close_code)
            stats["closed"] += 1
            stats["close_codes"].add(ws.close_code)
            ws = await websockets.connect(url + f"?resume={token}", max_size=None)
            again = await ws_rig.recv_json(ws, ("session.created",))
            assert again["resumed"] and again["session_id"] == sid and again["resume_token"] != token
            token = again["resume_token"]  # each resume hands out a new one
            continue
        reply = await _reply(ws)
        assert reply["type"] == "error", (message[:200], reply)
        assert reply["code"] in (expect, "rate_limited"), (message[:200], expect, reply)
        assert reply["event_id"] == eid, (message[:200], reply)
        stats["errors"] += 1
    burst = [gen.message(closers=False) for _ in range(BURST)]  # a flood: sent without waiting
    for message, _, _, text in burst:
        await _send(ws, message, text)
    stats["sent"] += BURST
    replies = [await _reply(ws) for _ in range(BURST)]
    assert all(r["type"] == "error" for r in replies)
    assert sorted(str(r["event_id"]) for r in replies) == sorted(str(eid) for _, _, eid, _ in burst)
    assert {r["code"] for r in replies} <= {code for _, code, _, _ in burst} | {"rate_limited"}
    stats["errors"] += BURST
    stats["rate_limited"] += sum(r["code"] == "rate_limited" for r in replies)
    await ws.send(json.dumps({"type": "ping", "event_id": "alive"}))
    assert (await _reply(ws))["type"] == "pong"  # the connection is up after all that
    await ws.close(1001)  # going away, not done: the session stays (for resume) to be inspected
    return sid


def _reference(lm, cfg, rounds: int) -> list[str]:
    """The answers a direct StreamSession gives for the good client's frames and questions."""
    s = StreamSession(lm, cfg.session)
    shots = ws_rig.frames(FRAMES_PER_ROUND * rounds)
    out = []
    for r in range(rounds):
        for i in range(FRAMES_PER_ROUND):
            k = r * FRAMES_PER_ROUND + i
            s.add_frame(images.decode_image(ws_rig.png(shots[k]), 10**7, 10**7), float(k))
        out.append("".join(d.text for d in s.ask(QUESTIONS[r], Sampling(max_new_tokens=cfg.engine.max_new_tokens))))
    return out


def test_fuzz_thousands_of_hostile_messages_while_a_good_session_gets_correct_answers(lm):
    cfg = _config()
    rounds = len(QUESTIONS)
    reference = _reference(lm, cfg, rounds)  # before the server: the model is the worker's afterwards
    shots = ws_rig.frames(FRAMES_PER_ROUND * rounds)
    stats = {"sent": 0, "errors": 0, "closed": 0, "rate_limited": 0, "close_codes": set()}

    async def main():
        async with ws_rig.serving(lm, cfg) as (engine, server, url):
            done = asyncio.Event()

            async def good() -> list[str]:
                answers = []
                async with Client(url) as c:
                    for r in range(rounds):
                        for i in range(FRAMES_PER_ROUND):
                            k = r * FRAMES_PER_ROUND + i
                            await c.send_frame(ws_rig.png(shots[k]), pts=float(k))
                            ack = await c.next_event("frame.ack")
                            while ack.processed < k + 1:
                                ack = await c.next_event("frame.ack")
                        answer = [ev async for ev in c.ask(QUESTIONS[r])][-1]
                        answers.append(answer.text)
                        if done.is_set() and r >= 1:
                            break
                    assert ack.dropped == 0 and ack.rejected == 0
                return answers

            good_task = asyncio.create_task(good())
            sids = await asyncio.gather(*(_fuzzer(url, seed, stats) for seed in range(FUZZERS)))
            done.set()
            answers = await good_task
            for sid in sids:  # no hostile message put anything into a fuzzed session's cache
                snap = await engine.snapshot(engine.get(sid))
                assert snap.stats.frames_added == 0
                assert snap.state.counts.processed == 0 and snap.stats.frames_in_cache == 0
            return answers, server.metrics.render().decode()

    answers, metrics = asyncio.run(main())
    assert stats["sent"] == FUZZERS * (SEQUENTIAL + BURST) >= 2000
    assert stats["errors"] + stats["closed"] == stats["sent"] and stats["close_codes"] == {1007, 1009}
    assert len(answers) >= 2 and answers == reference[:len(answers)]
    assert all(answers)
    assert 'vl3live_errors_total{code="bad_image"}' in metrics
