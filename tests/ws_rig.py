"""Websocket API rig: the real server on loopback (in this process's loop, or in a thread for
subprocess clients), a clip file, frame encoders and a raw-message helper."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from model.checkpoints.synthetic import SyntheticCamera
from model.video import write_video_file
from streamer.websocket.server import Server
from tests.engines import engine_for
from vl3live.config import Config

H, W = 84, 112


def config(**server) -> Config:
    cfg = Config()
    cfg.session.frame_pixels = H * W
    cfg.engine.fps = 2.0
    cfg.engine.max_new_tokens = 12
    cfg.engine.proactive_max_new_tokens = 6
    cfg.server.port = 0
    cfg.server.ack_interval = 0.05
    cfg.server.stats_interval = 0.2
    for k, v in server.items():
        setattr(cfg.server, k, v)
    return cfg


@asynccontextmanager
async def serving(lm, cfg: Config | None = None, transport: str = "thread"):
    cfg = cfg or config()
    async with engine_for(lm, cfg, transport) as engine, Server(engine, cfg.server) as server:
        yield engine, server, f"ws://127.0.0.1:{server.port}/"


class ServerThread:
    """The server on its own event loop in a thread, for clients that are other processes."""

    def __init__(self, lm, cfg: Config | None = None):
        self.lm, self.cfg = lm, cfg or config()
        self.url: str | None = None
        self.server: Server | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with serving(self.lm, self.cfg) as (_, server, url):
            self.server, self.url = server, url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


def frames(n: int, seed: float = 0.0) -> list[np.ndarray]:
    cam = SyntheticCamera(H, W)
    return [cam.frame(seed + i * 0.7) for i in range(n)]


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_clip(path: Path, seconds: float = 4.0, fps: int = 10) -> Path:
    cam = SyntheticCamera(H, W)
    return write_video_file(path, (cam.frame(i / fps) for i in range(int(seconds * fps))), fps)


async def recv_json(ws, types: tuple[str, ...] = (), timeout: float = 30.0) -> dict:
    """The next server event (of one of ``types``), skipping others."""
    async def find():
        while True:
            ev = json.loads(await ws.recv())
            if not types or ev["type"] in types:
                return ev
    return await asyncio.wait_for(find(), timeout)
