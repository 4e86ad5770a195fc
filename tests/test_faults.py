"""Faults a server survives, injected on CPU: a packed step out of memory is re-run item by item after
the allocator's cache is freed; a sticky device error (a device-side assert) marks the engine unhealthy:
every session is told, ``/health`` says so and nothing more is served; idle sessions keep copies."""

import asyncio

import pytest
import torch

from model import StreamSession
from model import executor as executor_module
from model.executor import DeviceFault, Executor, Forward, is_sticky
from model.kvpool import KVPool, pool_size
from streamer.engine import EngineError
from streamer.events import Error
from streamer.websocket.client import Client
from tests import ws_rig
from tests.conftest import eventually, scene_frames
from tests.test_core_process import _health

DEVICE_ASSERT = "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported"


def _items(lm, pool, ids):
    emb = lm.model.get_input_embeddings()
    return [Forward(pool.open(128), len(x), lambda _, x=x: emb(torch.tensor(x))) for x in ids]


def test_a_step_out_of_memory_is_rerun_item_by_item_after_freeing_the_cache(lm, monkeypatch):
    ids = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    tc = lm.model.config.text_config
    ex = Executor(lm)
    real = Executor._packed
    freed = []

    def packed(self, items):
        if len(items) > 1:  # the whole step does not fit; one item at a time does
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, items)
    monkeypatch.setattr(Executor, "_packed", packed)
    monkeypatch.setattr(executor_module, "free_memory", lambda device: freed.append(device))
    items = _items(lm, KVPool(tc, 1024, "cpu", torch.float32), ids)
    ex.run(items)
    assert ex.oom_retries == 1 and ex.fallbacks == 1 and freed == [lm.device]
    assert all(it.error is None and it.out_logits is not None for it in items)
    monkeypatch.setattr(Executor, "_packed", real)
    for it, x in zip(items, ids):  # the same results as each alone
        lone = _items(lm, KVPool(tc, 256, "cpu", torch.float32), [x])[0]
        Executor(lm).run([lone])
        assert (lone.out_logits - it.out_logits).abs().max() <= 1e-5 and it.seq.length == len(x)
    assert ex.fault is None


def test_a_sticky_device_error_marks_the_engine_unhealthy_and_every_session_is_told(lm, monkeypatch):
    broken = {"on": False}
    real = Executor._packed

    def packed(self, items):
        if broken["on"]:
            raise RuntimeError(DEVICE_ASSERT)
        return real(self, items)
    monkeypatch.setattr(Executor, "_packed", packed)

    async def main():
        async with ws_rig.serving(lm) as (engine, server, url):
            errors: list[Error] = []
            engine.bus.observe(lambda ev: errors.append(ev) if isinstance(ev, Error) else None)
            a, b = Client(url), Client(url)
            for c in (a, b):
                await c.connect()
            shots = scene_frames(3, ws_rig.H, ws_rig.W)
            for c in (a, b):
                await c.send_frame(ws_rig.png(shots[0]), pts=0.0)
            assert await eventually(lambda: all(s.processed == 1 for s in engine.sessions.values()), 60)
            broken["on"] = True
            for c in (a, b):
                await c.send_frame(ws_rig.png(shots[1]), pts=1.0)
            for c in (a, b):  # each client is told, on its open connection
                err = await c.next_event("error", timeout=30)
                while err.code != "worker_lost":
                    err = await c.next_event("error", timeout=30)
                assert "device failed" in err.message and "device-side assert" in err.message
            status, body = await asyncio.to_thread(_health, server.port)
            assert status == 503 and "device-side assert" in body["lost"] and not engine.alive
            with pytest.raises(EngineError) as info:  # nothing pretends to be served
                await engine.open_session()
            assert info.value.code == "worker_lost"
            for c in (a, b):
                await c.close()
            return errors

    errors = asyncio.run(main())
    assert len({e.session for e in errors if e.code == "worker_lost"}) == 2


def test_an_idle_session_keeps_copies_not_views_of_the_steps_tensors(lm):
    s = StreamSession(lm)
    s.add_frame(scene_frames(1, 84, 112)[0], 0.0)
    for t in (s._last_hidden, s._last_logits):
        assert t is None or t._base is None  # not a view
    assert s._last_hidden is not None and s._last_hidden.untyped_storage().nbytes() == s._last_hidden.nbytes


def test_the_pool_is_sized_by_the_sessions_and_says_so(lm):
    tokens, why = pool_size(lm, 1000, 8, 16, 0.85)
    assert tokens == 8 * 1016 and "8 sessions x 1016 tokens" in why


def test_a_sticky_device_error_fails_the_step_and_every_later_one(lm, monkeypatch):
    assert is_sticky(RuntimeError(DEVICE_ASSERT)) and is_sticky(RuntimeError("CUDA error: an illegal memory access"))
    assert not is_sticky(torch.OutOfMemoryError("CUDA out of memory")) and not is_sticky(ValueError("bad frame"))
    assert not is_sticky(RuntimeError("shape mismatch"))
    ex = Executor(lm)
    monkeypatch.setattr(Executor, "_packed", lambda self, items: (_ for _ in ()).throw(RuntimeError(DEVICE_ASSERT)))
    tc = lm.model.config.text_config
    first = _items(lm, KVPool(tc, 1024, "cpu", torch.float32), [[1, 2], [3, 4, 5]])
    ex.run(first)
    assert all(isinstance(it.error, DeviceFault) for it in first) and ex.fault is not None and ex.fallbacks == 0
    monkeypatch.undo()
    later = _items(lm, KVPool(tc, 1024, "cpu", torch.float32), [[6, 7]])
    ex.run(later)  # the device is gone: nothing runs on it any more
    assert isinstance(later[0].error, DeviceFault) and later[0].seq.length == 0
