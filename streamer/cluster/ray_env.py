"""Ray itself: joining a cluster, starting worker actors, finding the ones that run.

Workers are named actors ``vl3live-worker-...`` in ``cluster.namespace``: every front door finds every
worker by listing them, and a worker that joins later is found the same way. Ray is an optional
dependency (``pip install live-videollama3[cluster]``); importing this module does not need it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from pathlib import Path

from model.config import ModelConfig, SessionConfig

from ..config import EngineConfig
from .config import ClusterConfig, local_workers
from .worker import Worker

log = logging.getLogger(__name__)

PREFIX = "vl3live-worker-"
INLINE_BYTES = 8 << 20  # call arguments up to this size travel inside the call, not through the object store
# Ray Client's proxier starts one server process per client; that process now and then dies as it starts
# (ray-project/ray#63202), and the join fails with "Initialization failure from server". A fresh join
# gets a fresh process: try this many times, this far apart, before giving up.
CLIENT_JOIN_ATTEMPTS = 3
CLIENT_JOIN_PAUSE = 1.0


def ray():
    """The ``ray`` module, or a clear error if it is not installed."""
    try:
        import ray as _ray
    except ImportError:
        raise RuntimeError("the cluster needs Ray: pip install 'live-videollama3[cluster]'") from None
    return _ray


def connect(cluster: ClusterConfig) -> int:
    """Join ``cluster.address`` (once per process); for ``local:N``, start a local Ray first. Returns N for
    ``local:N`` (the workers this process must start), else 0."""
    n = local_workers(cluster.address)
    # Ray passes a call's arguments over the object store once they exceed 100 KB: a 448x336 frame (450 KB)
    # took 1.5 ms more per frame that way than inline in the call (README "Beyond one GPU"). Inline up to
    # 8 MB (a 1080p frame); read when Ray is imported.
    os.environ.setdefault("RAY_max_direct_call_object_size", str(INLINE_BYTES))
    if not n and "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").exists():
        # `ray start` authenticates with the token there when it finds one; a driver joining must send it
        # (read when Ray is imported: set before that)
        os.environ["RAY_AUTH_MODE"] = "token"
    r = ray()
    if r.is_initialized():
        return n
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True, "namespace": cluster.namespace}
    if n:
        r.init(num_cpus=max(2, int(n * cluster.worker_cpus) + 1), include_dashboard=False, **quiet)
    else:
        _join(r, cluster.address, quiet)
    return n


def _join(r, address: str, options: dict) -> None:
    """``ray.init(address)``, tried again where Ray Client's per-client server died as it started."""
    attempts = CLIENT_JOIN_ATTEMPTS if address.startswith("ray://") else 1
    for attempt in range(1, attempts + 1):
        try:
            r.init(address=address, **options)
            return
        except ConnectionError as exc:
            if attempt == attempts or "Initialization failure from server" not in str(exc):
                tries = f" ({attempt} tries)" if attempt > 1 else ""
                raise RuntimeError(f"cannot reach the Ray cluster at {address}{tries}: {exc}") from None
            log.warning("joining %s failed as Ray Client's server started (try %d of %d), trying again: %s",
                        address, attempt, attempts, str(exc).splitlines()[-1])
            time.sleep(CLIENT_JOIN_PAUSE)


def worker_class():
    """:class:`Worker` as a Ray actor class: an async actor that is never restarted (a restarted worker
    would have lost its sessions' KV; front doors reopen them elsewhere instead)."""
    return ray().remote(max_restarts=0, max_task_retries=0, max_concurrency=1024)(Worker)


def gpus_here(cluster: ClusterConfig) -> float:
    """GPUs each worker takes: ``cluster.worker_gpus``, or 1 where this node has CUDA."""
    if cluster.worker_gpus is not None:
        return cluster.worker_gpus
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def start_workers(n: int, model: ModelConfig, spec: str | None, engine: EngineConfig, session: SessionConfig,
                  max_sessions: int, cluster: ClusterConfig, here: bool = True) -> list:
    """``n`` worker actors owned by this process (they end with it), on this node with ``here``; returns
    their handles once every one has loaded its model (``RuntimeError`` naming the first that failed)."""
    r = ray()
    gpus = gpus_here(cluster)
    options = {"num_cpus": cluster.worker_cpus, "num_gpus": gpus, "namespace": cluster.namespace}
    if here:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(r.get_runtime_context().get_node_id(),
                                                                        soft=False)
    cls = worker_class()
    host = socket.gethostname().split(".")[0]
    handles = []
    for _ in range(n):
        name = f"{PREFIX}{host}-{uuid.uuid4().hex[:8]}"
        handles.append(cls.options(name=name, **options).remote(name, model, spec, engine, session, max_sessions,
                                                                cluster))
    try:
        r.get([h.ready.remote() for h in handles])
    except Exception as exc:
        for h in handles:
            r.kill(h)
        raise RuntimeError(f"a worker failed to start: {first_line(exc)}") from None
    return handles


def find_workers(cluster: ClusterConfig) -> dict[str, object]:
    """Every live worker of the cluster by name."""
    r = ray()
    found = {}
    for entry in r.util.list_named_actors(all_namespaces=True):
        name, ns = (entry["name"], entry["namespace"]) if isinstance(entry, dict) else (entry, cluster.namespace)
        if ns == cluster.namespace and name.startswith(PREFIX):
            try:
                found[name] = r.get_actor(name, namespace=ns)
            except ValueError:  # it died between the listing and now
                continue
    return found


def first_line(exc: BaseException) -> str:
    """A Ray error's first meaningful line (its own text carries a whole remote traceback)."""
    text = str(exc).strip()
    for line in reversed(text.splitlines()):
        if line.strip() and not line.startswith(" "):
            return line.strip()
    return type(exc).__name__
