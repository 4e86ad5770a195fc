"""The engine behind the demo: its own event loop in a thread, driven by gradio's handlers.

Gradio calls handlers from its worker threads; every engine call is marshalled onto the engine's
loop, so the engine keeps its one-loop rule. Each browser tab gets a session and a
:class:`SessionView`, which folds the session's events into a chat transcript and stats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from dataclasses import dataclass, field

import numpy as np

from model import load_configured
from streamer.bus import Subscription
from streamer.engine import Engine
from streamer.events import (
    Error,
    Event,
    FrameStats,
    ResponseCreated,
    ResponseDelta,
    ResponseDone,
    SourceEnded,
)
from streamer.sources.spec import open_source, source_kind

from .config import Settings
from .overlay import keep_overlay


@dataclass
class SessionView:
    """What the page shows for one session, built from its events."""

    sid: str
    sub: Subscription
    chat: list[dict] = field(default_factory=list)  # gradio "messages": {"role", "content"}
    answers: dict[str, int] = field(default_factory=dict)  # response id -> index in chat
    stats: FrameStats | None = None  # the last frame's
    last_t: float | None = None
    ttft_ms: float | None = None
    errors: int = 0
    source: str = "webcam"
    _repeat: tuple[str, int, int] | None = None  # (error code, chat index, times) of the last error line

    def apply(self, ev: Event) -> None:
        match ev:
            case ResponseCreated():
                head = f"🔔 **Alert** @{ev.t or 0:.1f}s: " if ev.proactive else ""
                self.answers[ev.response_id] = len(self.chat)
                self.chat.append({"role": "assistant", "content": head})
            case ResponseDelta() if ev.response_id in self.answers:
                self.chat[self.answers[ev.response_id]]["content"] += ev.text
            case ResponseDone():
                if ev.ttft_ms is not None and not ev.proactive:
                    self.ttft_ms = ev.ttft_ms
                if ev.cancelled and ev.response_id in self.answers:
                    self.chat[self.answers[ev.response_id]]["content"] += " *(cancelled)*"
            case FrameStats():
                self.stats, self.last_t = ev, ev.t
            case Error():
                self._error(ev)
            case SourceEnded():
                self.chat.append({"role": "assistant", "content": f"*(the {self.source} ended)*"})

    def _error(self, ev: Error) -> None:
        self.errors += 1
        text = f"⚠️ error `{ev.code}`: {ev.message}"
        if self._repeat is not None and self._repeat[0] == ev.code and self._repeat[1] == len(self.chat) - 1:
            n = self._repeat[2] + 1  # the same kind of error again (a source retrying): one line, counted
            self.chat[-1]["content"] = f"{text} (x{n})"
            self._repeat = (ev.code, len(self.chat) - 1, n)
        else:
            self.chat.append({"role": "assistant", "content": text})
            self._repeat = (ev.code, len(self.chat) - 1, 1)


class DemoBackend:
    """The engine behind the demo page, on its own event loop; every call from gradio's threads is
    marshalled onto that loop."""

    def __init__(self, config: Settings, lm=None):
        self.config = config
        self.lm = lm
        self.views: dict[str, SessionView] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vl3live-demo-engine", daemon=True)
        self._thread.start()
        self.engine: Engine | None = None
        self._lock = threading.Lock()

    def _run(self, coro, timeout: float | None = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call(self, fn, *args, **kwargs):
        async def call():
            return fn(*args, **kwargs)
        return self._run(call())

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, progress=print) -> None:
        """Load the model (unless given) and start the engine."""
        if self.lm is None:
            self.lm = load_configured(self.config.model, say=progress)
        c = self.config
        self.engine = Engine(self.lm, c.engine, c.session, c.server.max_sessions)
        self._run(self.engine.start())

    def reload(self, spec: str, progress=print) -> None:
        """Switch to another model: every session ends (its cache belongs to the old model)."""
        with self._lock:
            self._run(self.engine.close(), timeout=300)
            self.views.clear()
            self.config = dataclasses.replace(self.config, model=dataclasses.replace(self.config.model, spec=spec))
            self.lm = None
            self.start(progress)

    def close(self) -> None:
        if self.engine is not None:
            self._run(self.engine.close(), timeout=300)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- sessions ---------------------------------------------------------------------------------
    def open_session(self, layout: str | None = None, memory_budget: int | None = None) -> str:
        sc = self.config.session
        sc = dataclasses.replace(sc, layout=layout or sc.layout,
                                 budget=dataclasses.replace(sc.budget, max_tokens=memory_budget or sc.budget.max_tokens))

        async def open_():
            session = await self.engine.open_session(sc)
            return session.id, self.engine.bus.subscribe(session.id)
        sid, sub = self._run(open_())
        self.views[sid] = SessionView(sid, sub)
        return sid

    def close_session(self, sid: str | None) -> None:
        view = self.views.pop(sid, None) if sid else None
        if view is not None and self.engine is not None:
            view.sub.close()
            self._run(self.engine.close_session(sid))

    def alive(self, sid: str | None) -> bool:
        return sid is not None and sid in self.views

    # -- input ------------------------------------------------------------------------------------
    def push(self, sid: str, rgb: np.ndarray) -> None:
        """A webcam frame, timed by its arrival."""
        rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)

        self._call(lambda: self.engine.push_frame(self.engine.get(sid), rgb))  # stamped on arrival

    def attach(self, sid: str, spec: str, realtime: bool = True) -> None:
        """Feed a video file or an rtsp:// URL into the session instead of the webcam. A camera that
        cannot be reached says so in the chat (each retry counted on one line); the reader retries."""
        session = self._call(self.engine.get, sid)
        fps = session.settings.fps
        loop, bus = self._loop, self.engine.bus

        def failed(message: str) -> None:  # from the reader thread
            loop.call_soon_threadsafe(bus.publish, Error(session=sid, code="source", message=message))

        async def go():
            await self.engine.detach(session)
            self.engine.attach(session, open_source(spec, fps, realtime, on_failure=failed), continue_clock=True)
        self._run(go())
        self.views[sid].source = "RTSP stream" if source_kind(spec) == "rtsp" else "video file"

    def ask(self, sid: str, text: str) -> None:
        chat = self.views[sid].chat
        chat.append({"role": "user", "content": text})  # before its answer can start
        try:
            self._call(lambda: self.engine.ask(self.engine.get(sid), text))
        except Exception:
            chat.remove({"role": "user", "content": text})
            raise

    def instruct(self, sid: str, text: str | None) -> None:
        self._call(lambda: self.engine.set_instruction(self.engine.get(sid), text or None))

    def update(self, sid: str, **kwargs) -> None:
        self._call(lambda: self.engine.update(self.engine.get(sid), **kwargs))

    # -- output -----------------------------------------------------------------------------------
    def refresh(self, sid: str) -> SessionView:
        """Apply the events that arrived since the last call; returns the view."""
        view = self.views[sid]

        def drain() -> list[Event]:
            out = []
            while (ev := view.sub.get_nowait()) is not None:
                out.append(ev)
            return out
        for ev in self._call(drain):
            view.apply(ev)
        return view

    def snapshot(self, sid: str, overlay: bool = False):
        """An exact look at a session (settings, counters, cache statistics) from the engine core."""
        return self._run(self.engine.snapshot(self.engine.get(sid), overlay=overlay))

    def overlay(self, sid: str) -> np.ndarray | None:
        """The last frame in the cache with the patches DiffFP dropped dimmed."""
        last = self.snapshot(sid, overlay=True).overlay
        return None if last is None else keep_overlay(*last)

    def stats_markdown(self, sid: str) -> str:
        view = self.views[sid]
        s = view.stats
        if s is None:
            return "waiting for the first frame ..."
        c = s.counts
        ttft = f"{view.ttft_ms:.0f} ms" if view.ttft_ms is not None else "-"
        return "\n".join([  # two stat columns, so the table stays short
            "| stat | value | stat | value |", "|---|---|---|---|",
            f"| stream time | {view.last_t or 0:.1f} s | fps in / processed | {c.fps_in:.1f} / {c.fps_processed:.1f} |",
            f"| frames dropped (latest wins) | {c.dropped} | tokens kept, last frame | {s.tokens_kept} / "
            f"{s.tokens_total} |",
            f"| cache / budget | {s.cache_len} / {s.max_tokens or '∞'} tokens | frames evicted | {s.evicted_frames} |",
            f"| per-frame latency | {s.latency_ms:.0f} ms (model {s.ingest_ms:.0f} ms) | TTFT, last answer | "
            f"{ttft} |",
        ])
