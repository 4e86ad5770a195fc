"""The terminal side of the commands: questions typed on stdin, answers printed as they stream, and the
model and session set up with progress on stderr (``watch``, ``camera``, ``client``).

``watch``, ``camera`` and ``client`` read the same lines and print the same way: a line is a
question, ``/instruct TEXT`` sets the standing instruction (``/instruct`` alone clears it),
``/cancel`` ends the answer being generated. Answers go to stdout, errors and stats to stderr.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from streamer.events import Event, FrameStats
from streamer.websocket import protocol as P
from streamer.websocket import translate

from .config import Config

if TYPE_CHECKING:  # the engine (torch) loads when a command runs, not when the CLI parses its flags
    from streamer.engine import Engine


def parse_line(line: str) -> tuple[str, str | None] | None:
    """A typed line as ``("ask", text)``, ``("instruct", text or None)`` or ``("cancel", None)``; None if blank."""
    text = line.strip()
    if not text:
        return None
    if text == "/cancel":
        return "cancel", None
    if text == "/instruct" or text.startswith("/instruct "):
        return "instruct", text.removeprefix("/instruct").strip() or None
    return "ask", text


def read_stdin(loop: asyncio.AbstractEventLoop, handle: Callable[[str, str | None], None],
               err: TextIO = sys.stderr) -> Callable[[], None] | None:
    """Call ``handle(kind, text)`` for every line typed on stdin (see :func:`parse_line`), without blocking
    the loop. Returns the function that stops reading, or None where stdin cannot be watched."""
    try:
        fd = sys.stdin.fileno()
    except (OSError, ValueError, AttributeError):
        return None

    def on_line() -> None:
        line = sys.stdin.readline()
        if not line:  # end of input
            loop.remove_reader(fd)
            return
        parsed = parse_line(line)
        if parsed is not None:
            try:
                handle(*parsed)
            except ValueError as exc:  # EngineError: refused, and said why; the session goes on
                print(f"error: {exc}", file=err, flush=True)

    try:
        loop.add_reader(fd, on_line)
    except (NotImplementedError, OSError, ValueError):
        return None
    return lambda: loop.remove_reader(fd)


def print_message(msg: P._Event, out: TextIO, err: TextIO) -> None:
    """Print one protocol message: answers stream on ``out``; errors and frame acks on ``err``."""
    match msg:
        case P.ResponseCreated():
            label = "[alert] " if msg.proactive else ""
            print(f"\n{label}@{msg.t or 0:.1f}s ", end="", file=out, flush=True)
        case P.ResponseDelta():
            print(msg.text, end="", file=out, flush=True)
        case P.ResponseDone():
            print(file=out, flush=True)
        case P.Error():
            print(f"error [{msg.code}]: {msg.message}", file=err, flush=True)
        case P.FrameAck():
            print(f"[ack] sent {msg.received} processed {msg.processed} kept {msg.tokens_kept}/{msg.tokens_total} "
                  f"cache {msg.cache_len}", file=err, flush=True)


def interruptible(run, *args) -> None:
    """Run a long-lived command until it ends, Ctrl-C or SIGTERM (both normal ways to stop it)."""
    try:
        run(*args)
    except KeyboardInterrupt:
        pass


def show_event(ev: Event, out, err) -> None:
    """Print one engine event the way ``vl3live client`` prints the server's messages."""
    msg = translate.message(ev)
    if msg is not None and not isinstance(msg, P.SourceEnded):
        print_message(msg, out, err)


def stats_line(ev: FrameStats) -> str:
    c = ev.counts
    return (f"[stats] t={ev.t:.1f}s fps in {c.fps_in:.1f} processed {c.fps_processed:.1f} dropped {c.dropped} "
            f"kept {ev.tokens_kept}/{ev.tokens_total} cache {ev.cache_len}/{ev.max_tokens} frame {ev.ingest_ms:.0f} ms")


def typed_to(engine: Engine, target):
    """What a typed line does to ``target()`` (the session, or None while there is none)."""
    def handle(kind: str, text: str | None) -> None:
        session = target()
        if session is None:
            raise ValueError("no session yet")
        if kind == "cancel":
            engine.cancel(session)
        elif kind == "instruct":
            engine.set_instruction(session, text)
        else:
            engine.ask(session, text)
    return handle


async def open_watched(engine: Engine, source, instruction: str | None = None):
    """A session fed by ``source``: (session, its event subscription, the source's pump task)."""
    session = await engine.open_session()
    sub = engine.bus.subscribe(session.id)
    if instruction:
        engine.set_instruction(session, instruction)
    return session, sub, engine.attach(session, source)


def load(spec: str | None, config: Config, err):
    """The model of ``config.model`` (``spec`` overrides its spec), with progress on ``err``."""
    from model import load_configured

    return load_configured(config.model, spec, say=lambda m: print(m, file=err, flush=True))
