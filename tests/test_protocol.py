"""The websocket protocol on raw messages: every client message, every server event, every parser error code."""

import base64
import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamer.websocket import images
from streamer.websocket import protocol as P

DOCS = Path(__file__).resolve().parent.parent / "docs"


def encode(rgb: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG that claims ``w`` x ``h`` with a one-row body: only its header is plausible."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return images.PNG_MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


_Y, _X = np.mgrid[0:48, 0:64]
RGB = np.stack([_X * 4, _Y * 5, (_X + _Y) * 2], axis=-1).astype(np.uint8)  # smooth: JPEG keeps it close

VALID = [
    {"type": "session.update", "event_id": "u1", "session": {
        "fps": 2, "layout": "stream", "diffp_threshold": 4.5, "memory_budget": 8192, "frame_pixels": 9408,
        "instruction": "tell me when the door opens", "proactive_threshold": 0.6, "proactive_cooldown": 5,
        "proactive_every": 3, "generation": {"max_new_tokens": 64, "do_sample": True, "temperature": 0.7,
                                             "top_k": 20, "top_p": 0.9, "seed": 1}}},
    {"type": "session.update", "session": {}},
    {"type": "input_frame", "image": base64.b64encode(encode(RGB)).decode(), "pts": 1.5, "event_id": "f1"},
    {"type": "input_frame.meta", "pts": 2.0},
    {"type": "source.attach", "url": "rtsp://127.0.0.1:8554/cam"},
    {"type": "source.detach"},
    {"type": "question", "text": "What is on the table?", "event_id": "q1", "max_new_tokens": 32},
    {"type": "response.cancel"},
    {"type": "ping", "event_id": "p"},
    {"type": "session.close", "event_id": "bye"},
]


@pytest.mark.parametrize("message", VALID, ids=lambda m: m["type"])
def test_every_client_message_parses(message):
    parsed = P.parse_client_message(json.dumps(message))
    assert parsed.type == message["type"]
    assert parsed.event_id == message.get("event_id")


def test_the_models_cover_every_client_type():
    assert {m["type"] for m in VALID} == set(P.CLIENT_MODELS)


BAD = [
    ("not json", "invalid_json"),
    ("", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    ("null", "invalid_json"),
    ("[" * 100000 + "]" * 100000, "invalid_json"),
    ('{"event_id": "e"}', "unknown_type"),
    ('{"type": "frame", "event_id": "e"}', "unknown_type"),
    ('{"type": 5, "event_id": "e"}', "unknown_type"),
    ('{"type": "question", "text": "\\ud800 hi", "event_id": "e"}', "invalid_text"),
    ('{"type": "question", "text": 5, "event_id": "e"}', "invalid_field"),
    ('{"type": "question", "event_id": "e"}', "invalid_field"),
    ('{"type": "question", "text": "hi", "colour": "red", "event_id": "e"}', "invalid_field"),
    ('{"type": "question", "text": "hi", "max_new_tokens": "5", "event_id": "e"}', "invalid_field"),
    ('{"type": "input_frame.meta", "pts": NaN, "event_id": "e"}', "invalid_field"),
    ('{"type": "input_frame.meta", "pts": -1, "event_id": "e"}', "invalid_field"),
    ('{"type": "input_frame", "pts": 1, "event_id": "e"}', "invalid_field"),
    ('{"type": "session.update", "session": {"layout": "sideways"}, "event_id": "e"}', "invalid_field"),
    ('{"type": "session.update", "session": {"fps": 0}, "event_id": "e"}', "invalid_field"),
    ('{"type": "session.update", "session": {"generation": {"top_p": 2}}, "event_id": "e"}', "invalid_field"),
    ('{"type": "session.update", "session": {"memory_budget": 1e400}, "event_id": "e"}', "invalid_field"),
    # every number is range-checked here, at the boundary: none can reach the engine and fail there
    ('{"type": "session.update", "session": {"generation": {"seed": 18446744073709551616}}, "event_id": "e"}',
     "invalid_field"),
    ('{"type": "session.update", "session": {"generation": {"seed": -1}}, "event_id": "e"}', "invalid_field"),
    ('{"type": "session.update", "session": {"generation": {"temperature": 1e300}}, "event_id": "e"}',
     "invalid_field"),
    ('{"type": "session.update", "session": {"generation": {"top_k": 1099511627776}}, "event_id": "e"}',
     "invalid_field"),
    ('{"type": "session.update", "session": {"generation": {"max_new_tokens": 1099511627776}}, "event_id": "e"}',
     "invalid_field"),
    ('{"type": "session.update", "session": {"memory_budget": 1099511627776}, "event_id": "e"}', "invalid_field"),
    ('{"type": "session.update", "session": {"frame_pixels": 1099511627776}, "event_id": "e"}', "invalid_field"),
    ('{"type": "session.update", "session": {"fps": 1e9}, "event_id": "e"}', "invalid_field"),
    ('{"type": "session.update", "session": {"diffp_threshold": 1e300}, "event_id": "e"}', "invalid_field"),
    ('{"type": "session.update", "session": {"proactive_cooldown": 1e300}, "event_id": "e"}', "invalid_field"),
    ('{"type": "session.update", "session": {"proactive_every": 1e300}, "event_id": "e"}', "invalid_field"),
    ('{"type": "input_frame.meta", "pts": 1e308, "event_id": "e"}', "invalid_field"),
    ('{"type": "question", "text": "hi", "max_new_tokens": 1099511627776, "event_id": "e"}', "invalid_field"),
    ('{"type": "ping", "event_id": 7}', "invalid_field"),
    ('{"type": "source.attach", "url": ["rtsp://x"], "event_id": "e"}', "invalid_field"),
]


@pytest.mark.parametrize("text,code", BAD, ids=[f"{c}-{i}" for i, (_, c) in enumerate(BAD)])
def test_bad_messages_get_their_stable_code_and_event_id(text, code):
    with pytest.raises(P.ProtocolError) as info:
        P.parse_client_message(text)
    err = info.value
    assert err.code == code and err.message
    if '"event_id": "e"' in text:
        assert err.event_id == "e"
    else:
        assert err.event_id is None
    event = P.parse_server_event(P.dump(P.Error(code=err.code, message=err.message, event_id=err.event_id)))
    assert event.code == code


def test_frames_decode_and_every_image_error_code():
    limit_bytes, limit_px = 1 << 20, 4096 * 4096
    png = images.decode_image(encode(RGB, "PNG"), limit_bytes, limit_px)
    assert png.shape == RGB.shape and np.array_equal(png, RGB) and png.flags.writeable
    jpg = images.decode_image(encode(RGB), limit_bytes, limit_px)
    assert jpg.shape == RGB.shape and np.abs(jpg.astype(int) - RGB).mean() < 4
    gray = images.decode_image(encode(RGB[..., 0], "PNG"), limit_bytes, limit_px)
    assert gray.shape == RGB.shape  # converted to RGB
    b64 = base64.b64encode(encode(RGB)).decode()
    assert images.decode_base64_image(b64, limit_bytes) == encode(RGB)

    def code(data, max_bytes=limit_bytes, max_px=limit_px):
        with pytest.raises(P.ProtocolError) as info:
            images.decode_image(data, max_bytes, max_px)
        return info.value.code

    jpeg = encode(RGB)
    assert code(b"") == "bad_image"  # zero size
    assert code(b"GIF89a" + jpeg[6:]) == "bad_image"  # wrong magic
    assert code(jpeg[: len(jpeg) // 2]) == "bad_image"  # truncated
    assert code(images.JPEG_MAGIC + bytes(200)) == "bad_image"  # right magic, garbage
    assert code(encode(RGB, "PNG")[:60]) == "bad_image"  # truncated PNG
    assert code(png_header(20000, 20000)) == "frame_too_many_pixels"
    assert code(png_header(5000, 5000), max_px=5000 * 4999) == "frame_too_many_pixels"
    assert code(jpeg, max_bytes=len(jpeg) - 1) == "frame_too_large"
    with pytest.raises(P.ProtocolError, match="base64") as info:
        images.decode_base64_image("not base64!!", limit_bytes)
    assert info.value.code == "bad_image"
    with pytest.raises(P.ProtocolError) as info:
        images.decode_base64_image("A" * 2000, 1000)
    assert info.value.code == "frame_too_large"


SERVER_EVENTS = [
    P.SessionCreated(session_id="s1", resume_token="tok", resume_seconds=30, settings={"fps": 1}, limits={}),
    P.SessionUpdated(event_id="u1", settings={"fps": 2}),
    P.FrameAck(received=3, accepted=3, rate_dropped=0, rejected=0, sampled_out=0, dropped=1, processed=1, refused=1,
               pending=0, last_event_id="f3", last_pts=1.0, tokens_kept=10, tokens_total=12, cache_len=100),
    P.ResponseCreated(response_id="r1", event_id="q1", question="what?", proactive=False, t=1.0),
    P.ResponseDelta(response_id="r1", text="a cup", t=1.0),
    P.ResponseDone(response_id="r1", event_id="q1", text="a cup", proactive=False, cancelled=False, ttft_ms=5.0,
                   t=1.0),
    P.Alert(response_id="r2", text="the door opened", instruction="tell me", t=4.0),
    P.Stats(t=2.0, stats={"cache_len": 100}),
    P.SourceEnded(url="rtsp://127.0.0.1/cam"),
    P.SessionClosed(event_id="bye", session_id="s1"),
    P.Error(code="bad_image", message="empty image", event_id="f9"),
    P.Pong(event_id="p", server_time=1.0),
]


def test_every_server_event_round_trips_and_off_schema_events_are_refused():
    assert {e.type for e in SERVER_EVENTS} == set(P.json_schema()["server"]["discriminator"]["mapping"])
    for ev in SERVER_EVENTS:
        assert P.parse_server_event(P.dump(ev)) == ev
    with pytest.raises(ValueError):
        P.parse_server_event('{"type": "pong", "server_time": 1, "surprise": 1}')
    with pytest.raises(ValueError):
        P.parse_server_event('{"type": "response.delta", "text": "x", "t": null}')


def test_the_committed_schema_is_the_generated_one():
    committed = json.loads((DOCS / "protocol.schema.json").read_text())
    assert committed == json.loads(json.dumps(P.json_schema())), "run: vl3live protocol-schema -o docs/protocol.schema.json"
    assert committed["version"] == P.PROTOCOL_VERSION


def test_the_docs_example_conversation_is_valid_and_every_code_is_documented():
    text = (DOCS / "protocol.md").read_text()
    lines = re.findall(r"^([<>]) (\{.*\})$", text, re.M)
    assert sum(d == ">" for d, _ in lines) >= 5 and sum(d == "<" for d, _ in lines) >= 8
    for i, (direction, line) in enumerate(lines):
        if direction == "<":
            P.parse_server_event(line)
            continue
        try:
            P.parse_client_message(line)
        except P.ProtocolError as exc:  # the example shows a refused message: the next event is its error
            reply = P.parse_server_event(lines[i + 1][1])
            assert (reply.type, reply.code, reply.event_id, reply.message) == ("error", exc.code, exc.event_id,
                                                                                exc.message)
    for code in P.ERROR_CODES:
        assert f"`{code}`" in text, code
    for close in P.CLOSE_CODES:
        assert f"`{close}`" in text, close


# -- engine events -> messages (streamer/websocket/translate.py), on raw events --------------------------
def _counts(**kw):
    from streamer.events import FrameCounts

    return FrameCounts(**kw)


def test_every_answer_event_becomes_its_message_field_for_field():
    from streamer import events as E
    from streamer.websocket import translate

    cases = [
        (E.ResponseCreated(session="s", t=1.5, response_id="r1", question="What?", event_id="q1"),
         P.ResponseCreated(response_id="r1", event_id="q1", question="What?", proactive=False, t=1.5)),
        (E.ResponseDelta(session="s", t=1.5, response_id="r1", text="A ca"),
         P.ResponseDelta(response_id="r1", text="A ca", t=1.5)),
        (E.ResponseDone(session="s", t=1.5, response_id="r1", text="A cat.", cancelled=True, ttft_ms=12.5),
         P.ResponseDone(response_id="r1", text="A cat.", proactive=False, cancelled=True, ttft_ms=12.5, t=1.5)),
        (E.Alert(session="s", t=9.0, response_id="a1", text="Red!", instruction="Say red."),
         P.Alert(response_id="a1", text="Red!", instruction="Say red.", t=9.0)),
        (E.Error(session="s", code="bad_frame", message="uint8", event_id="f3"),
         P.Error(code="bad_frame", message="uint8", event_id="f3")),
        (E.Error(session="s", code="not_a_protocol_code", message="x"), P.Error(code="internal", message="x")),
        (E.SourceEnded(session="s", counts=_counts()), P.SourceEnded(url="rtsp://cam/")),
    ]
    for ev, expected in cases:
        assert translate.message(ev, source_url="rtsp://cam/") == expected, ev
        P.parse_server_event(P.dump(expected))  # and each is a valid server message
    for ev in (E.SessionCreated(session="s", layout="stream", max_tokens=10),
               E.SessionClosed(session="s", counts=_counts())):
        assert translate.message(ev) is None  # the server says these itself


def test_frame_stats_become_stats_and_acks_that_add_up():
    from streamer import events as E
    from streamer.websocket import translate

    counts = _counts(accepted=10, source_frames=2, sampled_out=3, dropped=2, processed=4, refused=0, pending=1,
                     fps_in=2.5)
    ev = E.FrameStats(session="s", t=4.0, counts=counts, tokens_kept=30, tokens_total=192, cache_len=900,
                      max_tokens=16384, evicted_frames=0, ingest_ms=5.25, latency_ms=40.0)
    stats = translate.stats(ev)
    assert stats.t == 4.0 and stats.stats["processed"] == 4 and stats.stats["fps_in"] == 2.5
    assert stats.stats["tokens_kept"] == 30 and stats.stats["ingest_ms"] == 5.25 and stats.stats["max_tokens"] == 16384
    ack = translate.frame_ack(counts, ev, received=9, rate_dropped=1, rejected=0, last_event_id="f8")
    assert ack.accepted == counts.sampled_out + counts.dropped + counts.processed + counts.refused + counts.pending
    assert ack.received == ack.accepted - ack.source_frames + ack.rate_dropped + ack.rejected
    assert (ack.last_pts, ack.tokens_kept, ack.cache_len, ack.last_event_id) == (4.0, 30, 900, "f8")
    empty = translate.frame_ack(_counts(), None, 0, 0, 0, None)
    assert empty.last_pts is None and empty.tokens_kept is None


def test_pending_has_one_documented_range():
    """``pending`` counts the frames without an outcome: the code's bound, the schema and the docs agree."""
    from streamer.core.state import CoreSession
    from streamer.events import MAX_PENDING

    slots = [f for f in ("incoming", "preparing", "frame") if f in CoreSession.__dataclass_fields__]
    assert MAX_PENDING == len(slots) + 1  # the three frame slots and the one inside a step
    assert P.FrameAck.model_json_schema()["properties"]["pending"]["maximum"] == MAX_PENDING
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    assert f"`pending` (0 to {MAX_PENDING})" in doc and "(0 to 2)" not in doc
