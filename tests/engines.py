"""An engine over a whole config tree, the way the commands build one: the core in a thread of this process
(``thread``, the default) or in a child process that loads the same tiny model (``process``)."""

from __future__ import annotations

from streamer.engine import EngineClient
from vl3live.config import Config

TRANSPORTS = ["thread", "process"]


def engine_for(lm, cfg: Config, transport: str = "thread") -> EngineClient:
    if transport == "process":
        from streamer.core.process import ProcessEngine

        return ProcessEngine.like(lm, cfg.model, cfg.engine, cfg.session, cfg.server.max_sessions)
    from streamer.engine import Engine

    return Engine(lm, cfg.engine, cfg.session, cfg.server.max_sessions)
