"""Settings of the engine on a Ray cluster (``cluster.*``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from model.configtree import setting

LOCAL = re.compile(r"local:(\d+)")


@dataclass
class ClusterConfig:
    """Workers on Ray (``vl3live worker``) and the front doors that place sessions on them (``vl3live serve
    --cluster``)."""

    address: str | None = setting(
        'the Ray cluster: null = no Ray (the engine runs in this process); "auto" (the cluster this node '
        'joined), "HOST:PORT" (its GCS), "ray://HOST:PORT" (Ray Client), or "local:N" (start a local Ray '
        "with N workers owned by this command)", default=None)
    namespace: str = setting("Ray namespace the workers are named in (every front door must use the same)",
                             default="vl3live")
    worker_gpus: float | None = setting("GPUs each worker actor takes; null = 1 where the node has CUDA, else 0",
                                        default=None)
    worker_cpus: float = setting("CPUs each worker actor takes (Ray's scheduling, and its torch threads)",
                                 default=1.0)
    door_timeout: float = setting(
        "a worker counts a front door gone when it has not polled for this long: its sessions then wait "
        "server.resume_seconds for a resume through another front door", default=10.0)
    poll_seconds: float = setting("longest a front door's poll waits on a worker with nothing to report",
                                  default=1.0)
    refresh_seconds: float = setting("how often a front door looks for workers that joined", default=2.0)
    max_door_events: int = setting(
        "events a worker holds for one front door between two polls; past this the door counts as gone",
        default=65536)

    def __post_init__(self) -> None:
        if self.address is not None:
            check_address(self.address)
        if min(self.door_timeout, self.poll_seconds, self.refresh_seconds) <= 0 or self.worker_cpus < 0:
            raise ValueError("cluster: door_timeout, poll_seconds and refresh_seconds must be > 0, worker_cpus >= 0")
        if self.poll_seconds * 3 > self.door_timeout:
            raise ValueError("cluster.door_timeout must be at least 3 x cluster.poll_seconds")
        if self.worker_gpus is not None and self.worker_gpus < 0:
            raise ValueError("cluster.worker_gpus must be >= 0")
        if self.max_door_events < 1024:
            raise ValueError("cluster.max_door_events must be >= 1024")


def check_address(address: str) -> str:
    """``address`` if it names a cluster (see ``ClusterConfig.address``), else ``ValueError``."""
    m = LOCAL.fullmatch(address)
    if m is not None:
        if int(m.group(1)) < 1:
            raise ValueError("cluster local:N needs N >= 1 workers")
        return address
    if address == "auto" or address.startswith("ray://") or re.fullmatch(r"[\w.\-\[\]:]+:\d+", address):
        return address
    raise ValueError(f"cluster address {address!r}: use auto, HOST:PORT, ray://HOST:PORT or local:N")


def local_workers(address: str) -> int:
    """N of ``local:N`` (0 for any other address)."""
    m = LOCAL.fullmatch(address)
    return int(m.group(1)) if m is not None else 0
