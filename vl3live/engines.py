"""The engine a command runs on: the core in a thread of this process, in a child process
(``engine.transport``), or on the workers of a Ray cluster (``cluster.address``). Commands are the
composition root, so this choice is made here."""

from __future__ import annotations

from .config import Config
from .terminal import load


def open_engine(config: Config, spec: str | None, err, max_sessions: int | None = None, lm=None):
    """An :class:`streamer.engine.EngineClient` for ``config`` (not started). With ``cluster.address`` the
    workers hold the model (``local:N``: started by this engine); with ``engine.transport: process`` a child
    loads it; else it is loaded here (or ``lm`` is used)."""
    sessions = max_sessions or config.server.max_sessions
    if config.cluster.address is not None:
        from streamer.cluster.door import ClusterEngine

        return ClusterEngine(config.cluster, config.engine, config.session, sessions, model=config.model, spec=spec)
    if config.engine.transport == "process":
        from streamer.core.process import ProcessEngine

        return ProcessEngine(config.model, config.engine, config.session, sessions, spec=spec)
    from streamer.engine import Engine

    return Engine(lm if lm is not None else load(spec, config, err), config.engine, config.session, sessions)
