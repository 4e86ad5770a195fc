"""``vl3live serve``: load the model, start the engine and the websocket API, serve until Ctrl-C."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from model.config import Config


@dataclass
class ServeConfig:
    model: str | None = field(default=None, metadata={"help": "overrides model.spec (tiny | dir | hub id)"})
    host: str | None = field(default=None, metadata={"help": "overrides server.host"})
    port: int | None = field(default=None, metadata={"help": "overrides server.port"})


async def run_serve(cfg: ServeConfig, config: Config, err=sys.stderr, ready=None) -> None:
    from model import load_configured

    from .engine import Engine
    from .server import Server

    server_cfg = dataclasses.replace(config.server, **{k: v for k, v in (("host", cfg.host), ("port", cfg.port))
                                                       if v is not None})
    Server.check(server_cfg)  # refuse a bad bind before spending minutes on the model
    lm = load_configured(config.model, cfg.model, say=lambda m: print(m, file=err, flush=True))
    async with Engine(lm, config) as engine, Server(engine, server_cfg) as server:
        print(f"serving ws://{server_cfg.host}:{server.port}/ (health: /health, metrics: /metrics)"
              f"{'; token required' if server.token else ''}", file=err, flush=True)
        if ready is not None:
            ready(server.port)
        await server.serve_forever()
