"""``vl3live demo`` options (kept apart from ``app.py`` so the CLI can list them without importing gradio)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from model.config import ModelConfig, SessionConfig
from streamer.config import EngineConfig
from streamer.websocket.config import ServerConfig


@dataclass
class DemoConfig:
    """``vl3live demo`` options: where to serve, and how the browser's webcam is captured and sent."""

    model: str | None = field(default=None, metadata={"help": "overrides model.spec (tiny | dir | hub id)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to serve on"})
    port: int = field(default=7860, metadata={"help": "port to serve on (0 = any free port)"})
    rate: float = field(default=2.0, metadata={"help": "webcam frames sent per second"})
    width: int = field(default=640, metadata={"help": "webcam capture width asked of the browser"})
    height: int = field(default=480, metadata={"help": "webcam capture height asked of the browser"})
    refresh: float = field(default=0.25, metadata={"help": "seconds between page updates (chat, stats, overlay)"})

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.refresh <= 0:
            raise ValueError("--rate and --refresh must be > 0")


class Settings(Protocol):
    """The parts of the config tree the demo reads (the commands' ``Config`` has them all)."""

    model: ModelConfig
    session: SessionConfig
    engine: EngineConfig
    server: ServerConfig
