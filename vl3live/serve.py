"""``vl3live serve``: load the model, start the engine and the websocket API, serve until Ctrl-C."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from .config import Config, add_dataclass_arguments, dataclass_from_args, load_config
from .terminal import interruptible


@dataclass
class ServeConfig:
    """``vl3live serve`` options (the rest is ``server.*`` in the config tree)."""

    model: str | None = field(default=None, metadata={"help": "overrides model.spec (tiny | dir | hub id)"})
    host: str | None = field(default=None, metadata={"help": "overrides server.host"})
    port: int | None = field(default=None, metadata={"help": "overrides server.port"})
    webrtc_port: int | None = field(default=None, metadata={
        "help": "also serve the WebRTC page and /offer on this port of server.host (each browser or WebRTC "
                "peer that connects gets a session; 0 = any free port)"})
    cluster: str | None = field(default=None, metadata={
        "help": "serve sessions on the workers of a Ray cluster: auto | HOST:PORT | ray://HOST:PORT | local:N "
                "(overrides cluster.address)"})


async def run_serve(cfg: ServeConfig, config: Config, err=sys.stderr, ready=None) -> None:
    from streamer.websocket.server import Server

    from .engines import open_engine

    server_cfg = dataclasses.replace(config.server, **{k: v for k, v in (("host", cfg.host), ("port", cfg.port))
                                                       if v is not None})
    Server.check(server_cfg)  # refuse a bad bind before spending minutes on the model
    if cfg.webrtc_port is not None and not server_cfg.loopback:
        raise ValueError("--webrtc-port: the WebRTC page and /offer have no token check; serve them on loopback "
                         "(server.host 127.0.0.1) behind a proxy that authenticates")
    if cfg.cluster is not None:
        from streamer.cluster.config import check_address

        config.cluster.address = check_address(cfg.cluster)
    async with open_engine(config, cfg.model, err, server_cfg.max_sessions) as engine, Server(engine, server_cfg) as server:
        where = f"; sessions on {len(engine.links)} worker(s) of Ray cluster {config.cluster.address}" \
            if config.cluster.address is not None else ""
        ingest = None
        if cfg.webrtc_port is not None:
            from streamer.sources.webrtc import WebRTCIngest

            ingest = WebRTCIngest(engine, max_peers=server_cfg.max_sessions)
            webrtc_port = await ingest.start(server_cfg.host, cfg.webrtc_port)
            where += f"; WebRTC: http://{server_cfg.host}:{webrtc_port}/ (POST /offer)"
        print(f"serving ws://{server_cfg.host}:{server.port}/ (health: /health, metrics: /metrics)"
              f"{'; token required' if server.token else ''}{where}", file=err, flush=True)
        if ready is not None:
            ready(server.port)
        try:
            await server.serve_forever()
        finally:
            if ingest is not None:
                await ingest.close()


HELP = "serve the websocket API (docs/protocol.md)"


def add_arguments(p) -> None:
    add_dataclass_arguments(p, ServeConfig)


def run(args) -> int:
    import asyncio

    interruptible(asyncio.run, run_serve(dataclass_from_args(ServeConfig, args),
                                         load_config(args.config, args.overrides)))
    return 0
