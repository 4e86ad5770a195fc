"""Microphone to utterances: capture with ``sounddevice``, energy-based voice activity detection.

The PortAudio callback only copies blocks into a bounded queue (older audio is dropped and
counted if the detector falls behind); a reader thread runs the detector and hands finished
utterances to asyncio. Time is the sample count since the stream opened, in seconds.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import numpy as np

from model.checkpoints.asr import SAMPLE_RATE
from streamer.config import AudioConfig

from .sources import iterate_in_thread

log = logging.getLogger(__name__)
FRAME = SAMPLE_RATE * 30 // 1000  # 30 ms analysis frames


def import_sounddevice():
    """``sounddevice``, or an error that says which system package provides PortAudio."""
    try:
        import sounddevice
    except OSError as exc:  # raised at import when libportaudio is missing
        raise RuntimeError(
            f"the microphone needs the PortAudio library ({exc}). Install it: Debian/Ubuntu "
            "`apt-get install libportaudio2`, Fedora `dnf install portaudio`, macOS `brew install portaudio`") from None
    return sounddevice


def check_input_device(device: str | int | None) -> None:
    """RuntimeError, listing the input devices there are, unless ``device`` (None: the system's default
    input) can be opened for capture."""
    sd = import_sounddevice()
    device = int(device) if device is not None and str(device).isdigit() else device
    try:
        sd.query_devices(device, kind="input")
        return
    except (ValueError, sd.PortAudioError) as exc:
        reason = str(exc)
    try:
        inputs = [f"{i}: {d['name']}" for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]
    except sd.PortAudioError:
        inputs = []
    what = f"no microphone {device!r}" if device is not None else "no default microphone"
    raise RuntimeError(f"{what} ({reason}). Input devices: {'; '.join(inputs) or 'none found'}. Choose one with "
                       "--set audio.device=NAME_OR_INDEX, or ask on stdin without --mic")


@dataclass
class Utterance:
    """One stretch of speech the voice activity detector heard: its audio and its time on the microphone's
    clock."""

    audio: np.ndarray  # float32 mono at SAMPLE_RATE
    start: float  # seconds since the microphone opened
    end: float


@dataclass
class EnergyVad:
    """Cuts a stream of samples into utterances by loudness against a running noise floor."""

    cfg: AudioConfig
    floor_db: float = -70.0
    _buf: list = field(default_factory=list)
    _pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _t: int = 0  # samples consumed
    _start: int | None = None
    _quiet: int = 0  # samples of quiet since the last loud frame

    def feed(self, samples: np.ndarray) -> Iterator[Utterance]:
        """Add samples; yield each utterance that ends within them."""
        data = np.concatenate([self._pending, samples.astype(np.float32).reshape(-1)])
        n = len(data) // FRAME * FRAME
        self._pending = data[n:]
        for i in range(0, n, FRAME):
            frame = data[i:i + FRAME]
            db = 10 * np.log10(float(np.mean(frame * frame)) + 1e-12)
            loud = db > max(self.cfg.vad_threshold_db, self.floor_db + self.cfg.vad_margin_db)
            if self._start is None:
                if loud:
                    self._start, self._quiet, self._buf = self._t, 0, [frame]
                else:
                    self.floor_db = 0.95 * self.floor_db + 0.05 * db  # follows the room while nobody speaks
            else:
                self._buf.append(frame)
                self._quiet = 0 if loud else self._quiet + FRAME
                length = self._t + FRAME - self._start
                if self._quiet >= self.cfg.vad_end_silence * SAMPLE_RATE or length >= self.cfg.vad_max_speech * SAMPLE_RATE:
                    utt = self._finish()
                    if utt is not None:
                        yield utt
            self._t += FRAME

    def flush(self) -> Utterance | None:
        """The utterance in progress, if any (at the end of the stream)."""
        return self._finish() if self._start is not None else None

    def _finish(self) -> Utterance | None:
        audio = np.concatenate(self._buf)
        if self._quiet:
            audio = audio[: len(audio) - self._quiet]  # trailing quiet is not speech
        start = self._start / SAMPLE_RATE
        self._start, self._buf, self._quiet = None, [], 0
        if len(audio) < self.cfg.vad_min_speech * SAMPLE_RATE:
            return None
        return Utterance(audio, start, start + len(audio) / SAMPLE_RATE)


@dataclass
class MicStats:
    """What the microphone path did: blocks captured, blocks dropped when the detector fell behind, and
    PortAudio's own overflows."""

    blocks: int = 0
    dropped_blocks: int = 0  # the detector fell behind: oldest audio discarded
    overflows: int = 0  # PortAudio's own input overflows


def mic_utterances(cfg: AudioConfig, stats: MicStats | None = None) -> AsyncIterator[Utterance]:
    """Utterances from the microphone, as they end."""
    sd = import_sounddevice()
    stats = stats or MicStats()
    block = FRAME * 4
    blocks: queue.Queue = queue.Queue(maxsize=max(1, int(cfg.queue_seconds * SAMPLE_RATE / block)))
    device = int(cfg.device) if cfg.device is not None and str(cfg.device).isdigit() else cfg.device

    def callback(indata, frames, time_info, status) -> None:  # PortAudio's thread: copy and go
        if status.input_overflow:
            stats.overflows += 1
        stats.blocks += 1
        chunk = indata[:, 0].astype(np.float32) / 32768.0
        while True:
            try:
                blocks.put_nowait(chunk)
                return
            except queue.Full:
                try:
                    blocks.get_nowait()
                    stats.dropped_blocks += 1
                except queue.Empty:
                    pass

    def make(stopped) -> Iterator[Utterance]:
        vad = EnergyVad(cfg)
        with sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="int16", blocksize=block, device=device,
                            callback=callback):
            while not stopped():
                try:
                    chunk = blocks.get(timeout=0.1)
                except queue.Empty:
                    continue
                yield from vad.feed(chunk)
        last = vad.flush()
        if last is not None:
            yield last

    return iterate_in_thread(make, name="microphone")
