"""An engine over a whole config tree, the way the commands build one."""

from __future__ import annotations

from streamer.engine import Engine
from vl3live.config import Config


def engine_for(lm, cfg: Config) -> Engine:
    return Engine(lm, cfg.engine, cfg.session, cfg.server.max_sessions)
