"""A new user's first run (issue 13), each command as a subprocess: offline without a checkpoint it
fails in seconds with one line that says what to do; bad arguments, files, cameras and microphones
are errors that end the command; ``--help`` is instant; SIGTERM stops a server cleanly."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import ws_rig
from tests.conftest import wait_for_line
from tests.test_sources import _free_port

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, env: dict | None = None, timeout: float = 120, cwd: Path = ROOT, **kw):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vl3live", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=cwd, env=env, stdin=subprocess.DEVNULL, **kw)
    return r, time.monotonic() - t0


def _offline(tmp_path: Path, endpoint: str) -> dict:
    """A machine whose hub is at an address that does not answer, with an empty cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), VL3LIVE_CACHE=str(tmp_path / "vl3"))
    return env


def _one_line_error(r, spec: str, hint: str) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip() and "bitsandbytes" not in line]
    errors = [line for line in lines if ": error: " in line]
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert spec in errors[0] and "cache" in errors[0] and hint in errors[0], errors[0]
    assert "Retrying" not in r.stderr and "Traceback" not in r.stderr and len(lines) <= 3, r.stderr
    return errors[0]


def test_offline_without_a_checkpoint_every_command_fails_fast_with_one_clear_line(tmp_path):
    env = _offline(tmp_path, f"http://127.0.0.1:{_free_port()}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}\n')
    runs = {
        "demo": _run("demo", "--port", "0", env=env),  # the default model: the 2B video checkpoint
        "data check": _run("data", "check", str(data), env=env),
        "train 2B": _run("train", "--config", "configs/train/stage4_2b.yaml", f"data=[{data}]",
                         f"output_dir={tmp_path / 'run'}", env=env),
        "camera --mic": _run("camera", "/dev/video9", "--mic", "--model", "tiny", env=env),
        "ask": _run("ask", str(data), "q?", "--model", "someone/VideoLLaMA3-Custom", env=env),
    }
    hints = {"demo": "--model tiny", "data check": "--model tiny", "train 2B": "--model tiny",
             "camera --mic": "--asr tiny", "ask": "--model tiny"}
    specs = {"demo": "DAMO-NLP-SG/VideoLLaMA3-2B", "data check": "DAMO-NLP-SG/VideoLLaMA3-2B",
             "train 2B": "lkhl/VideoLLaMA3-2B-Image-HF", "camera --mic": "openai/whisper-small",
             "ask": "someone/VideoLLaMA3-Custom"}
    for name, (r, took) in runs.items():
        line = _one_line_error(r, specs[name], hints[name])
        assert str(tmp_path / "hf") in line and took < 20, (name, took, line)
    assert not (tmp_path / "run" / "final").exists()


def test_a_hub_that_accepts_but_never_answers_costs_seconds_not_minutes(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections are accepted by the kernel and never answered
    try:
        r, took = _run("demo", "--port", "0", env=_offline(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}"))
    finally:
        silent.close()
    _one_line_error(r, "DAMO-NLP-SG/VideoLLaMA3-2B", "--model tiny")
    assert took < 25, took


def test_help_and_argument_errors_load_no_model_libraries():
    code = ("import sys\nfrom vl3live.__main__ import main\n"
            "for argv in (['--help'], ['ask', '--help'], ['bench', '--help'], ['demo', '--help'], ['serve', '--x'],"
            " ['ask', 'v.mp4']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'gradio') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-500:] + r.stderr[-2000:]


def test_arguments_are_checked_before_any_work(tmp_path):
    clip = ws_rig.write_clip(tmp_path / "clip.mp4", seconds=2.0)
    r, _ = _run("ask", str(clip), "q?", "--model", "tiny", "--max-new-tokens", "0")
    assert r.returncode == 2 and "--max-new-tokens must be >= 1" in r.stderr and "frame 1" not in r.stderr
    r, _ = _run("--set", "session.frame_pixels=abc", "ask", str(clip), "q?", "--model", "tiny")
    assert r.returncode == 2 and "session.frame_pixels: expected an integer, got 'abc'" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("session:\n  layout: [\n")
    r, _ = _run("--config", str(bad), "ask", str(clip), "q?", "--model", "tiny")
    assert r.returncode == 2 and f"{bad}:3:1: invalid YAML" in r.stderr and "Traceback" not in r.stderr
    r, _ = _run("watch", str(clip), "--model", "tiny", "--ask", " ")
    assert r.returncode == 2 and "--ask must not be empty" in r.stderr and "loading" not in r.stderr


def test_watch_ends_with_an_error_on_a_corrupt_file_and_on_a_dead_camera(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\0\1\2" * 3000)
    r, took = _run("watch", str(corrupt), "--model", "tiny", "--ask", "What?", timeout=60)
    assert r.returncode == 2 and "the source failed" in r.stderr and "cannot read video file" in r.stderr
    r, took = _run("watch", "/dev/video97", "--model", "tiny", timeout=60)
    assert r.returncode == 2 and "cannot open camera '/dev/video97'" in r.stderr and "gave up after" in r.stderr
    assert "ls /dev/video*" in r.stderr and took < 30
    r, _ = _run("camera", "/dev/video97", "--model", "tiny", timeout=60)
    assert r.returncode == 2 and "the camera failed" in r.stderr and "gave up after" in r.stderr


def test_live_mic_without_a_microphone_says_so_and_lists_the_devices(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}  # no .asoundrc: no capture device at all
    r, took = _run("camera", "/dev/video97", "--mic", "--model", "tiny", "--asr", "tiny", env=env)
    assert r.returncode == 2 and "no default microphone" in r.stderr and "Input devices: none found" in r.stderr
    assert "loading" not in r.stderr  # before any model is loaded
    r, _ = _run("--set", "audio.device=no-such-mic", "camera", "/dev/video97", "--mic", "--model",
                "tiny", "--asr", "tiny", env=env)
    assert r.returncode == 2 and "no microphone 'no-such-mic'" in r.stderr


def test_bench_reports_progress_on_stderr_and_json_on_stdout():
    r, _ = _run("bench", "--model", "tiny", "--frames", "4", "--repeats", "1", "--stateless-repeats", "1",
                "--max-new-tokens", "2", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any(line.startswith("model on cpu") for line in lines) and any("stock path" in line for line in lines)
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("{")


def test_sigterm_stops_serve_cleanly(tmp_path):
    serve = subprocess.Popen([sys.executable, "-m", "vl3live", "--set", "server.port=0", "serve", "--model",
                              "tiny"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ready, lines = wait_for_line(serve, r"serving ws://127\.0\.0\.1:\d+/")
        assert ready, "".join(lines)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)
    assert "Traceback" not in "".join(lines)


@pytest.mark.parametrize("args", [["ask", "x.mp4", "q?", "--model", "tiny", "--max-seconds", "0"],
                                  ["watch", "x.mp4", "--port", "70000"],
                                  ["client", "x.mp4", "--fps", "-1"]])
def test_more_bad_arguments_are_refused_at_once(args):
    r, took = _run(*args, timeout=60)
    assert r.returncode == 2 and "error:" in r.stderr and "loading" not in r.stderr and took < 10
