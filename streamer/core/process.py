"""The engine core in a child process: the second transport of :class:`streamer.engine.EngineClient`.

The client starts a child (``spawn``: a fresh interpreter, no state inherited), which loads the model
by its spec, builds the core and runs it on its main thread; commands go down one pipe and output
batches come back up it, pickled. Nothing else crosses: this is what proves that the core needs no
shared object, and what a Ray actor replaces. If the child dies (killed, out of memory), the pipe
breaks: every session gets an ``error`` event ``worker_lost``, every waiting request fails, and the
client's ``alive`` (``/health``) turns false; the process that holds the client goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import sys
import threading

from model.config import ModelConfig, SessionConfig

from ..bus import EventBus
from ..config import EngineConfig
from ..engine import EngineClient
from .commands import Outputs

log = logging.getLogger(__name__)


def _child(conn, model: ModelConfig, spec: str | None, config: EngineConfig, session_config: SessionConfig,
           max_sessions: int) -> None:
    """The child's main: load, build the core, tell the parent it is ready (or why not), run."""
    import os
    import signal

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides when to stop
    from model import load_configured

    from .engine_core import build_core

    send_lock = threading.Lock()

    def send(obj) -> None:
        with send_lock:
            conn.send(obj)
    try:
        lm = load_configured(model, spec, say=lambda m: print(f"vl3live core: {m}", file=sys.stderr, flush=True))
        core = build_core(lm, config, session_config, max_sessions, send)
    except Exception as exc:  # a bad config or checkpoint: the parent raises it
        send(("failed", type(exc).__name__, str(exc)))
        return
    send(("ready", core.engine_state(), str(lm.device)))

    def read() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                msg = None
            if msg is None:
                core.stop(timeout=0)
                return
            core.post_many(msg)
    threading.Thread(target=read, name="vl3live-core-inbox", daemon=True).start()
    core.run()


class ProcessEngine(EngineClient):
    """The engine core in a child process, which loads the model of ``model`` (``model.*``; ``spec`` overrides
    its spec) there: the same interface as :class:`streamer.engine.Engine`."""

    def __init__(self, model: ModelConfig, config: EngineConfig | None = None,
                 session_config: SessionConfig | None = None, max_sessions: int = 16, bus: EventBus | None = None,
                 spec: str | None = None):
        super().__init__(config, session_config, max_sessions, bus)
        self.model, self.spec = model, spec
        self._proc = None
        self._conn = None
        self._send_lock = threading.Lock()
        self._outbox: list = []  # commands of this turn of the loop, sent together
        self._reader: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def like(cls, lm, model: ModelConfig, config: EngineConfig | None = None,
             session_config: SessionConfig | None = None, max_sessions: int = 16) -> ProcessEngine:
        """A child core that loads the same model as ``lm`` (its spec, device and dtype; the rest of ``model``)."""
        same = dataclasses.replace(model, spec=lm.spec, device=str(lm.device),
                                   dtype=str(lm.dtype).removeprefix("torch."))
        return cls(same, config, session_config, max_sessions)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def _start_core(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, name="vl3live-core",
                                 args=(child, self.model, self.spec, self.config, self.session_config,
                                       self.max_sessions),
                                 daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        first = await asyncio.to_thread(self._first_message)
        if first[0] == "failed":
            await asyncio.to_thread(self._proc.join, 10)
            raise ValueError(first[2]) if first[1] in ("ValueError", "EngineError") else RuntimeError(first[2])
        _, state, device = first
        self._engine = state
        self._print_pool(state.pool, device)
        self._reader = threading.Thread(target=self._read, name="vl3live-core-outputs", daemon=True)
        self._reader.start()

    def _first_message(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            return ("failed", "RuntimeError", f"the engine core's process exited (code {self._proc.exitcode}) "
                                              "before it was ready")

    def _read(self) -> None:
        """(Reader thread.) Every batch to the loop; a broken pipe means the child is gone."""
        while True:
            try:
                out = self._conn.recv()
            except (EOFError, OSError):
                break
            self._deliver(out)
        if not self._stopping:
            self._proc.join(5)
            self._deliver(Outputs(lost=f"its process exited (code {self._proc.exitcode})"))

    def _post(self, request: int | None, command: object) -> None:
        """(Loop.) Commands sent in one turn of the loop cross the pipe as one message and reach the core
        together (one pickling and one wake-up for a step's worth of frames)."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._send_outbox)
        self._outbox.append((request, command))

    def _send_outbox(self) -> None:
        batch, self._outbox = self._outbox, []
        try:
            with self._send_lock:
                self._conn.send(batch)
        except (OSError, ValueError) as exc:  # the child is gone; the reader reports it to every session
            log.warning("the engine core's pipe is closed: %s", exc)

    async def _stop_core(self) -> None:
        if self._proc is None:
            return
        self._stopping = True
        try:
            with self._send_lock:
                self._conn.send(None)
        except (OSError, ValueError):
            pass
        await asyncio.to_thread(self._proc.join, 30)
        if self._proc.is_alive():
            self._proc.kill()
            await asyncio.to_thread(self._proc.join, 10)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 10)
        self._conn.close()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and self.lost is None
