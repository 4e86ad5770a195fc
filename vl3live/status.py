"""``vl3live status --cluster ADDRESS``: the workers of a Ray cluster, their sessions and KV pool use."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from .config import add_dataclass_arguments, dataclass_from_args, load_config


@dataclass
class StatusConfig:
    """``vl3live status`` options."""

    cluster: str | None = field(default=None, metadata={
        "help": "the Ray cluster: auto | HOST:PORT | ray://HOST:PORT (overrides cluster.address)"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of a table"})


def cluster_status(config) -> list[dict]:
    """Every live worker's ``info()`` (a worker that does not answer in 10 s is listed with its error)."""
    from streamer.cluster import ray_env

    ray_env.connect(config.cluster)
    r = ray_env.ray()
    found = ray_env.find_workers(config.cluster)
    out = []
    for name, actor in sorted(found.items()):
        try:
            out.append(r.get(actor.info.remote(), timeout=10))
        except Exception as exc:
            out.append({"name": name, "alive": False, "error": ray_env.first_line(exc)})
    return out


def plain(info: dict) -> dict:
    """``info`` as JSON can hold it."""
    engine = info.get("engine")
    if engine is None:
        return info
    pool = engine.pool
    out = {k: v for k, v in info.items() if k != "engine"}
    out["pool"] = {"tokens": pool.pool_tokens, "reserved_tokens": pool.pages_reserved * pool.page_tokens,
                   "used_tokens": pool.tokens_used, "bytes": pool.pool_bytes} if pool is not None else None
    out["steps"] = engine.steps
    out["frames"] = {k: getattr(engine.frames, k) for k in ("accepted", "processed", "dropped", "sampled_out",
                                                           "refused", "pending")}
    return out


def run_status(cfg: StatusConfig, config, out=sys.stdout) -> int:
    from streamer.cluster.config import check_address, local_workers

    address = check_address(cfg.cluster or config.cluster.address or "auto")
    if local_workers(address):
        raise ValueError("vl3live status looks at a running cluster: --cluster auto | HOST:PORT | ray://HOST:PORT")
    config.cluster.address = address
    workers = [plain(i) for i in cluster_status(config)]
    if cfg.json:
        print(json.dumps({"cluster": address, "workers": workers}, indent=1), file=out)
        return 0
    print(f"{len(workers)} worker(s) in {address} (namespace {config.cluster.namespace})", file=out)
    for w in workers:
        if "error" in w:
            print(f"  {w['name']}: not answering ({w['error']})", file=out)
            continue
        pool = w["pool"]
        print(f"  {w['name']}  {w['host']} pid {w['pid']}  {w['device']} {w['dtype']}  {w['model']}  "
              f"sessions {len(w['sessions'])}/{w['max_sessions']}  KV {pool['reserved_tokens']}/{pool['tokens']} "
              f"tokens reserved, {pool['used_tokens']} used  frames {w['frames']['processed']} processed  "
              f"doors {len(w['doors'])}", file=out)
        for sid, s in sorted(w["sessions"].items()):
            where = f"front door {s['door']}" if s["door"] else f"no front door: resumable for {s['resumable_for']:.0f} s"
            print(f"    {sid}  {where}", file=out)
    return 0


HELP = "list the workers of a Ray cluster, their sessions and KV pool use"


def add_arguments(p) -> None:
    add_dataclass_arguments(p, StatusConfig)


def run(args) -> int:
    return run_status(dataclass_from_args(StatusConfig, args), load_config(args.config, args.overrides))
