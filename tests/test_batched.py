"""The batched engine: many sessions' work in one packed forward per step equals each session alone.

Every scenario runs real sessions of the tiny model through the ``Engine`` (scheduler, executor,
shared KV pool, preprocessing threads) and replays the same inputs on lone ``StreamSession``s.
"""

import asyncio

import numpy as np
import pytest
import torch

from model import SessionConfig, StreamSession
from model.config import BudgetConfig
from model.executor import Executor, Forward
from model.kvpool import KVPool, PoolFullError
from model.sampling import Sampling
from streamer.engine import Engine, EngineError
from streamer.events import Error, ResponseDelta, ResponseDone
from streamer.sources import Frame
from tests.conftest import eventually, scene_frames
from tests.engines import engine_for
from vl3live.config import Config

SPECS = {  # name: (session config, frame size): different layouts, frame sizes, budgets
    "evict": (SessionConfig(frame_pixels=28 * 28 * 12, budget=BudgetConfig(
        max_tokens=150, recent_tokens=30, reserve_tokens=40, recall="on", recall_top_k=2)), (100, 140)),
    "stream": (SessionConfig(layout="stream", frame_pixels=28 * 28 * 20), (150, 200)),
    "watch": (SessionConfig(frame_pixels=28 * 28 * 6), (84, 112)),
    "long": (SessionConfig(frame_pixels=28 * 28 * 16), (120, 160)),
}
ROUNDS = 8


def _config(**engine) -> Config:
    cfg = Config()
    cfg.engine.fps = 1000.0
    for k, v in engine.items():
        setattr(cfg.engine, k, v)
    return cfg


class _Driver:
    """Feeds sessions of an engine and records, per session, exactly what it was given in order."""

    def __init__(self, eng: Engine):
        self.eng = eng
        self.sessions, self.log, self.sub, self.frames = {}, {}, {}, {}

    async def open(self, name: str, seed: int) -> None:
        cfg, (h, w) = SPECS[name]
        session = await self.eng.open_session(cfg, record_logits=True)
        self.sessions[name], self.log[name] = session, []
        self.sub[name] = self.eng.bus.subscribe(session.id, maxsize=100000)
        if name == "evict":  # noise: every token survives DiffFP, so the budget evicts
            rng = np.random.default_rng(seed)
            self.frames[name] = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(ROUNDS + 4)]
        else:
            self.frames[name] = scene_frames(ROUNDS + 4, h, w, seed=seed)

    def push(self, name: str) -> None:
        i = sum(what == "frame" for what, _, _ in self.log[name])
        f, t = self.frames[name][i], 0.5 * i + 0.25
        self.log[name].append(("frame", f, t))
        self.eng.push_frame(self.sessions[name], Frame(t, f))

    def ask(self, name: str, q: str, n: int) -> None:
        self.log[name].append(("ask", q, n))
        self.eng.ask(self.sessions[name], q, Sampling(max_new_tokens=n))

    def deltas(self, name: str) -> int:
        return sum(isinstance(e, ResponseDelta) for e in self.sub[name].peek())

    async def processed(self, name: str) -> None:
        n = sum(what == "frame" for what, _, _ in self.log[name])
        assert await eventually(lambda: self.sessions[name].processed == n, timeout=120), (name, self.sessions[name].counters())

    async def settled(self) -> None:
        for session in self.sessions.values():
            await self.eng.settled(session, timeout=120)


async def _scenario(eng: Engine) -> _Driver:
    d = _Driver(eng)
    for seed, name in enumerate(SPECS):
        await d.open(name, seed)
    for r in range(ROUNDS):
        for name in SPECS:  # the same step takes every session's frame
            d.push(name)
        for name in SPECS:
            await d.processed(name)
        if r == 3:  # one answers at length; another asks mid-answer; the others keep streaming
            d.ask("long", "Describe the whole scene in detail.", 24)
            assert await eventually(lambda: d.deltas("long") >= 3, timeout=120)
            d.ask("stream", "What changed?", 8)
            d.push("watch")
            d.push("evict")
            await d.settled()
            for name in ("watch", "evict"):
                d.push(name)
            await d.settled()
        if r == 6:  # its early frames are evicted by now: recall brings some back
            assert (await eng.snapshot(d.sessions["evict"])).stats.evicted_frames > 0
            d.ask("evict", "Where was the bright patch?", 6)
            await d.settled()
    await d.settled()
    return d


def _alone(lm, name: str, log: list) -> StreamSession:
    s = StreamSession(lm, SPECS[name][0])
    s.logit_log = []
    for what, a, b in log:
        if what == "frame":
            s.add_frame(a, b)
        else:
            for _ in s.ask(a, Sampling(max_new_tokens=b)):
                pass
    return s


@pytest.mark.parametrize("engine, transport", [
    ({}, "thread"),  # defaults: everything of a step in one pack
    ({"max_step_tokens": 24, "min_chunk_tokens": 8}, "thread"),  # every frame and question prefill chunked
    ({"batching": False}, "thread"),
    ({}, "process"),  # the core in a child process: only commands and outputs cross
    ({"attention": "flex"}, "thread"),  # one FlexAttention call per layer per step
], ids=["packed", "chunked", "off", "packed-process", "packed-flex"])
def test_batched_sessions_equal_each_session_alone(lm, engine, transport):
    async def main():
        async with engine_for(lm, _config(**engine), transport) as eng:
            d = await _scenario(eng)
            snaps = {name: await eng.snapshot(s, detail=True) for name, s in d.sessions.items()}
            return d, await eng.recent_steps(), eng.stats(), snaps

    d, steps, pool, snaps = asyncio.run(main())
    mean_batch = pool.step_items / pool.steps
    if engine.get("batching", True):
        assert mean_batch > 1.5, f"steps were not packed: {mean_batch:.2f} items per step"
        assert max(len(rows) for _, rows, _ in steps) >= 3
    else:
        assert all(len(rows) == 1 for _, rows, _ in steps)
    limit = engine.get("max_step_tokens")
    if limit:
        assert all(sum(rows.values()) <= limit for _, rows, _ in steps)
    for name in SPECS:
        s, alone = snaps[name], _alone(lm, name, d.log[name])
        assert list(s.token_ids) == alone.token_ids(), name
        assert len(s.logits) == len(alone.logit_log)
        assert s.logits or name == "watch"  # the others answered
        for got, want in zip(s.logits, alone.logit_log):
            assert (got - want).abs().max().item() <= 1e-4, name
        assert s.stats == alone.stats(), name
        assert list(s.frames_in_cache) == alone.frames_in_cache()
    assert snaps["evict"].stats.recalled_frames > 0
    assert snaps["evict"].stats.evicted_frames > 0


def test_a_bad_frame_and_a_full_cache_fail_only_their_own_session(lm):
    """In steps where others answer, one session gets a frame that cannot be read and another one that
    does not fit its cache: each gets its error, the others' answers are what they are alone."""
    full = SessionConfig(frame_pixels=28 * 28 * 12, max_cache_tokens=32, budget=BudgetConfig(max_tokens=None))
    ok = SessionConfig(frame_pixels=28 * 28 * 12)

    async def main():
        async with engine_for(lm, _config()) as eng:
            a, b = await eng.open_session(ok, record_logits=True), await eng.open_session(ok, record_logits=True)
            bad, tight = await eng.open_session(ok), await eng.open_session(full)
            sub = eng.bus.subscribe(maxsize=100000)
            frames = scene_frames(3, 100, 140, seed=3)
            for session in (a, b, bad, tight):
                eng.push_frame(session, Frame(0.0, frames[0]))
            assert await eventually(lambda: all(session.processed == 1 for session in (a, b, bad, tight)))
            eng.ask(a, "What is there?", Sampling(max_new_tokens=12))
            eng.ask(b, "And here?", Sampling(max_new_tokens=12))
            assert await eventually(lambda: eng.answering(a) and eng.answering(b))
            eng.push_frame(bad, Frame(1.0, np.zeros((100, 140, 4), np.uint8)))  # 4 channels
            eng.push_frame(tight, Frame(1.0, frames[1]))  # does not fit 32 tokens
            for session in (a, b, bad, tight):
                await eng.settled(session)
            events = []
            while (e := sub.get_nowait()) is not None:
                events.append(e)
            snaps = {s.id: await eng.snapshot(s, detail=True) for s in (a, b)}
            return a, b, bad, tight, events, frames, snaps

    a, b, bad, tight, events, frames, snaps = asyncio.run(main())
    errors = {e.session: e.code for e in events if isinstance(e, Error)}
    assert errors == {bad.id: "bad_frame", tight.id: "cache_limit"}
    assert bad.refused == tight.refused == 1 and bad.processed == tight.processed == 1
    done = {e.session: e.text for e in events if isinstance(e, ResponseDone)}
    for session, q in ((a, "What is there?"), (b, "And here?")):
        alone = StreamSession(lm, ok)
        alone.logit_log = []
        alone.add_frame(frames[0], 0.0)
        assert done[session.id] == alone.answer(q, Sampling(max_new_tokens=12))
        assert list(snaps[session.id].token_ids) == alone.token_ids()
        assert all((x - y).abs().max() <= 1e-4 for x, y in zip(snaps[session.id].logits, alone.logit_log))


def test_a_packed_step_that_fails_reruns_its_items_alone(lm):
    """An item that breaks the packed forward (here: embeddings of the wrong width) fails alone; the
    others in the step get the results they get alone."""
    tc = lm.model.config.text_config
    pool = KVPool(tc, 1024, "cpu", torch.float32)
    ex = Executor(lm)
    emb = lm.model.get_input_embeddings()
    ids = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]

    def item(seq, i, wrong=False):
        def build(_):
            e = emb(torch.tensor(ids[i]))
            return torch.cat([e, e[:, :1]], dim=1) if wrong else e
        return Forward(seq, len(ids[i]), build)

    seqs = [pool.open(64) for _ in range(3)]
    items = [item(seqs[0], 0), item(seqs[1], 1, wrong=True), item(seqs[2], 2)]
    ex.run(items)
    assert ex.fallbacks == 1 and items[1].error is not None and seqs[1].length == 0
    assert items[0].error is None and items[2].error is None
    for i in (0, 2):
        lone_pool = KVPool(tc, 64, "cpu", torch.float32)
        lone = item(lone_pool.open(64), i)
        ex.run([lone])
        assert (lone.out_logits - items[i].out_logits).abs().max() <= 1e-5
        assert seqs[i].length == len(ids[i])


def test_the_pool_admits_sessions_by_their_budget_and_takes_them_back(lm):
    budget = 400
    cfg = _config(kv_pool_tokens=2 * budget + budget // 2, kv_page_tokens=16)
    cfg.session = SessionConfig(frame_pixels=28 * 28 * 6, budget=BudgetConfig(max_tokens=budget, recent_tokens=60))

    async def main():
        async with engine_for(lm, cfg) as eng:
            assert eng.stats().pool.pool_tokens == 992 and eng.stats().pool.bytes_per_token > 0  # pages of 16
            a = await eng.open_session()
            await eng.open_session()
            with pytest.raises(EngineError, match="KV pool cannot hold another session") as err:
                await eng.open_session()
            assert err.value.code == "too_many_sessions"
            assert eng.stats().pool.pages_reserved == 2 * 25 and eng.stats().pool.sessions == 2
            eng.push_frame(a, Frame(0.0, scene_frames(1, 84, 112)[0]))
            assert await eventually(lambda: a.processed == 1)
            assert eng.stats().pool.tokens_used > 0
            await eng.close_session(a.id)
            c = await eng.open_session()  # a's pages came back
            assert eng.stats().pool.sessions == 2
            eng.push_frame(c, Frame(0.0, scene_frames(1, 84, 112)[0]))
            assert await eventually(lambda: c.processed == 1)
    asyncio.run(main())


def test_a_private_pool_grows_and_a_shared_one_refuses_past_its_reservation(lm):
    tc = lm.model.config.text_config
    grow = KVPool(tc, 32, "cpu", torch.float32, page_size=16, growable=True)
    seq = grow.open(16)
    seq.slots(0, 100)  # past its reservation: a private pool grows
    assert grow.tokens >= 112 and seq.reserved == 112
    fixed = KVPool(tc, 64, "cpu", torch.float32, page_size=16)
    s1 = fixed.open(32)
    fixed.open(32)
    with pytest.raises(PoolFullError):
        fixed.open(16)
    with pytest.raises(RuntimeError, match="past its reserved"):
        s1.slots(0, 48)
    fixed.release(s1)
    fixed.release(s1)  # idempotent
    assert fixed.stats().pages_reserved == 2 and fixed.open(32).base == 0  # its range came back


def test_a_4k_client_does_not_hold_back_another_clients_answer(lm):
    """One client streams 4K frames at a large frame_pixels; another's answer still gets a token in every
    step while it runs, the big frames are preprocessed off the model thread and their prefill is
    chunked to the step budget."""
    big = SessionConfig(frame_pixels=1920 * 1080, budget=BudgetConfig(max_tokens=32768, recent_tokens=4096))
    small = SessionConfig(frame_pixels=28 * 28 * 6)
    cfg = _config(max_step_tokens=512, min_chunk_tokens=64)

    async def main():
        async with engine_for(lm, cfg) as eng:
            a, b = await eng.open_session(big), await eng.open_session(small)
            eng.push_frame(b, Frame(0.0, scene_frames(1, 84, 112)[0]))
            assert await eventually(lambda: b.processed == 1)
            uhd = scene_frames(4, 2160, 3840, seed=9)
            t = 0.0

            async def flood():
                nonlocal t
                while True:
                    t += 0.1
                    eng.push_frame(a, Frame(t, uhd[int(t * 10) % 4]))
                    await asyncio.sleep(0.02)
            feed = asyncio.create_task(flood())
            assert await eventually(lambda: a.processed >= 1, timeout=120)
            eng.ask(b, "What is there?", Sampling(max_new_tokens=30))
            assert await eventually(lambda: eng.answering(b))
            await eng.settled(b, timeout=300)
            feed.cancel()
            await asyncio.gather(feed, return_exceptions=True)
            snap = await eng.snapshot(a)
            return a, b, await eng.recent_steps(), snap.stats, snap.frames_prepared_here

    a, b, steps, a_stats, prepared_here = asyncio.run(main())
    with_b = [i for i, (_, rows, _) in enumerate(steps) if b.id in rows]
    answer = steps[with_b[1]: with_b[-1] + 1]  # after b's first frame: its question and every answer token
    assert len(answer) >= 5 and all(b.id in rows for _, rows, _ in answer), "b's answer skipped a step"
    assert sum(a.id in rows for _, rows, _ in answer) >= 2, "a's frames did not run during b's answer"
    assert all(sum(rows.values()) <= 512 for _, rows, _ in steps)
    assert a_stats.cache_len > 2 * 512  # a's frames are far bigger than a step: they were chunked
    assert prepared_here == 0  # every 4K frame was resized on a preprocessing thread


@pytest.mark.parametrize("attn, attention", [("sdpa", "flex"), ("sdpa", "masked"), ("eager", "masked")])
def test_every_attention_path_of_a_packed_step_equals_per_session_sdpa(attn, attention):
    """Every path (flex: one FlexAttention call per layer over the pool with a block mask; masked: one SDPA
    call over gathered keys with a block-diagonal mask; eager: the same with an additive mask) gives what
    per-session SDPA on the pool's slices gives, on a step mixing a decode row, a chunked prefill, a new
    prefill and a session whose frames were evicted (keys moved and re-rotated); flex attends once per layer."""
    from model import attention as attention_fns
    from model import load_model, upstream
    from model.kvcache import RopeMover

    ref_lm, lm = load_model("tiny", device="cpu", dtype="float32"), load_model("tiny", device="cpu", dtype="float32",
                                                                             attn=attn)
    layers = lm.model.config.text_config.num_hidden_layers
    results, greedy = [], []
    for model, mode in ((ref_lm, "segments"), (lm, attention)):
        ex = Executor(model, attention=mode)
        assert ex.attention == mode
        pool = KVPool(model.model.config.text_config, 4096, "cpu", torch.float32)
        def rows(ids, m=model):
            return lambda _: m.model.get_input_embeddings()(torch.tensor(ids))
        seqs = [pool.open(512) for _ in range(4)]
        rng = np.random.default_rng(0)
        history = [rng.integers(100, 5000, n).tolist() for n in (40, 7, 90, 120)]
        ex.run([Forward(q, len(h), rows(h)) for q, h in zip(seqs, history)])
        keep = torch.cat([torch.arange(10), torch.arange(60, 120)])  # evict 50 tokens from the middle
        pool.compact(seqs[3], keep, RopeMover(upstream.text_model(model.model).rotary_emb))
        calls, steps = dict(attention_fns.calls), ex.steps
        step = [Forward(seqs[0], 1, rows([17])),  # a decode, a chunked prefill, a new one, an evicted session
                Forward(seqs[1], 30, rows(list(range(200, 230))), chunk=12),
                Forward(seqs[2], 5, rows([5, 6, 7, 8, 9])),
                Forward(seqs[3], 3, rows([41, 42, 43]))]
        ex.run(step)
        step[1].chunk = None
        ex.run([step[1]])
        assert ex.steps - steps == 2
        if mode in ("flex", "segments"):  # one attention call per layer per step
            assert attention_fns.calls[mode] - calls[mode] == 2 * layers
        results.append([it.out_logits for it in step])
        greedy.append([it.greedy for it in step])
    for got, want in zip(results[1], results[0]):
        assert (got - want).abs().max() <= 1e-4
    assert greedy[1] == greedy[0]


def test_the_flex_engine_attends_once_per_layer_per_step(lm):
    """With ``engine.attention: flex`` each step calls attention once per layer, whatever its sessions; lone
    sessions (what the scenarios above compare with) keep the per-session SDPA reference."""
    from model import attention as attention_fns

    assert Executor(lm).attention == StreamSession(lm)._executor.attention == "segments"
    layers = lm.model.config.text_config.num_hidden_layers

    async def main():
        async with engine_for(lm, _config(attention="flex")) as eng:
            sessions = [await eng.open_session(SPECS[name][0]) for name in ("watch", "long", "stream")]
            before, steps = attention_fns.calls["flex"], eng.stats().steps
            frames = scene_frames(2, 84, 112)
            for k, f in enumerate(frames):
                for s in sessions:
                    eng.push_frame(s, Frame(float(k), f))
                assert await eventually(lambda k=k: all(s.processed == k + 1 for s in sessions))
            for s in sessions:
                eng.ask(s, "What is there?", Sampling(max_new_tokens=5))
            for s in sessions:
                await eng.settled(s)
            return attention_fns.calls["flex"] - before, eng.stats().steps - steps

    calls, steps = asyncio.run(main())
    assert steps >= 7 and calls == layers * steps


def test_the_logits_head_on_cpu_equals_the_models_and_follows_its_weight():
    """The executor's CPU logits head (a transposed copy of the weight) gives the model's own logits, and a
    weight changed in place (a fine-tune step in the same process) is picked up."""
    from model import load_model, upstream

    lm = load_model("tiny", device="cpu", dtype="float32")
    ex = Executor(lm)
    rows = torch.randn(3, lm.model.config.text_config.hidden_size)
    head = upstream.lm_head(lm.model)
    with torch.inference_mode():
        assert (ex._logits(rows) - head(rows)).abs().max() <= 1e-4 and ex._head_t is not None
    with torch.no_grad():
        head.weight.mul_(2.0)
    with torch.inference_mode():
        assert (ex._logits(rows) - head(rows)).abs().max() <= 1e-4
