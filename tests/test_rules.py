"""The rules that live in one place each: what a source spec names, stream time, the terminal's lines."""

import asyncio
import io
import os
import sys

import pytest

from model.video import write_video_file
from streamer.clock import ArrivalClock
from streamer.sources import Frame
from streamer.sources.spec import open_source, source_kind
from tests.conftest import scene_frames
from tests.engines import engine_for
from vl3live.config import Config
from vl3live.terminal import parse_line, read_stdin


def test_a_source_spec_names_one_kind_or_says_why_not(tmp_path):
    clip = tmp_path / "clip.mp4"
    write_video_file(clip, scene_frames(4, 84, 112), 2)
    assert source_kind("rtsp://cam/stream") == source_kind("rtsps://cam:322/x") == "rtsp"
    assert source_kind(str(clip)) == "file"
    assert source_kind("/dev/video0") == source_kind("0") == source_kind("video=USB Camera") == "camera"
    assert source_kind("webrtc") == "webrtc"
    with pytest.raises(ValueError, match="unsupported source URL"):
        source_kind("http://cam/stream")
    with pytest.raises(FileNotFoundError, match="no such source"):
        source_kind(str(tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="webrtc is not a source to open"):
        open_source("webrtc", fps=1.0)

    async def frames():
        return [f.pts_seconds async for f in open_source(str(clip), fps=2.0, realtime=False)]
    assert asyncio.run(frames()) == [0.0, 0.5, 1.0, 1.5]


def test_arrival_time_goes_on_from_the_newest_frame_whichever_source_set_it(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("streamer.clock.time.monotonic", lambda: now[0])
    clock = ArrivalClock()  # opened at 100 s
    now[0] = 102.0
    assert clock.now(None, 0.5) == 2.0  # seconds since the session opened
    now[0] = 103.0
    assert clock.now(10.0, 0.5) == 10.5  # a file ran the session to t=10: one period after it
    now[0] = 104.0
    assert clock.now(10.5, 0.5) == 11.5  # and the clock goes on from there
    assert clock.now(None, 0.5) == 11.5


def test_engine_stamps_frames_without_pts_after_an_attached_source(lm):
    cfg = Config()
    cfg.engine.fps = 2.0
    cfg.session.frame_pixels = 28 * 28 * 12

    async def main():
        async with engine_for(lm, cfg) as eng:
            session = await eng.open_session()
            shot = scene_frames(1, 84, 112)[0]
            eng.push_frame(session, Frame(20.0, shot))  # a source that ran the clock to 20 s
            await eng.settled(session)
            eng.push_frame(session, shot)  # no pts: stamped on arrival, one period after the newest
            await eng.settled(session)
            snap = await eng.snapshot(session)
            assert snap.state.counts.sampled_out == 0  # never refused as old
            assert snap.frames_in_cache == (20.0, pytest.approx(20.5))
    asyncio.run(main())


def test_typed_lines_are_questions_instructions_or_cancel():
    assert parse_line("  What is on the table?\n") == ("ask", "What is on the table?")
    assert parse_line("/instruct Tell me when the door opens.") == ("instruct", "Tell me when the door opens.")
    assert parse_line("/instruct") == ("instruct", None)  # clears it
    assert parse_line("/cancel") == ("cancel", None)
    assert parse_line("   \n") is None
    assert parse_line("/instructions please") == ("ask", "/instructions please")


def test_stdin_lines_reach_the_handler_and_a_refusal_is_one_line(monkeypatch):
    r, w = os.pipe()
    monkeypatch.setattr(sys, "stdin", os.fdopen(r, "r"))
    got, err = [], io.StringIO()

    def handle(kind, text):
        if text == "too long":
            raise ValueError("question is too long")
        got.append((kind, text))

    async def main():
        loop = asyncio.get_running_loop()
        stop = read_stdin(loop, handle, err)
        assert stop is not None
        os.write(w, b"first?\n/cancel\ntoo long\n\n/instruct watch\n")
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(got) == 3:
                break
        os.close(w)
        await asyncio.sleep(0.05)  # end of input: the reader removes itself
        stop()
    asyncio.run(main())
    assert got == [("ask", "first?"), ("cancel", None), ("instruct", "watch")]
    assert err.getvalue() == "error: question is too long\n"


def test_one_rule_for_the_case_of_a_source_scheme():
    """URL schemes are case-insensitive: the allow-list and the source kind agree, so an allowed
    ``RTSP://`` URL is opened as the RTSP source it is (not refused later as an unknown kind)."""
    from streamer.sources.spec import normalized, source_allowed, source_kind

    for url in ("RTSP://127.0.0.1:8554/cam", "Rtsps://127.0.0.1/cam", "rtsp://127.0.0.1:8554/cam"):
        assert source_allowed(url, ["rtsp://127.0.0.1:*", "rtsps://127.0.0.1"])
        assert source_kind(url) == "rtsp" and normalized(url).startswith(("rtsp://", "rtsps://"))
    assert normalized("RTSP://Host/Path") == "rtsp://Host/Path"  # only the scheme: hosts and paths keep theirs
    with pytest.raises(ValueError, match="unsupported source URL"):
        source_kind("HTTP://127.0.0.1/cam")
