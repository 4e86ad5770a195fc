"""``vl3live camera DEVICE [--mic]``: a local camera through the live engine, questions
spoken into the microphone (voice activity detection + speech recognition) or typed on stdin.
Answers print on stdout; heard questions, stats and errors on stderr.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field

from streamer.events import ResponseCreated

from .config import Config, add_dataclass_arguments, dataclass_from_args, load_config
from .terminal import interruptible, load, open_watched, read_stdin, show_event, typed_to


@dataclass
class CameraConfig:
    """``vl3live camera`` options."""

    camera: str = field(default="", metadata={
        "help": "camera device: /dev/video0 (Linux), 0 (macOS), video=NAME (Windows), or an FFmpeg input "
                "with --camera-format (e.g. testsrc=size=640x480:rate=30 with lavfi)"})
    camera_format: str | None = field(default=None, metadata={
        "help": "PyAV input format; default: v4l2 / avfoundation / dshow for this platform"})
    mic: bool = field(default=False, metadata={"help": "ask by speaking (audio.* config); else questions from stdin"})
    asr: str | None = field(default=None, metadata={"help": "overrides audio.asr (Whisper dir or hub id, or tiny)"})
    instruction: str | None = field(default=None, metadata={"help": "a standing instruction (proactive mode)"})
    max_seconds: float | None = field(default=None, metadata={"help": "stop after this many seconds"})
    model: str | None = field(default=None, metadata={"help": "overrides model.spec (tiny | dir | hub id)"})

    def __post_init__(self) -> None:
        if not self.camera:
            raise ValueError("a camera device is needed (vl3live camera DEVICE)")


async def run_camera(cfg: CameraConfig, config: Config, out=sys.stdout, err=sys.stderr) -> int:
    """Run until Ctrl-C, the camera ends or ``max_seconds``; returns the number of spoken questions."""
    import dataclasses

    from model.checkpoints.loading import preflight
    from streamer.engine import Engine
    from streamer.sources import camera_source

    audio_cfg = dataclasses.replace(config.audio, asr=cfg.asr or config.audio.asr)
    heard = 0
    preflight(config.model, cfg.model)  # everything that can be checked, before minutes of model loading
    if cfg.mic:
        from model.checkpoints.asr import load_asr, resolve_asr
        from streamer.audio import check_input_device

        resolve_asr(audio_cfg.asr)
        check_input_device(audio_cfg.device)  # PortAudio installed, and a microphone to open
        print(f"loading speech recognition {audio_cfg.asr} ...", file=err, flush=True)
        transcribe = load_asr(audio_cfg.asr, language=audio_cfg.language, seed=config.model.seed)
    lm = load(cfg.model, config, err)
    loop = asyncio.get_running_loop()
    async with Engine(lm, config.engine, config.session, config.server.max_sessions) as engine:
        camera = camera_source(cfg.camera, fps=config.engine.fps, fmt=cfg.camera_format)
        session, sub, source = await open_watched(engine, camera, cfg.instruction)
        deadline = None if cfg.max_seconds is None else loop.time() + cfg.max_seconds

        async def listen() -> None:
            """Spoken questions until the deadline; one heard before it is still transcribed and asked."""
            nonlocal heard
            from streamer.audio import MicStats, mic_utterances

            mic = mic_utterances(audio_cfg, MicStats())
            try:
                while True:
                    left = None if deadline is None else deadline - loop.time()
                    if left is not None and left <= 0:
                        return
                    try:
                        utt = await asyncio.wait_for(anext(mic), left)
                    except (TimeoutError, StopAsyncIteration):
                        return
                    text = await asyncio.to_thread(transcribe, utt.audio)
                    heard += 1
                    print(f"[heard {utt.start:.2f}-{utt.end:.2f}s] {text or '(nothing recognized)'}", file=err,
                          flush=True)
                    if text:
                        engine.ask(session, text)
            finally:
                await mic.aclose()

        async def show() -> None:
            async for ev in sub:
                show_event(ev, out, err)
                if isinstance(ev, ResponseCreated) and not ev.proactive:
                    print(f"[question] {ev.question}", file=err, flush=True)

        printer = asyncio.create_task(show())
        stop_stdin = None if cfg.mic else read_stdin(loop, typed_to(engine, lambda: session), err)
        waits = [source, asyncio.create_task(listen())] if cfg.mic else [source]
        try:
            done, _ = await asyncio.wait(waits, timeout=None if cfg.mic else cfg.max_seconds,
                                         return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()
            if source in done and source.result():
                raise ValueError(f"the camera failed: {source.result()}")
        finally:
            for t in waits:
                t.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            await engine.settled(session, timeout=300)
            printer.cancel()
            if stop_stdin is not None:
                stop_stdin()
    return heard


HELP = "a local camera live; ask by speaking (--mic) or on stdin"


def add_arguments(p) -> None:
    add_dataclass_arguments(p, CameraConfig, positional=("camera",))


def run(args) -> int:
    interruptible(asyncio.run, run_camera(dataclass_from_args(CameraConfig, args),
                                          load_config(args.config, args.overrides)))
    return 0
