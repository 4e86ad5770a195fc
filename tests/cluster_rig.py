"""A real Ray cluster on this machine for the cluster tests: a head started by ``ray start --head``, worker
actors started by ``vl3live worker`` and front doors started by ``vl3live serve --cluster``, each its own
process, talking over loopback. Ray resolves a loopback node address to the machine's own address, so
the head listens there too; nothing outside this machine joins (no other node is started)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests import ws_rig
from tests.conftest import wait_for_line, with_ctrl_c

# the websocket rig's settings (ws_rig.config), for processes that read the config tree from flags
SETTINGS = {"session.frame_pixels": ws_rig.H * ws_rig.W, "engine.fps": 2.0, "engine.max_new_tokens": 12,
            "engine.proactive_max_new_tokens": 6, "server.ack_interval": 0.05, "server.stats_interval": 0.2,
            "server.port": 0, "cluster.worker_cpus": 0.25, "cluster.door_timeout": 3.0,
            "cluster.poll_seconds": 0.5, "cluster.refresh_seconds": 1.0}


def ray_bin() -> str:
    found = shutil.which("ray") or shutil.which("ray", path=os.path.dirname(sys.executable))
    assert found, "the ray command comes with the cluster extra (pip install 'live-videollama3[cluster]')"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes() -> list[str]:
    """Ray's own daemons running on this machine now."""
    r = subprocess.run(["pgrep", "-a", "-f", "gcs_server|raylet|ray::"], capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if "pgrep" not in line]


def vl3live(*args: str, **settings) -> list[str]:
    sets = [x for k, v in {**SETTINGS, **settings}.items() for x in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "vl3live", *sets, *args]


def _popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(with_ctrl_c(cmd), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, text=True)


class Proc:
    """A ``vl3live`` process of the cluster and what it printed."""

    def __init__(self, cmd: list[str], ready: str, count: int = 1, timeout: float = 240.0):
        self.proc = _popen(cmd)
        m, self.lines = wait_for_line(self.proc, ready, timeout)
        deadline = time.monotonic() + timeout
        while m and sum(1 for x in self.lines if re.search(ready, x)) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        if not m or sum(1 for x in self.lines if re.search(ready, x)) < count:
            self.proc.kill()
            raise AssertionError(f"{' '.join(cmd[-6:])} did not start: {''.join(self.lines)[-3000:]}")
        self.matches = [re.search(ready, x) for x in self.lines if re.search(ready, x)]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"did not stop within {timeout} s of Ctrl-C: "
                                     f"{''.join(self.lines)[-3000:]}") from None
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class Workers(Proc):
    """``vl3live worker --count N``: its workers' names and pids."""

    def __init__(self, address: str, count: int):
        super().__init__(vl3live("worker", "--cluster", address, "--count", str(count), "--model", "tiny"),
                         r"worker (\S+) ready: pid (\d+)", count)
        self.workers = {m.group(1): int(m.group(2)) for m in self.matches}


class Door(Proc):
    """``vl3live serve --cluster``: a front door, its websocket URL and HTTP base."""

    def __init__(self, address: str, *args: str, **settings):
        super().__init__(vl3live("serve", "--cluster", address, "--model", "tiny", *args, **settings),
                         r"serving ws://127\.0\.0\.1:(\d+)/")
        self.port = int(self.matches[0].group(1))
        m = re.search(r"WebRTC: (http://\S+/)", self.matches[0].string)
        self.webrtc = m.group(1) if m else None
        self.url = f"ws://127.0.0.1:{self.port}/"
        self.http = f"http://127.0.0.1:{self.port}/"

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(self.http + "health", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 503 carries the same body
            return json.loads(exc.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(self.http + "metrics", timeout=10) as r:
            return r.read().decode()


class RayHead:
    """``ray start --head`` on a free port; ``stop()`` is ``ray stop``."""

    def __init__(self, tmp: Path):
        for _ in range(2):  # (a port taken between picking it and Ray binding it: once more, new ports)
            self.port = free_port()
            self.client_port = free_port()
            while self.client_port == self.port:
                self.client_port = free_port()
            self.address = f"127.0.0.1:{self.port}"
            self.client_address = f"ray://127.0.0.1:{self.client_port}"  # Ray Client, as a door outside uses
            r = subprocess.run([ray_bin(), "start", "--head", f"--port={self.port}", "--num-cpus=16",
                                f"--ray-client-server-port={self.client_port}",
                                "--include-dashboard=false", "--object-store-memory=200000000",
                                "--disable-usage-stats"], capture_output=True, text=True, timeout=180,
                               env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
            if r.returncode == 0:
                return
            self.stop()
        raise AssertionError(f"ray start --head failed twice: {r.stdout[-2000:]}\n{r.stderr[-3000:]}")

    def stop(self) -> None:
        subprocess.run([ray_bin(), "stop", "--force"], capture_output=True, timeout=120)


def status(address: str) -> dict:
    """``vl3live status --cluster ADDRESS --json``."""
    r = subprocess.run(vl3live("status", "--cluster", address, "--json"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")
