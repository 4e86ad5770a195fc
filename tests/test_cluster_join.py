"""Joining a cluster through Ray Client tries again where Ray's per-client server died as it started
(ray-project/ray#63202; it failed a CI run here). That death is a race inside Ray that no test can cause on
demand, so these tests hand ``_join`` a stand-in for the ``ray`` module that fails the way Ray does; the
real cluster is joined in ``tests/test_cluster.py``."""

from __future__ import annotations

import pytest

from streamer.cluster import ray_env

RAY_SAYS = ("Initialization failure from server:\nTraceback (most recent call last):\n  ...\n"
            "psutil.ZombieProcess: PID still exists but it's a zombie (pid=3975)")


class Ray:
    """``ray.init`` failing its first ``failures`` calls with ``error``."""

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error, self.calls = failures, error, []

    def init(self, address: str, **options) -> None:
        self.calls.append((address, options))
        if len(self.calls) <= self.failures:
            raise self.error


@pytest.fixture(autouse=True)
def no_pause(monkeypatch):
    monkeypatch.setattr(ray_env, "CLIENT_JOIN_PAUSE", 0.0)


def test_a_client_server_that_dies_as_it_starts_is_tried_again(caplog):
    r = Ray(1, ConnectionAbortedError(RAY_SAYS))
    ray_env._join(r, "ray://127.0.0.1:10001", {"namespace": "vl3live"})
    assert [a for a, _ in r.calls] == ["ray://127.0.0.1:10001"] * 2
    assert r.calls[1][1] == {"namespace": "vl3live"}
    assert "try 1 of 3" in caplog.text and "zombie" in caplog.text


def test_it_gives_up_after_the_last_try_with_rays_reason():
    r = Ray(99, ConnectionAbortedError(RAY_SAYS))
    with pytest.raises(RuntimeError, match=r"cannot reach the Ray cluster at ray://h:1 \(3 tries\): "
                                           r"Initialization failure"):
        ray_env._join(r, "ray://h:1", {})
    assert len(r.calls) == ray_env.CLIENT_JOIN_ATTEMPTS == 3


@pytest.mark.parametrize("address, error", [
    ("ray://h:1", ConnectionError("ray client connection timeout")),  # nothing listens: Ray retried already
    ("h:6379", ConnectionError("Initialization failure from server")),  # a GCS address: no Ray Client
])
def test_other_failures_are_not_tried_again(address, error):
    r = Ray(99, error)
    with pytest.raises(RuntimeError, match=f"cannot reach the Ray cluster at {address}: "):
        ray_env._join(r, address, {})
    assert len(r.calls) == 1
