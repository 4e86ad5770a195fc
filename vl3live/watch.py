"""``vl3live watch SOURCE``: stream a camera, RTSP URL or file through the live engine.

Answers print on stdout as they stream, stats on stderr; each line typed on stdin is a question
(``/instruct TEXT`` sets a standing instruction, ``/cancel`` ends the current answer: ``terminal.py``).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streamer.events import FrameStats, SessionCreated, SourceEnded
from streamer.sources.spec import open_source

from .config import Config, add_dataclass_arguments, dataclass_from_args, load_config
from .terminal import interruptible, load, open_watched, read_stdin, show_event, stats_line, typed_to

if TYPE_CHECKING:  # the engine (torch) loads when a command runs, not when the CLI parses its flags
    pass


@dataclass
class WatchConfig:
    """``vl3live watch`` options."""

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


async def run_watch(cfg: WatchConfig, config: Config, out=sys.stdout, err=sys.stderr) -> None:
    if cfg.source == "webrtc":
        await _watch_webrtc(cfg, config, out, err)
        return
    from streamer.engine import Engine
    from streamer.errors import check_text

    if cfg.ask is not None:
        check_text(cfg.ask, config.engine.max_question_chars, "--ask")
    source = open_source(cfg.source, config.engine.fps, not cfg.fast, cfg.max_seconds)
    lm = load(cfg.model, config, err)
    loop = asyncio.get_running_loop()
    async with Engine(lm, config.engine, config.session, config.server.max_sessions) as engine:
        session, sub, pump = await open_watched(engine, source, cfg.instruction)
        stop_stdin = read_stdin(loop, typed_to(engine, lambda: session), err)
        asked, last, last_print, ended = cfg.ask is None, None, loop.time(), False
        while True:
            ev = await sub.get(timeout=0.5)  # None: the timeout, or the subscription closed
            if ev is not None:
                show_event(ev, out, err)
                ended = ended or isinstance(ev, SourceEnded)
                if isinstance(ev, FrameStats):
                    last = ev
                    if not asked:
                        asked = True
                        engine.ask(session, cfg.ask)
            if ended and not asked and session.processed == 0:
                asked = True  # no frame ever came: nothing to ask about
            if loop.time() - last_print >= cfg.stats_every and last is not None:
                print(stats_line(last), file=err, flush=True)
                last_print = loop.time()
            if ended and asked and engine.idle(session) and sub.get_nowait() is None:
                break
        if stop_stdin is not None:
            stop_stdin()
        failure = await pump
    if failure:
        raise ValueError(f"the source failed: {failure}")


async def _watch_webrtc(cfg: WatchConfig, config: Config, out, err) -> None:
    """Serve the WebRTC page; print every session's answers; stdin questions go to the newest session."""
    from streamer.sources.webrtc import WebRTCIngest

    from .engines import open_engine

    loop = asyncio.get_running_loop()
    async with open_engine(config, cfg.model, err) as engine:  # (cluster.address: sessions on Ray workers)
        ingest = WebRTCIngest(engine, [cfg.ice_server] if cfg.ice_server else [])
        port = await ingest.start(cfg.host, cfg.port)
        print(f"open http://{cfg.host}:{port}/ in a browser to stream its camera", file=err, flush=True)
        sub = engine.bus.subscribe()
        newest = {"session": None}
        stop_stdin = read_stdin(loop, typed_to(engine, lambda: newest["session"]), err)
        try:
            async for ev in sub:
                if isinstance(ev, SessionCreated):
                    newest["session"] = engine.get(ev.session)
                    print(f"peer connected: session {ev.session}", file=err, flush=True)
                    if cfg.instruction:
                        engine.set_instruction(newest["session"], cfg.instruction)
                show_event(ev, out, err)
        finally:
            if stop_stdin is not None:
                stop_stdin()
            await ingest.close()


HELP = "stream a camera, RTSP URL or file live; questions from stdin"


def add_arguments(p) -> None:
    add_dataclass_arguments(p, WatchConfig, positional=("source",))


def run(args) -> int:
    cfg = dataclass_from_args(WatchConfig, args)
    interruptible(asyncio.run, run_watch(cfg, load_config(args.config, args.overrides)))
    return 0
