"""``vl3live camera --mic``: voice activity detection, and the whole path from a (fake) microphone
playing a spoken question through speech recognition to a question answered by the session."""

import builtins
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from model.checkpoints.asr import SAMPLE_RATE, load_asr
from streamer.audio import EnergyVad, import_sounddevice
from streamer.config import AudioConfig


def _tone(seconds: float, amp: float = 0.3, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _quiet(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(0, 0.001, int(seconds * SAMPLE_RATE))).astype(np.float32)


def test_vad_cuts_utterances_by_energy_and_ignores_clicks():
    cfg = AudioConfig(vad_end_silence=0.5, vad_min_speech=0.3, vad_max_speech=3.0)
    signal = np.concatenate([_quiet(1.0), _tone(0.8), _quiet(1.0, 1), _tone(0.1), _quiet(1.0, 2), _tone(1.2),
                             _quiet(1.0, 3), _tone(7.0), _quiet(1.0, 4)])
    vad = EnergyVad(cfg)
    utts = []
    for i in range(0, len(signal), 1234):  # arbitrary block sizes
        utts.extend(vad.feed(signal[i:i + 1234]))
    assert vad.flush() is None
    spans = [(round(u.start, 2), round(u.end, 2)) for u in utts]
    # 0.8 s at 1.0; the 0.1 s click at 2.8 is ignored; 1.2 s at 3.9; 7 s at 6.1 cut into 3 + 3 + 1 s pieces
    assert [s for s, _ in spans] == pytest.approx([1.0, 3.9, 6.1, 9.1, 12.1], abs=0.04)
    assert [e - s for s, e in spans] == pytest.approx([0.8, 1.2, 3.0, 3.0, 1.0], abs=0.06)
    assert all(len(u.audio) == pytest.approx((u.end - u.start) * SAMPLE_RATE, abs=1) for u in utts)


def test_a_missing_portaudio_names_the_package(monkeypatch):
    real = builtins.__import__

    def no_portaudio(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real(name, *args, **kwargs)
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_portaudio)
    with pytest.raises(RuntimeError, match="apt-get install libportaudio2"):
        import_sounddevice()


def test_tiny_asr_transcribes_to_text():
    asr = load_asr("tiny", device="cpu")
    text = asr(_tone(1.0))
    assert isinstance(text, str) and text and asr(_tone(1.0)) == text  # random weights: gibberish, but the same
    with pytest.raises(ValueError, match="16000"):
        asr(_tone(1.0), sample_rate=8000)


def test_spoken_question_from_a_fake_microphone_is_heard_once_and_answered(tmp_path):
    for tool in ("espeak-ng", "sox"):
        assert shutil.which(tool), f"{tool} is needed (Debian package {tool}; .ci/run installs it)"
    speech = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), "what is on the table"], check=True)
    raw = tmp_path / "mic.raw"  # 1 s quiet, the question, 4 s quiet: s16le mono 16 kHz, as ALSA's file pcm reads it
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", str(tmp_path / "q.wav"),
                    "trim", "0", "1.0"], check=True)
    subprocess.run(["sox", str(tmp_path / "q.wav"), "|sox " + str(speech) + " -r 16000 -c 1 -b 16 -p",
                    str(tmp_path / "q.wav"), str(tmp_path / "q.wav"), str(tmp_path / "q.wav"), str(tmp_path / "q.wav"),
                    "-t", "raw", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", str(raw)], check=True)
    seconds = len(raw.read_bytes()) / 2 / SAMPLE_RATE
    spoken = seconds - 5.0
    (tmp_path / ".asoundrc").write_text(f"""
pcm.!default {{ type asym playback.pcm "quiet" capture.pcm "mic" }}
pcm.quiet {{ type null }}
pcm.mic {{ type file slave.pcm "null" file "/dev/null" infile "{raw}" format "raw" }}
""")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "vl3live", "--set", "session.frame_pixels=9408",
                        "--set", "engine.max_new_tokens=8", "--set", "engine.fps=2", "camera",
                        "testsrc=size=112x84:rate=10,realtime", "--camera-format", "lavfi",
                        "--mic", "--asr", "tiny", "--model", "tiny", "--max-seconds", str(seconds + 2)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    heard = re.findall(r"\[heard ([\d.]+)-([\d.]+)s\] (.*)", r.stderr)
    assert len(heard) == 1, r.stderr  # one utterance: the quiet before and after is not speech
    start, end, text = float(heard[0][0]), float(heard[0][1]), heard[0][2]
    assert start == pytest.approx(1.0, abs=0.1)
    assert 1.0 + 0.6 * spoken <= end <= 1.0 + spoken + 0.1, (end, spoken)
    assert text and text != "(nothing recognized)"
    assert f"[question] {text}" in r.stderr  # the transcript became the session's question
    assert re.search(r"@\d+\.\d+s +\S", r.stdout), r.stdout  # and it was answered
