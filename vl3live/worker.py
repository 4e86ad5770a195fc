"""``vl3live worker``: start engine workers (Ray actors, one per GPU) on this node of a Ray cluster and
keep them until Ctrl-C. Front doors (``vl3live serve --cluster``) find them by name."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from .config import add_dataclass_arguments, dataclass_from_args, load_config
from .terminal import interruptible


@dataclass
class WorkerConfig:
    """``vl3live worker`` options (the rest is ``cluster.*``, ``model.*``, ``engine.*`` in the config tree)."""

    cluster: str | None = field(default=None, metadata={
        "help": "the Ray cluster to join: auto | HOST:PORT | ray://HOST:PORT (overrides cluster.address)"})
    count: int | None = field(default=None, metadata={
        "help": "workers to start on this node; None = one per GPU here (cluster.worker_gpus each), 1 on CPU"})
    model: str | None = field(default=None, metadata={"help": "overrides model.spec (tiny | dir | hub id)"})
    max_sessions: int | None = field(default=None, metadata={
        "help": "sessions per worker (its KV pool on CPU); None = server.max_sessions"})


def workers_here(cfg: WorkerConfig, gpus_each: float) -> int:
    if cfg.count is not None:
        if cfg.count < 1:
            raise ValueError("--count must be >= 1")
        return cfg.count
    if gpus_each <= 0:
        return 1
    import torch

    return max(1, int(torch.cuda.device_count() // gpus_each))


def run_worker(cfg: WorkerConfig, config, err=sys.stderr, ready=None) -> None:
    from streamer.cluster import ray_env
    from streamer.cluster.config import check_address, local_workers

    address = check_address(cfg.cluster or config.cluster.address or "auto")
    if local_workers(address):
        raise ValueError("vl3live worker joins a running cluster: --cluster auto | HOST:PORT | ray://HOST:PORT "
                         "(local:N is for vl3live serve)")
    config.cluster.address = address
    ray_env.connect(config.cluster)
    n = workers_here(cfg, ray_env.gpus_here(config.cluster))
    print(f"vl3live worker: starting {n} worker(s) of {cfg.model or config.model.spec} on this node of {address}",
          file=err, flush=True)
    handles = ray_env.start_workers(n, config.model, cfg.model, config.engine, config.session,
                                    cfg.max_sessions or config.server.max_sessions, config.cluster)
    r = ray_env.ray()
    infos = r.get([h.info.remote() for h in handles])
    for info in infos:
        print(f"worker {info['name']} ready: pid {info['pid']}, {info['device']}, KV pool of "
              f"{info['engine'].pool.pool_tokens} tokens", file=err, flush=True)
    if ready is not None:
        ready(infos)
    alive = set(range(n))
    try:
        while alive:  # until Ctrl-C; say so when a worker dies (front doors reopen its sessions elsewhere)
            time.sleep(2.0)
            for i in sorted(alive):
                try:
                    r.get(handles[i].info.remote(), timeout=30)
                except r.exceptions.GetTimeoutError:
                    continue
                except Exception as exc:
                    alive.discard(i)
                    print(f"worker {infos[i]['name']} is gone: {ray_env.first_line(exc)}", file=err, flush=True)
        print("vl3live worker: every worker is gone", file=err, flush=True)
    finally:
        for h in handles:
            try:
                r.kill(h)
            except Exception:
                pass


HELP = "start engine workers (Ray actors) on this node of a Ray cluster"


def add_arguments(p) -> None:
    add_dataclass_arguments(p, WorkerConfig)


def run(args) -> int:
    interruptible(run_worker, dataclass_from_args(WorkerConfig, args), load_config(args.config, args.overrides))
    return 0
