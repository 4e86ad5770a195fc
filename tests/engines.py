"""An engine over a whole config tree, the way the commands build one: the core in a thread of this process
(``thread``, the default), in a child process that loads the same tiny model (``process``), or on two
Ray worker actors of a local Ray cluster that load it (``cluster``)."""

from __future__ import annotations

import dataclasses

from streamer.engine import EngineClient
from vl3live.config import Config

TRANSPORTS = ["thread", "process"]
SERVER_TRANSPORTS = [*TRANSPORTS, "cluster"]  # the websocket tests also run against a Ray-backed front door


def engine_for(lm, cfg: Config, transport: str = "thread") -> EngineClient:
    if transport == "cluster":
        from streamer.cluster.door import ClusterEngine

        same = dataclasses.replace(cfg.model, spec=lm.spec, device=str(lm.device),
                                   dtype=str(lm.dtype).removeprefix("torch."))
        cluster = dataclasses.replace(cfg.cluster, address="local:2", worker_cpus=0.5)
        return ClusterEngine(cluster, cfg.engine, cfg.session, cfg.server.max_sessions, model=same)
    if transport == "process":
        from streamer.core.process import ProcessEngine

        return ProcessEngine.like(lm, cfg.model, cfg.engine, cfg.session, cfg.server.max_sessions)
    from streamer.engine import Engine

    return Engine(lm, cfg.engine, cfg.session, cfg.server.max_sessions)
