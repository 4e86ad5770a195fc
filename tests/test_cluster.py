"""The engine on a real Ray cluster (``tests/cluster_rig.py``): a head from ``ray start``, worker actors from
``vl3live worker``, front doors from ``vl3live serve --cluster``, each its own process, the tiny model on
CPU actors. The websocket clients are the same as against a local server (ours, websocat, Node's ws)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from streamer.websocket import protocol as P
from streamer.websocket.client import Client
from tests import cluster_rig as rig
from tests import ws_rig
from tests.test_foreign_clients import node_ws_client_drives_a_session, websocat_drives_a_session


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    head = rig.RayHead(tmp_path_factory.mktemp("ray"))
    procs = []
    try:
        workers = rig.Workers(head.address, 2)
        procs.append(workers)
        door_a, door_b = rig.Door(head.address), rig.Door(head.client_address)  # (B through Ray Client)
        procs += [door_a, door_b]
        yield {"address": head.address, "workers": workers, "a": door_a, "b": door_b, "procs": procs}
        for p in reversed(procs):  # Ctrl-C: each ends cleanly
            assert p.stop() in (0, -signal.SIGKILL), "".join(p.lines)[-3000:]
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.kill()
        head.stop()
    deadline = time.monotonic() + 20
    while rig.ray_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not rig.ray_processes(), f"Ray processes left after ray stop: {rig.ray_processes()}"


async def _ack(c: Client, pred, timeout: float = 60.0) -> P.FrameAck:
    async def find():
        async for ev in c.events():
            if isinstance(ev, P.FrameAck) and pred(ev):
                return ev
        raise ConnectionError(c.closed)
    return await asyncio.wait_for(find(), timeout)


async def _answer(c: Client, text: str = "What is there?") -> P.ResponseDone:
    events = [ev async for ev in c.ask(text)]
    done = events[-1]
    assert isinstance(done, P.ResponseDone) and done.text
    assert done.text == "".join(e.text for e in events if isinstance(e, P.ResponseDelta))
    return done


async def _feed(c: Client, n: int) -> P.FrameAck:
    """``n`` frames half a second of stream time apart, each one into the cache before the next is sent."""
    for i, shot in enumerate(ws_rig.frames(n)):
        await c.send_frame(ws_rig.jpeg(shot), pts=i * 0.5)
        ack = await _ack(c, lambda a, k=i + 1: a.processed == k)
    return ack


def _where(address: str) -> dict[str, str]:
    """Session id -> the worker that holds it (``vl3live status --json``)."""
    return {sid: w["name"] for w in rig.status(address)["workers"] for sid in w.get("sessions", {})}


def test_sessions_spread_over_workers_and_resume_through_another_door(cluster):
    a, b = cluster["a"], cluster["b"]

    async def main():
        clients = [Client(a.url) for _ in range(4)]
        for c in clients:
            await c.connect()
        acks = [await _feed(c, 3) for c in clients]
        assert all(ack.processed == 3 for ack in acks), acks
        where = await asyncio.to_thread(_where, cluster["address"])
        ours = [where[c.session.session_id] for c in clients]
        assert sorted(ours.count(w) for w in set(ours)) == [2, 2], ours  # the most free pool first: 2 and 2
        for c in clients:
            await _answer(c)
        health = a.health()
        assert health["status"] == "ok" and len(health["workers"]) == 2 and health["sessions"] == 4
        metrics = a.metrics()
        for w in set(ours):
            assert f'vl3live_worker_up{{worker="{w}"}} 1.0' in metrics

        first = clients[0]
        sid, token = first.session.session_id, first.session.resume_token
        before = acks[0]
        assert before.cache_len is not None
        await first.disconnect()  # dropped, not ended: resumable
        again = Client(b.url, resume=token)
        created = await again.connect()
        assert created.resumed and created.session_id == sid and created.resume_token != token
        ack = await _ack(again, lambda ack: True)
        assert (ack.received, ack.processed) == (3, 3)  # the first door's counters came along
        await again.send_frame(ws_rig.jpeg(ws_rig.frames(1, seed=9.0)[0]), pts=1.5)
        ack = await _ack(again, lambda ack: ack.processed == 4 and ack.cache_len is not None)
        assert ack.cache_len > before.cache_len  # the same cache, one frame longer
        assert (await _answer(again)).t == 1.5
        assert await _eventually(lambda: a.health()["sessions"] == 3)  # door A let go of it
        assert b.health()["sessions"] == 1
        for c in [again, *clients[1:]]:
            await c.close()
        assert await _eventually(lambda: not _where(cluster["address"]))  # closed on the workers
    asyncio.run(main())


async def _eventually(pred, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.2)
    return True


def test_foreign_clients_drive_a_ray_backed_door(cluster, tmp_path):
    websocat_drives_a_session(cluster["b"].url)
    node_ws_client_drives_a_session(cluster["b"].url, tmp_path)


def test_a_worker_that_joins_takes_new_sessions_and_one_that_dies_is_replaced(cluster):
    a, address = cluster["a"], cluster["address"]

    async def main():
        others = [Client(a.url) for _ in range(2)]  # one on each of the first two workers
        for c in others:
            await c.connect()
        late = await asyncio.to_thread(rig.Workers, address, 1)
        cluster["procs"].append(late)
        (name, pid), = late.workers.items()
        assert await _eventually(lambda: len(a.health()["workers"]) == 3)
        x = Client(a.url)
        await x.connect()
        where = await asyncio.to_thread(_where, address)
        assert where[x.session.session_id] == name  # the newcomer has the most free pool
        assert all(where[c.session.session_id] != name for c in others)
        await x.update(instruction="Tell me when something moves.")
        for c in (x, *others):
            await _feed(c, 2)
        os.kill(pid, signal.SIGKILL)  # the worker dies mid-stream
        lost = await x.next_event("error", timeout=60)
        assert lost.code == "worker_lost"
        done = await _answer(x)  # reopened on another worker: it answers, from an empty cache
        assert done.text
        assert await _eventually(lambda: _where(address).get(x.session.session_id) not in (None, name))
        for c in others:  # nothing else was touched
            await _answer(c)
        assert re.search(r'vl3live_errors_total\{code="worker_lost"\} 1\.0', a.metrics())  # x's alone
        health = a.health()
        assert health["workers_lost"] == 1 and health["status"] == "ok"
        assert sum(w["alive"] for w in health["workers"]) == 2
        for c in (x, *others):
            await c.close()
        assert await _eventually(lambda: late.proc.poll() is not None)  # its command saw it go, and ended
        assert re.search(rf"worker {name} is gone", "".join(late.lines))
    asyncio.run(main())


def test_a_door_that_dies_leaves_its_sessions_resumable_for_resume_seconds(cluster):
    address, b = cluster["address"], cluster["b"]
    door = rig.Door(address, **{"server.resume_seconds": 20.0})  # (room for `vl3live status` on a busy machine)
    cluster["procs"].append(door)

    async def main():
        kept, left = Client(door.url), Client(door.url)
        for c in (kept, left):
            await c.connect()
            await _feed(c, 2)
        token, gone = kept.session.resume_token, left.session.session_id
        await asyncio.sleep(2 * rig.SETTINGS["cluster.refresh_seconds"])  # its counters reach the worker
        door.kill()  # the front door dies (no goodbye to anyone)
        again = Client(b.url, resume=token)
        created = await again.connect()
        assert created.resumed and created.session_id == kept.session.session_id
        ack = await _ack(again, lambda ack: True)
        assert ack.processed == 2 and ack.received == 2
        await _answer(again)
        assert gone in await asyncio.to_thread(_where, address)  # still waiting for its client...
        table = await asyncio.to_thread(subprocess.run, rig.vl3live("status", "--cluster", address),
                                        capture_output=True, text=True, timeout=120)
        assert table.returncode == 0 and re.search(rf"{gone}  no front door: resumable for \d+ s", table.stdout), \
            table.stdout + table.stderr
        assert await _eventually(lambda: gone not in _where(address), timeout=60)  # ...until resume_seconds
        await again.close()
    asyncio.run(main())


def test_a_door_stopped_with_ctrl_c_hands_its_sessions_over(cluster):
    address, b = cluster["address"], cluster["b"]
    door = rig.Door(address, "--webrtc-port", "0")  # (and its WebRTC page and /offer, on the same engine)
    cluster["procs"].append(door)
    assert door.webrtc is not None
    with urllib.request.urlopen(door.webrtc, timeout=10) as r:
        assert r.status == 200 and b"RTCPeerConnection" in r.read()
    bad = urllib.request.Request(door.webrtc + "offer", data=b'{"sdp": "v=0", "type": "offer"}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad, timeout=10)
    assert refused.value.code == 400 and "no video" in refused.value.read().decode()

    async def main():
        c = Client(door.url)
        await c.connect()
        await _feed(c, 2)
        token = c.session.resume_token
        assert await asyncio.to_thread(door.stop) == 0  # Ctrl-C: a clean stop...
        assert c.closed is not None or await _eventually(lambda: c.closed is not None)
        async with Client(b.url, resume=token) as again:  # ...that leaves the session to the other doors
            assert again.session.resumed and again.session.session_id == c.session.session_id
            ack = await _ack(again, lambda ack: True)
            assert ack.processed == 2 and ack.received == 2
            await _answer(again)
    asyncio.run(main())


def test_a_flooding_client_keeps_memory_flat_and_its_counters_add_up(cluster):
    b, address = cluster["b"], cluster["address"]
    big = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    frame = ws_rig.jpeg(big, quality=95)  # ~200 KB: decoded to 900 KB on the door, resized on the worker

    async def main():
        async with Client(b.url) as c:
            await c.update(fps=1)
            workers = {w["name"]: w["pid"] for w in (await asyncio.to_thread(rig.status, address))["workers"]}
            pid = workers[(await asyncio.to_thread(_where, address))[c.session.session_id]]
            rss = []
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < 9.0:  # 10 frames a second into a session that takes 1
                await c.send_frame(frame, pts=n * 0.1)
                n += 1
                if n in (30, 89):
                    rss.append((rig.rss_mb(b.pid), rig.rss_mb(pid)))
                await asyncio.sleep(0.1)
            ack = await _ack(c, lambda a: a.received == n and a.pending == 0 and a.processed >= 5, timeout=60)
        assert ack.received == ack.accepted - ack.source_frames + ack.rate_dropped + ack.rejected
        assert ack.accepted == ack.sampled_out + ack.dropped + ack.processed + ack.refused + ack.pending
        assert ack.sampled_out >= n // 2
        (door0, worker0), (door1, worker1) = rss
        assert door1 - door0 < 40 and worker1 - worker0 < 40, rss  # flat in both processes
    asyncio.run(main())
