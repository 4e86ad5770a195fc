"""``vl3live watch SOURCE``: stream a camera, RTSP URL or file through the live engine.

Answers print on stdout as they stream, stats on stderr; each line typed on stdin is a question
(``/instruct TEXT`` sets a standing instruction, ``/cancel`` ends the current answer).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from model.config import Config

from .bus import Event

if TYPE_CHECKING:  # the engine (torch) loads when a command runs, not when the CLI parses its flags
    from .engine import Engine


@dataclass
class WatchConfig:
    source: str = field(default="", metadata={
        "help": "rtsp://... URL, a video file, a camera device (/dev/video0, 0 on macOS, video=NAME on Windows), "
                "or webrtc (serve a page and /offer endpoint; each browser that connects gets a session)"})
    host: str = field(default="127.0.0.1", metadata={"help": "webrtc: address to serve on"})
    port: int = field(default=8080, metadata={"help": "webrtc: port to serve on"})
    ice_server: str | None = field(default=None, metadata={"help": "webrtc: a STUN/TURN URL (none by default)"})
    fast: bool = field(default=False, metadata={"help": "read a file as fast as it decodes instead of in real time"})
    max_seconds: float | None = field(default=None, metadata={"help": "files: stop after this many seconds"})
    ask: str | None = field(default=None, metadata={"help": "a question asked once the first frame is in"})
    instruction: str | None = field(default=None, metadata={"help": "a standing instruction (proactive mode)"})
    stats_every: float = field(default=5.0, metadata={"help": "seconds between stats lines on stderr"})
    model: str | None = field(default=None, metadata={"help": "overrides model.spec (tiny | dir | hub id)"})

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("a source is needed")
        if self.stats_every <= 0:
            raise ValueError("--stats-every must be > 0")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("--max-seconds must be > 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.ask is not None and not self.ask.strip():
            raise ValueError("--ask must not be empty")


def open_source(spec: str, fps: float, realtime: bool = True, max_seconds: float | None = None):
    """The async frame source a SOURCE argument names."""
    from .sources import camera_source, file_source, rtsp_source

    if spec.startswith(("rtsp://", "rtsps://")):
        return rtsp_source(spec, fps=fps)
    path = Path(spec)
    if path.is_file():
        return file_source(path, fps=fps, realtime=realtime, max_seconds=max_seconds)
    if spec.startswith("/dev/video") or spec.isdigit() or spec.startswith("video="):
        return camera_source(spec, fps=fps)
    if "://" in spec:
        raise ValueError(f"unsupported source URL {spec!r}: sources are rtsp:// or rtsps:// URLs, video files, "
                         "camera devices or webrtc")
    raise FileNotFoundError(f"no such source: {spec!r} (not an rtsp:// URL, a file or a camera device)")


def _print_event(ev: Event, out, err, state: dict) -> None:
    if ev.type == "response.created":
        label = "[alert] " if ev.data.get("proactive") else ""
        print(f"\n{label}@{ev.t or 0:.1f}s ", end="", file=out, flush=True)
    elif ev.type == "response.delta":
        print(ev.data["text"], end="", file=out, flush=True)
    elif ev.type == "response.done":
        print(file=out, flush=True)
    elif ev.type == "error":
        print(f"error [{ev.data.get('code')}]: {ev.data.get('message')}", file=err, flush=True)
    elif ev.type == "stats":
        state["last_stats"] = ev


async def run_watch(cfg: WatchConfig, config: Config, out=sys.stdout, err=sys.stderr) -> None:
    if cfg.source == "webrtc":
        await _watch_webrtc(cfg, config, out, err)
        return
    from .engine import Engine

    if cfg.ask is not None and len(cfg.ask) > config.engine.max_question_chars:
        raise ValueError(f"--ask is {len(cfg.ask)} characters; engine.max_question_chars is "
                         f"{config.engine.max_question_chars}")
    source = open_source(cfg.source, config.engine.fps, not cfg.fast, cfg.max_seconds)
    lm = _load(cfg, config, err)
    loop = asyncio.get_running_loop()
    async with Engine(lm, config) as engine:
        ls, sub, pump = await open_watched(engine, source, cfg.instruction)
        stdin_open = _read_questions(loop, engine, lambda: ls, err)
        state: dict = {"asked": cfg.ask is None}
        last_print = loop.time()
        ended = False
        while True:
            ev = await sub.get(timeout=0.5)  # None: the timeout, or the subscription closed
            if ev is not None:
                _print_event(ev, out, err, state)
                ended = ended or ev.type == "source.ended"
                if ev.type == "stats" and not state["asked"]:
                    state["asked"] = True
                    engine.ask(ls, cfg.ask)
            if ended and not state["asked"] and ls.processed == 0:
                state["asked"] = True  # no frame ever came: nothing to ask about
            if loop.time() - last_print >= cfg.stats_every and "last_stats" in state:
                s = state["last_stats"]
                d = s.data
                print(f"[stats] t={s.t:.1f}s fps in {d['fps_in']:.1f} processed {d['fps_processed']:.1f} "
                      f"dropped {d['dropped']} kept {d['tokens_kept']}/{d['tokens_total']} cache "
                      f"{d['cache_len']}/{d['max_tokens']} frame {d['ingest_ms']:.0f} ms", file=err, flush=True)
                last_print = loop.time()
            if ended and state["asked"] and engine._worker.idle(ls) and sub.get_nowait() is None:
                break
        if stdin_open:
            loop.remove_reader(sys.stdin.fileno())
        failure = await pump
    if failure:
        raise ValueError(f"the source failed: {failure}")


async def open_watched(engine: Engine, source, instruction: str | None = None):
    """A session fed by ``source``: (session, its event subscription, the source's pump task)."""
    ls = await engine.open_session()
    sub = engine.bus.subscribe(ls.id)
    if instruction:
        engine.set_instruction(ls, instruction)
    return ls, sub, engine.attach(ls, source)


def _load(cfg: WatchConfig, config: Config, err):
    from model import load_configured

    return load_configured(config.model, cfg.model, say=lambda m: print(m, file=err, flush=True))


def _read_questions(loop, engine: Engine, target, err) -> bool:
    """Turn stdin lines into questions for ``target()`` (the session, or None while there is none),
    without blocking the loop; False where stdin cannot be watched."""
    try:
        fd = sys.stdin.fileno()
    except (OSError, ValueError, AttributeError):
        return False

    from .engine import EngineError

    def on_line() -> None:
        line = sys.stdin.readline()
        if not line:
            loop.remove_reader(fd)
            return
        text = line.strip()
        ls = target()
        if ls is None:
            print("error: no session yet", file=err, flush=True)
            return
        try:
            if text == "/cancel":
                engine.cancel(ls)
            elif text.startswith("/instruct"):
                engine.set_instruction(ls, text.removeprefix("/instruct").strip() or None)
            elif text:
                engine.ask(ls, text)
        except EngineError as exc:
            print(f"error: {exc}", file=err, flush=True)

    try:
        loop.add_reader(fd, on_line)
    except (NotImplementedError, OSError, ValueError):
        return False
    return True


async def _watch_webrtc(cfg: WatchConfig, config: Config, out, err) -> None:
    """Serve the WebRTC page; print every session's answers; stdin questions go to the newest session."""
    from .engine import Engine
    from .sources.webrtc import WebRTCIngest

    lm = _load(cfg, config, err)
    loop = asyncio.get_running_loop()
    async with Engine(lm, config) as engine:
        ingest = WebRTCIngest(engine, [cfg.ice_server] if cfg.ice_server else [])
        port = await ingest.start(cfg.host, cfg.port)
        print(f"open http://{cfg.host}:{port}/ in a browser to stream its camera", file=err, flush=True)
        sub = engine.bus.subscribe()
        newest = {"ls": None}
        stdin_open = _read_questions(loop, engine, lambda: newest["ls"], err)
        try:
            async for ev in sub:
                if ev.type == "session.created":
                    newest["ls"] = engine.get(ev.session)
                    print(f"peer connected: session {ev.session}", file=err, flush=True)
                    if cfg.instruction:
                        engine.set_instruction(newest["ls"], cfg.instruction)
                _print_event(ev, out, err, {})
        finally:
            if stdin_open:
                loop.remove_reader(sys.stdin.fileno())
            await ingest.close()
