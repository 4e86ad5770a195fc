"""``vl3live client SOURCE``: stream a file, camera or RTSP URL to a server; print its answers.

Lines typed on stdin are questions (``vl3live/terminal.py``), asked over the same connection.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass, field

from streamer.sources.spec import open_source
from streamer.websocket import protocol as P
from streamer.websocket.client import Client, ClientError

from .config import add_dataclass_arguments, dataclass_from_args
from .terminal import interruptible, print_message, read_stdin


@dataclass
class ClientConfig:
    """``vl3live client`` options."""

    source: str = field(default="", metadata={"help": "a video file, rtsp:// URL or camera device to stream"})
    url: str = field(default="ws://127.0.0.1:8765/", metadata={"help": "the server's websocket URL"})
    token: str | None = field(default=None, metadata={"help": "bearer token (default: $VL3LIVE_TOKEN)"})
    fps: float = field(default=2.0, metadata={"help": "frames per second sent"})
    fast: bool = field(default=False, metadata={"help": "send a file as fast as it decodes (not real time)"})
    max_seconds: float | None = field(default=None, metadata={"help": "files: stop after this many seconds"})
    ask: str | None = field(default=None, metadata={"help": "a question asked once the first frame is sent"})
    ask_at: float = field(default=0.0, metadata={"help": "stream second at which --ask is asked"})
    instruction: str | None = field(default=None, metadata={"help": "a standing instruction (proactive alerts)"})
    layout: str | None = field(default=None, metadata={"help": "video-turn | stream (default: the server's)"})

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("a source is needed")
        if self.fps <= 0:
            raise ValueError("--fps must be > 0")


async def run_client(cfg: ClientConfig, out=sys.stdout, err=sys.stderr) -> int:
    """Stream ``cfg.source`` to the server, print answers; returns the number of answers received."""
    source = open_source(cfg.source, cfg.fps, not cfg.fast, cfg.max_seconds)
    async with Client(cfg.url, cfg.token or os.environ.get("VL3LIVE_TOKEN")) as c:
        print(f"session {c.session.session_id} (resume token {c.session.resume_token})", file=err, flush=True)
        settings = {k: v for k, v in {"fps": cfg.fps, "layout": cfg.layout, "instruction": cfg.instruction}.items()
                    if v is not None}
        await c.update(**settings)
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task] = set()

        async def ask(text: str) -> None:
            try:
                async for _ in c.ask(text):
                    pass
            except ClientError:
                pass  # printed from the event stream

        def typed(kind: str, text: str | None) -> None:
            work = ask(text) if kind == "ask" else c.cancel() if kind == "cancel" else c.update(instruction=text or "")
            pending.add(loop.create_task(work))

        stop_stdin = read_stdin(loop, typed, err)
        answers = 0

        async def printer() -> None:
            nonlocal answers
            async for ev in c.events():
                print_message(ev, out, err)
                answers += isinstance(ev, P.ResponseDone)

        show = asyncio.create_task(printer())
        try:
            asked = cfg.ask is None
            async for frame in source:
                await c.send_frame(frame.rgb, pts=frame.pts_seconds)
                if not asked and frame.pts_seconds >= cfg.ask_at:
                    asked = True
                    pending.add(loop.create_task(ask(cfg.ask)))
            if not asked:
                pending.add(loop.create_task(ask(cfg.ask)))
            await asyncio.gather(*pending, return_exceptions=True)
            await asyncio.sleep(0.2)
        finally:
            if stop_stdin is not None:
                stop_stdin()
            await c.close()
            await asyncio.gather(show, return_exceptions=True)
    return answers


HELP = "stream a file, camera or RTSP URL to a server; print answers"


def add_arguments(p) -> None:
    add_dataclass_arguments(p, ClientConfig, positional=("source",))


def run(args) -> int:
    from websockets.exceptions import InvalidStatus

    try:
        interruptible(asyncio.run, run_client(dataclass_from_args(ClientConfig, args)))
    except ClientError as exc:
        print(f"vl3live client: server refused: {exc}", file=sys.stderr)
        return 2
    except InvalidStatus as exc:
        body = exc.response.body.decode(errors="replace").strip()
        print(f"vl3live client: server refused the connection: HTTP {exc.response.status_code} {body}",
              file=sys.stderr)
        return 2
    return 0
