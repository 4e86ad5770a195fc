"""``vl3live demo``: the gradio live webcam demo on the live engine.

The webcam streams frames at ``--rate`` per second into the tab's session while the chat keeps
working; a timer folds the session's events (answer deltas, alerts, stats) into the page. A video
file or an RTSP URL can replace the webcam.
"""

from __future__ import annotations

import dataclasses
import sys

import gradio as gr
import torch
from gradio.components.image import WebcamOptions

from model.config import LAYOUTS
from streamer.websocket.config import LOOPBACK_HOSTS

from .backend import DemoBackend
from .config import DemoConfig, Settings

CPU_FRAME_PIXELS = 336 * 252  # 108 tokens a frame: keeps a 2B model responsive on a CPU
CPU_FPS = 0.5


def responsive(config: Settings) -> tuple[Settings, str | None]:
    """On a CPU with a real checkpoint, smaller frames and a lower fps (and a note saying so)."""
    if config.model.spec == "tiny" or torch.cuda.is_available() or (config.model.device or "").startswith("cuda"):
        return config, None
    session = dataclasses.replace(config.session, frame_pixels=min(config.session.frame_pixels, CPU_FRAME_PIXELS))
    engine = dataclasses.replace(config.engine, fps=min(config.engine.fps, CPU_FPS))
    note = (f"no GPU: frames of {session.frame_pixels} pixels at {engine.fps} fps to stay responsive "
            "(override with --set session.frame_pixels=... --set engine.fps=...)")
    return dataclasses.replace(config, session=session, engine=engine), note


class Handlers:
    """The page's event handlers (plain methods: tested directly, without a browser)."""

    def __init__(self, backend: DemoBackend, allow_sources: list[str] | None = None):
        self.b = backend
        self.allow_sources = allow_sources  # None: any rtsp:// URL (loopback demo)
        # gradio's page session -> our session: gradio keeps a closed tab's state for an hour, so the
        # tab's session (and its camera source) is closed on the page's unload event instead
        self.pages: dict[str, str] = {}

    def _session(self, sid: str | None, request: gr.Request | None = None) -> str:
        sid = sid if self.b.alive(sid) else self.b.open_session()
        if request is not None and getattr(request, "session_hash", None):
            self.pages[request.session_hash] = sid
        return sid

    def frame(self, image, sid, request: gr.Request = None):
        """A webcam frame (numpy RGB); returns the session id (state)."""
        if image is None:
            return sid
        sid = self._session(sid, request)
        self.b.push(sid, image)
        return sid

    def ask(self, text: str, sid, request: gr.Request = None):
        text = (text or "").strip()
        sid = self._session(sid, request)
        if text:
            try:
                self.b.ask(sid, text)
            except ValueError as exc:
                gr.Warning(str(exc))
        return "", sid, self.b.refresh(sid).chat

    def instruct(self, text: str, sid, request: gr.Request = None):
        sid = self._session(sid, request)
        try:
            self.b.instruct(sid, (text or "").strip() or None)
        except ValueError as exc:
            gr.Warning(str(exc))
        return sid

    def source(self, video, url: str, sid, request: gr.Request = None):
        """Stream an uploaded video file or an RTSP URL into the session (instead of the webcam)."""
        sid = self._session(sid, request)
        spec = (url or "").strip() or video
        if not spec:
            gr.Warning("upload a video or enter an rtsp:// URL first")
            return sid
        if isinstance(spec, str) and spec.startswith("rtsp"):
            from streamer.sources.spec import source_allowed

            if self.allow_sources is not None and not source_allowed(spec, self.allow_sources):
                gr.Warning("this RTSP URL is not on server.source_allow")
                return sid
        try:
            self.b.attach(sid, spec)
        except (ValueError, FileNotFoundError) as exc:
            gr.Warning(str(exc))
        return sid

    def settings(self, layout: str, threshold: float, budget: float, fps: float, sid, request: gr.Request = None):
        """Live settings apply at once; a new layout or budget starts a new session."""
        view = self.b.views.get(sid) if sid else None
        cfg = self.b.engine.get(sid).config if view else self.b.config.session
        if view is None or layout != cfg.layout or int(budget) != cfg.budget.max_tokens:
            self.b.close_session(sid)
            sid = self._session(self.b.open_session(layout, int(budget)), request)
        try:
            self.b.update(sid, diffp_threshold=float(threshold), fps=float(fps))
        except ValueError as exc:
            gr.Warning(str(exc))
        return sid, self.b.refresh(sid).chat

    def reload(self, spec: str, sid):
        spec = (spec or "").strip()
        if spec and spec != self.b.config.model.spec:
            gr.Info(f"loading {spec} ...")
            self.b.reload(spec)
        return None, []

    def tick(self, sid):
        """Periodic update: (chat, stats markdown, overlay image)."""
        if not self.b.alive(sid):
            return gr.skip(), "start the webcam, or stream a video file / RTSP URL", gr.skip()
        view = self.b.refresh(sid)
        return view.chat, self.b.stats_markdown(sid), self.b.overlay(sid)

    def closed(self, sid) -> None:
        self.b.close_session(sid)

    def unload(self, request: gr.Request) -> None:
        """The tab was closed or reloaded: end its session, and the camera source feeding it, now."""
        sid = self.pages.pop(getattr(request, "session_hash", None) or "", None)
        if sid is not None:
            self.b.close_session(sid)


def build(backend: DemoBackend, cfg: DemoConfig, note: str | None = None,
          allow_sources: list[str] | None = None) -> gr.Blocks:
    h = Handlers(backend, allow_sources)
    sc = backend.config.session
    with gr.Blocks(title="Live VideoLLaMA3") as demo:
        gr.Markdown("# Live VideoLLaMA3\nStream your webcam and ask about what it sees, while it keeps watching."
                    + (f"\n\n*{note}*" if note else ""))
        # a plain function: gradio deep-copies state callbacks per page load, and a bound method would
        # drag the handlers' backend (the whole model) into every copy
        sid = gr.State(None, time_to_live=3600, delete_callback=lambda s: h.closed(s))
        with gr.Row():
            with gr.Column(scale=1):  # the video and its stats first: both in view at 1280x800
                cam = gr.Image(sources=["webcam"], streaming=True, label="webcam", elem_id="webcam", height=360,
                               webcam_options=WebcamOptions(mirror=False, constraints={
                                   "video": {"width": {"ideal": cfg.width}, "height": {"ideal": cfg.height}}}))
                stats = gr.Markdown("start the webcam", elem_id="stats")
                with gr.Accordion("or stream a video file / RTSP camera", open=False, elem_id="sources"):
                    video = gr.Video(label="video file", sources=["upload"])
                    url = gr.Textbox(label="RTSP URL", placeholder="rtsp://camera/stream", elem_id="rtsp_url")
                    start = gr.Button("Stream this source", elem_id="stream_source")
                overlay = gr.Image(label="DiffFP: patches kept from the last frame (others dimmed)",
                                   interactive=False, elem_id="overlay")
            with gr.Column(scale=1):
                chat = gr.Chatbot(label="assistant", elem_id="chat", height=420)
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the video ...", show_label=False, scale=4,
                                          elem_id="question")
                    ask = gr.Button("Ask", scale=1, elem_id="ask")
                with gr.Row():
                    instruction = gr.Textbox(placeholder="Standing instruction, e.g. tell me when someone enters",
                                             show_label=False, scale=4, elem_id="instruction")
                    set_instruction = gr.Button("Set", scale=1)
                with gr.Accordion("Settings", open=False):
                    model = gr.Textbox(value=backend.config.model.spec, label="model (tiny | dir | hub id)")
                    load = gr.Button("Load model (ends every session)")
                    layout = gr.Radio(list(LAYOUTS), value=sc.layout, label="token layout")
                    threshold = gr.Slider(0, 40, value=sc.threshold, step=0.5, label="DiffFP threshold")
                    budget = gr.Number(value=sc.budget.max_tokens or 16384, precision=0, minimum=1024,
                                       label="memory budget (KV tokens)")
                    fps = gr.Slider(0.25, 10, value=backend.config.engine.fps, step=0.25, label="frames per second")
                    apply = gr.Button("Apply (a new layout or budget starts a new session)")
        cam.stream(h.frame, [cam, sid], [sid], stream_every=1.0 / cfg.rate, time_limit=None, concurrency_limit=None,
                   show_progress="hidden")
        ask.click(h.ask, [question, sid], [question, sid, chat], show_progress="hidden")
        question.submit(h.ask, [question, sid], [question, sid, chat], show_progress="hidden")
        set_instruction.click(h.instruct, [instruction, sid], [sid])
        start.click(h.source, [video, url, sid], [sid])
        apply.click(h.settings, [layout, threshold, budget, fps, sid], [sid, chat])
        load.click(h.reload, [model, sid], [sid, chat])
        gr.Timer(cfg.refresh).tick(h.tick, [sid], [chat, stats, overlay], show_progress="hidden")
        demo.unload(h.unload)
    return demo


def run_demo(cfg: DemoConfig, config: Settings, err=sys.stderr, block: bool = True):
    if cfg.model:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, spec=cfg.model))
    if cfg.host not in LOOPBACK_HOSTS:
        print("note: serving beyond loopback; RTSP URLs must match server.source_allow", file=err)
    config, note = responsive(config)
    if note:
        print(f"note: {note}", file=err, flush=True)
    backend = DemoBackend(config)
    backend.start(lambda msg: print(msg, file=err, flush=True))
    allow = None if cfg.host in LOOPBACK_HOSTS else list(config.server.source_allow)
    demo = build(backend, cfg, note, allow)
    demo.queue(default_concurrency_limit=None)
    _, url, _ = demo.launch(server_name=cfg.host, server_port=cfg.port or None, prevent_thread_lock=True,
                            quiet=True, footer_links=[])
    print(f"demo on {url}", file=err, flush=True)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
            backend.close()
    return demo, backend, url
