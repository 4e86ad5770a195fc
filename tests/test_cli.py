"""The ``vl3live`` commands, run as a user runs them (subprocess, real files)."""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from model import StreamSession
from model.sampling import Sampling
from streamer.sources import read_video_file
from vl3live.config import load_config


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vl3live", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """A 4 s, 10 fps H.264 clip whose pts start at 2 s (as cameras' recordings often do)."""
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 160, 120, "yuv420p"
        for i in range(40):
            img = np.full((120, 160, 3), 60, np.uint8)
            img[40:80, 4 * i: 4 * i + 30] = (200, 30, 30)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i + 20
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def test_file_source_samples_by_pts(video):
    frames = list(read_video_file(video, fps=1.0))
    assert [round(f.pts_seconds, 2) for f in frames] == [0.0, 1.0, 2.0, 3.0]
    assert frames[0].rgb.shape == (120, 160, 3) and frames[0].rgb.dtype == np.uint8
    assert len(list(read_video_file(video, fps=2.0, max_seconds=1.0))) == 3


def test_file_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_video_file(tmp_path / "missing.mp4"))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="cannot read"):
        list(read_video_file(bad))


def test_ask_streams_a_file_and_answers(lm, video):
    r = _run("ask", str(video), "What moves?", "--model", "tiny", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert "frame 4 t=3.0s" in r.stderr
    assert "model on cpu" in r.stderr
    # the answer a session gives over the same frames, with the same settings
    s = StreamSession(lm, load_config().session)
    for frame in read_video_file(video, fps=1.0):
        s.add_frame(frame.rgb, frame.pts_seconds)
    expected = s.answer("What moves?", Sampling(max_new_tokens=6))
    assert expected and r.stdout == expected + "\n"


def test_ask_with_stream_layout_via_config(video):
    r = _run("--config", "configs/stream.yaml", "ask", str(video), "Anything?", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert "frame 4" in r.stderr


def test_ask_reports_bad_input_clearly(tmp_path, video):
    r = _run("ask", str(tmp_path / "none.mp4"), "q?", "--model", "tiny")
    assert r.returncode == 2 and "not found" in r.stderr
    r = _run("ask", str(video), "   ", "--model", "tiny")
    assert r.returncode == 2 and "question" in r.stderr
    r = _run("--set", "session.layout=diagonal", "ask", str(video), "q?", "--model", "tiny")
    assert r.returncode == 2 and "session.layout" in r.stderr


def test_bench_prints_the_promised_figures():
    r = _run("bench", "--model", "tiny", "--frames", "8", "--repeats", "2", "--stateless-repeats", "1",
             "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("device", "model", "frames", "frame_ingest_ms_p50", "frame_ingest_ms_p95", "ttft_stream_ms_p50",
                "ttft_stateless_ms_p50", "ttft_ratio", "decode_tok_s", "tokens_kept_ratio"):
        assert key in out, key
    assert out["frames"] == 8 and out["model"] == "tiny"
    assert out["frame_ingest_ms_p95"] >= out["frame_ingest_ms_p50"] > 0
    assert out["ttft_ratio"] == pytest.approx(out["ttft_stateless_ms_p50"] / out["ttft_stream_ms_p50"], rel=0.01)
    assert 0.0 < out["tokens_kept_ratio"] < 1.0
    assert out["decode_tok_s"] > 0


def test_bench_sessions_compares_the_batched_engine_with_batching_off():
    r = _run("--set", "session.frame_pixels=12544", "bench", "--model", "tiny", "--sessions", "3", "--seconds", "1.5",
             "--probe-seconds", "1", "--max-streams-limit", "4", "--fps", "4", "--flood-fps", "20",
             "--max-new-tokens", "4", "--height", "112", "--width", "112", "--json")
    assert r.returncode == 0, r.stderr
    assert "KV pool of" in r.stderr and "probe" in r.stderr  # the pool's size and progress are printed
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for mode in ("batched", "off"):
        for load in ("frames", "answers"):
            run = out[mode][load]
            for key in ("frames_per_s", "answer_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "frame_latency_ms_p50",
                        "frame_latency_ms_p99", "items_per_step", "kept_up"):
                assert key in run, (mode, load, key)
            assert run["sessions"] == 3 and run["frames_processed"] > 0
        assert out[mode]["answers"]["answer_tokens"] > 0 and out[mode]["answers"]["ttft_ms_p99"] > 0
    assert out["off"]["answers"]["items_per_step"] == 1.0 and out["batched"]["answers"]["items_per_step"] > 1.0
    b, o = out["batched"], out["off"]
    assert out["ratios"]["answer_tokens_per_s"] == pytest.approx(
        b["answers"]["answer_tokens_per_s"] / o["answers"]["answer_tokens_per_s"], rel=0.01)
    assert out["ratios"]["frames_per_s"] == pytest.approx(
        b["frames"]["frames_per_s"] / o["frames"]["frames_per_s"], rel=0.01)
    assert out["pool_bytes_per_session"] == out["pool_bytes_per_token"] * 16384  # the default budget, whole pages
    assert 0 <= out["max_streams"] <= 4 and out["max_streams_probes"]
    assert all(p["kept_up"] is (p["frames_processed"] >= 0.95 * p["frames_offered"]) for p in out["max_streams_probes"])


def test_bench_stream_hours_runs_a_long_stream_in_a_bounded_cache():
    budget = ["--set", "session.budget.max_tokens=700", "--set", "session.budget.recent_tokens=150"]
    r = _run(*budget, "bench", "--model", "tiny", "--stream-hours", "0.05", "--fps", "1", "--ask-every", "45",
             "--height", "168", "--width", "224", "--max-new-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("frames", "budget_tokens", "max_cache_len", "evicted_frames", "recalled_frames",
                "ingest_ms_p50_early", "ingest_ms_p50_late", "rss_mb_start", "rss_mb_mid", "rss_mb_end"):
        assert key in out, key
    assert out["frames"] == 180 and out["budget_tokens"] == 700 and out["questions"] == 4
    assert 0 < out["max_cache_len"] <= 700
    assert out["evicted_frames"] > 50 and 0 < out["recalled_frames"] <= 4 * out["questions"]
    assert out["ingest_ms_p50_early"] > 0 and out["ingest_ms_p50_late"] > 0
    assert out["ingest_drift"] == pytest.approx(out["ingest_ms_p50_late"] / out["ingest_ms_p50_early"], rel=0.01)
    assert 0 < out["rss_mb_start"] and 0 < out["rss_mb_end"]
    r = _run("--set", "session.budget.max_tokens=null", "bench", "--model", "tiny", "--stream-hours", "0.01")
    assert r.returncode == 2 and "session.budget.max_tokens" in r.stderr


def test_watch_streams_a_file_answers_stdin_questions_and_ends_with_the_source(video):
    r = subprocess.run([sys.executable, "-m", "vl3live", "--set", "engine.fps=2", "--set", "engine.max_new_tokens=6",
                        "watch", str(video), "--model", "tiny", "--ask", "What moves?", "--stats-every", "0.5"],
                       input="And now?\n", capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.splitlines() if line.startswith("@")]
    assert len(answers) == 2, r.stdout  # the --ask question and the stdin one
    assert "[stats]" in r.stderr and "cache" in r.stderr
    r = _run("watch", "/nonexistent/cam.mp4", "--model", "tiny")
    assert r.returncode == 2 and "no such source" in r.stderr
