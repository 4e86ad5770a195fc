"""The gradio demo: its handlers driven directly with the tiny model, and the whole page in a real
browser (Debian's chromium, headless, fake camera) served by ``vl3live demo``."""

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests import ws_rig
from tests.browser_rig import CHROMIUM_FLAGS
from ui.app import Handlers, responsive
from ui.backend import DemoBackend
from ui.overlay import keep_overlay
from vl3live.config import Config

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _until(pred, timeout: float = 60.0, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def _open_page(pw, profile: str, url: str):
    """Debian's chromium (headless, fake camera) at 1280x800 on ``url``: (browser, page)."""
    browser = pw.chromium.launch_persistent_context(profile, executable_path="/usr/bin/chromium",
                                                    args=CHROMIUM_FLAGS, headless=True,
                                                    viewport={"width": 1280, "height": 800})
    page = browser.new_page()
    page.goto(url)
    return browser, page


@pytest.fixture
def handlers(lm):
    cfg = ws_rig.config()
    cfg.model.spec = "tiny"
    cfg.engine.proactive_every = 1.0
    backend = DemoBackend(cfg, lm)
    backend.start()
    yield Handlers(backend)
    backend.close()


def _cache_shown(stats: str) -> int | None:
    m = re.search(r"cache / budget \| (\d+) / 16384", stats)
    return int(m.group(1)) if m else None


def test_frames_in_give_stats_overlay_and_streamed_answers(handlers):
    h, b = handlers, handlers.b
    shots = ws_rig.frames(6)
    sid = h.frame(shots[0], None)
    assert b.alive(sid)
    for shot in shots[1:]:
        time.sleep(0.55)  # arrival-timed frames, sampled at engine.fps = 2
        assert h.frame(shot, sid) == sid
    session = b.engine.get(sid)
    _until(lambda: session.processed >= 4 and session.pending == 0)  # every frame has its outcome
    # the panel shows the engine's cache length (compared at each tick: a late ack may still move it)
    chat, stats, overlay = _until(lambda: (t := h.tick(sid)) and _cache_shown(t[1]) == b.snapshot(sid).stats.cache_len
                                  and t)
    assert "fps in / processed" in stats and "tokens kept" in stats
    assert overlay.shape == shots[0].shape and overlay.dtype == np.uint8
    question = "What is in the picture?"
    _, sid2, chat = h.ask(question, sid)
    assert sid2 == sid and {"role": "user", "content": question} in chat  # (its answer may have begun already)
    chat = _until(lambda: (c := h.tick(sid)[0]) and b.views[sid].ttft_ms is not None and c)
    answer = chat[chat.index({"role": "user", "content": question}) + 1]
    assert answer["role"] == "assistant" and answer["content"] and not answer["content"].startswith("🔔")
    assert "TTFT, last answer | " in h.tick(sid)[1] and "| - |" not in h.tick(sid)[1]
    h.instruct("Tell me when the ball moves.", sid)
    for shot in ws_rig.frames(3, seed=9):
        time.sleep(0.55)
        h.frame(shot, sid)
    chat = _until(lambda: any(m["content"].startswith("🔔 **Alert**") for m in h.tick(sid)[0]) and h.tick(sid)[0])
    alert = next(m for m in chat if m["content"].startswith("🔔 **Alert**"))
    assert len(alert["content"]) > len("🔔 **Alert** @0.0s: ")  # an alert, marked, with its text


def test_settings_file_source_and_bad_input(handlers, tmp_path):
    h, b = handlers, handlers.b
    sid = h.frame(ws_rig.frames(1)[0], None)
    sid2, _ = h.settings("video-turn", 3.0, 16384, 4.0, sid)  # live settings: same session
    snap = b.snapshot(sid)
    assert sid2 == sid and snap.config.threshold == 3.0 and snap.settings.fps == 4.0
    sid3, chat = h.settings("stream", 3.0, 8192, 2.0, sid)  # a new layout: a new session
    assert sid3 != sid and not b.alive(sid) and chat == []
    cfg = b.snapshot(sid3).config
    assert (cfg.layout, cfg.budget.max_tokens, cfg.threshold) == ("stream", 8192, 3.0)
    clip = ws_rig.write_clip(tmp_path / "clip.mp4", seconds=2.0)
    assert h.source(str(clip), "", sid3) == sid3
    _until(lambda: any("video file ended" in m["content"] for m in h.tick(sid3)[0]), timeout=60)
    assert b.engine.get(sid3).processed >= 3
    time.sleep(0.6)  # a frame right after the file's last one would be within the fps period (sampled out)
    h.frame(np.zeros((2, 900, 3), np.uint8), sid3)  # aspect ratio 450: an error in the chat, session goes on
    _until(lambda: any("bad_frame" in m["content"] for m in h.tick(sid3)[0]))
    with pytest.warns(UserWarning, match="limit is"):  # gr.Warning outside a request: a Python warning
        h.ask("x" * 5000, sid3)
    h.closed(sid3)
    assert not b.alive(sid3) and sid3 not in b.engine.sessions


def test_overlay_dims_dropped_patches_and_outlines_kept_ones():
    rgb = np.full((56, 84, 3), 200, np.uint8)
    keep = np.array([[True, False, False], [False, False, True]])
    out = keep_overlay(rgb, keep)
    assert out.shape == rgb.shape
    assert (out[40, 10] == 60).all()  # dropped: dimmed to 30 %
    assert (out[5, 5] == 200).all()  # kept, inside the patch
    assert tuple(out[28, 70]) == (0, 220, 0)  # kept patch's top edge


def test_no_gpu_means_responsive_settings_for_a_real_checkpoint():
    cfg = Config()
    fast, note = responsive(cfg)
    if note is None:  # a CUDA machine keeps the config
        assert fast == cfg
    else:
        assert fast.session.frame_pixels < cfg.session.frame_pixels and fast.engine.fps <= 0.5 and "no GPU" in note
    cfg.model.spec = "tiny"
    assert responsive(cfg) == (cfg, None)


def test_the_demo_page_in_a_real_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    demo = subprocess.Popen([sys.executable, "-m", "vl3live", "--set", f"session.frame_pixels={28 * 28 * 12}",
                             "--set", "engine.fps=2", "--set", "engine.max_new_tokens=8", "demo", "--model", "tiny",
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in demo.stderr:
            m = re.search(r"demo on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "the demo did not start"
        with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
            browser, page = _open_page(pw, profile, url)
            page.get_by_text("Click to Access Webcam").click()
            page.locator("#webcam button", has_text="Record").click()

            def cache_len():
                m = re.search(r"cache / budget\s+(\d+)", page.inner_text("#stats"))
                return int(m.group(1)) if m else None
            first = _until(cache_len, timeout=60, every=0.5)
            grown = _until(lambda: (n := cache_len()) and n > first and n, timeout=60, every=0.5)
            box, cam_box = page.locator("#stats").bounding_box(), page.locator("#webcam").bounding_box()
            in_view = box["y"] + box["height"] <= 800 and cam_box["y"] + cam_box["height"] <= 800
            page.fill("#question textarea", "What do you see?")
            page.click("#ask")

            def answered():
                text = page.inner_text("#chat")
                after = text.split("What do you see?", 1)
                return len(after) == 2 and len(after[1].strip()) > 0 and after[1].strip()
            answer = _until(answered, timeout=60, every=0.5)
            page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
            stats = page.inner_text("#stats")
            browser.close()
    finally:
        demo.terminate()
        demo.wait(30)
        demo.stderr.close()
    assert grown > first  # frames from the browser's camera reached the session
    assert answer and "TTFT" in stats
    assert in_view, (box, cam_box)  # the video and its stats, without scrolling, at 1280x800
    print(json.dumps({"cache_first": first, "cache_later": grown, "answer": answer[:80]}))


def test_rtsp_source_and_model_reload(handlers, tmp_path):
    from tests.test_sources import _free_port, _start_server, _stop

    h, b = handlers, handlers.b
    port = _free_port()
    camera = _start_server(port)
    try:
        sid = h.frame(ws_rig.frames(1)[0], None)
        assert h.source(None, f"rtsp://127.0.0.1:{port}/cam", sid) == sid
        _until(lambda: b.engine.get(sid).processed >= 4, timeout=60)  # the camera's frames reach the session
        times = b.snapshot(sid).frames_in_cache
        assert all(later > earlier for earlier, later in zip(times, times[1:]))
    finally:
        _stop(camera)
    b.lm.save_pretrained(tmp_path / "ckpt")  # a local checkpoint: "another model"
    assert h.reload(str(tmp_path / "ckpt"), sid) == (None, [])
    assert b.config.model.spec == str(tmp_path / "ckpt") and not b.alive(sid)
    sid2 = h.frame(ws_rig.frames(1)[0], None)  # a new session on the reloaded model
    _until(lambda: b.engine.get(sid2).processed == 1)


def test_an_unreachable_rtsp_camera_is_said_in_the_chat_on_one_counted_line(handlers):
    from tests.test_sources import _free_port

    h = handlers
    sid = h.frame(ws_rig.frames(1)[0], None)
    assert h.source(None, f"rtsp://127.0.0.1:{_free_port()}/cam", sid) == sid  # nothing listens there
    line = _until(lambda: [m["content"] for m in h.tick(sid)[0] if "error `source`" in m["content"]], timeout=30)
    assert len(line) == 1 and "unavailable" in line[0]
    again = _until(lambda: [m["content"] for m in h.tick(sid)[0] if re.search(r"error `source`.*\(x[2-9]\)",
                                                                            m["content"])], timeout=30)
    assert len(again) == 1  # the retries count on the same line instead of flooding the chat
    assert sum("error `source`" in m["content"] for m in h.tick(sid)[0]) == 1


def test_closing_the_tab_ends_its_session_and_its_rtsp_source(tmp_path):
    """A real browser streams an RTSP camera into the demo, then its tab is closed: the session and the
    source go within seconds (gradio itself would keep the tab's state, and the camera reader, an hour)."""
    from playwright.sync_api import sync_playwright

    from tests.test_sources import _free_port, _start_server, _stop
    from ui.app import run_demo
    from ui.config import DemoConfig

    port = _free_port()
    camera = _start_server(port)
    cfg = ws_rig.config()
    cfg.model.spec = "tiny"
    demo, backend, url = run_demo(DemoConfig(port=0), cfg, block=False)
    try:
        with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
            browser, page = _open_page(pw, profile, url)
            page.get_by_text("or stream a video file / RTSP camera").click()
            page.locator("#rtsp_url textarea, #rtsp_url input").first.fill(f"rtsp://127.0.0.1:{port}/cam")
            page.click("#stream_source")
            session = _until(lambda: next(iter(backend.engine.sessions.values()), None), timeout=60)
            _until(lambda: session.processed >= 2, timeout=60)  # the camera's frames reach the tab's session
            assert backend.engine.has_source(session)
            closed_at = time.monotonic()
            page.close()
            _until(lambda: not backend.engine.sessions and not backend.views, timeout=30)
            took = time.monotonic() - closed_at
            browser.close()
        assert session.closed and not backend.engine.has_source(session) and took < 30
    finally:
        demo.close()
        backend.close()
        _stop(camera)
