"""Bad input gets a clear error and costs nothing else: the session stays usable."""

import copy

import numpy as np
import pytest

from model import CacheLimitError, SessionConfig, StreamSession
from model.config import BudgetConfig
from model.sampling import Sampling
from tests.conftest import assert_answers, scene_frames

FP = 28 * 28 * 12


@pytest.fixture
def session(lm):
    s = StreamSession(lm, SessionConfig(frame_pixels=FP))
    s.add_frame(scene_frames(1, 100, 140)[0], 1.0)
    return s


def _still_works(s, t):
    before = s.cache_len
    r = s.add_frame(np.full((100, 140, 3), 7, np.uint8), t)
    assert r.cache_len > before
    assert_answers(s, "Still there?", 2)
    assert s.kv_len == s.cache_len


@pytest.mark.parametrize("frame, t, message", [
    (np.zeros((100, 140, 3), np.float32), 2.0, "uint8"),
    (np.zeros((100, 140), np.uint8), 2.0, "HxWx3"),
    (np.zeros((100, 140, 4), np.uint8), 2.0, "3 channels"),
    (np.zeros((0, 140, 3), np.uint8), 2.0, "empty"),
    (np.zeros((100, 140, 3), np.uint8), 1.0, "increase"),
    (np.zeros((100, 140, 3), np.uint8), 0.5, "increase"),
    (np.zeros((100, 140, 3), np.uint8), float("nan"), "finite"),
    (np.zeros((100, 140, 3), np.uint8), -1.0, "finite"),
    (np.zeros((100, 140, 3), np.uint8), "2", "finite"),
    (None, 2.0, "numpy"),
])
def test_bad_frames_raise_value_error_and_change_nothing(lm, session, frame, t, message):
    twin = StreamSession(lm, SessionConfig(frame_pixels=FP))  # the same stream, without the bad frame
    twin.add_frame(scene_frames(1, 100, 140)[0], 1.0)
    ids = session.token_ids()
    with pytest.raises(ValueError, match=message):
        session.add_frame(frame, t)
    assert session.token_ids() == ids
    # what comes next is exactly what comes next without it: the DiffFP reference, the layout's state
    # (timestamps, separators) and the cache are untouched
    nxt = scene_frames(2, 100, 140, seed=3)[1]
    a, b = session.add_frame(nxt, 2.0), twin.add_frame(nxt, 2.0)
    assert (a.keep_mask == b.keep_mask).all() and a.tokens_kept == b.tokens_kept
    assert session.token_ids() == twin.token_ids()
    _still_works(session, 3.0)


@pytest.mark.parametrize("question, kwargs, message", [
    ("", {}, "non-empty"), ("   \n", {}, "non-empty"), (None, {}, "non-empty"),
    ("ok?", {"max_new_tokens": 0}, "max_new_tokens"),
    ("ok?", {"do_sample": True, "temperature": 0.0}, "temperature"),
])
def test_bad_questions_raise_value_error(session, question, kwargs, message):
    ids = session.token_ids()
    with pytest.raises(ValueError, match=message):
        session.ask(question, Sampling(**kwargs))
    assert session.token_ids() == ids
    _still_works(session, 2.0)


def test_cache_limit_is_refused_naming_the_limit(lm):
    s = StreamSession(lm, SessionConfig(frame_pixels=FP, max_cache_tokens=120, budget=BudgetConfig(max_tokens=None)))
    frame = scene_frames(1, 100, 140)[0]
    s.add_frame(frame, 0.0)
    with pytest.raises(CacheLimitError, match="at most 120"):
        for i in range(1, 50):
            s.add_frame(np.ascontiguousarray(255 - frame) if i % 2 else frame, float(i))
    n = s.cache_len
    assert n <= 120
    with pytest.raises(CacheLimitError, match="120"):
        s.ask("What happened?", Sampling(max_new_tokens=200))
    assert s.cache_len == n and s.kv_len == n
    assert s.max_tokens == 120


def test_model_max_positions_is_the_default_limit(lm):
    s = StreamSession(lm, SessionConfig(frame_pixels=FP, budget=BudgetConfig(max_tokens=None)))
    assert s.max_tokens == lm.model.config.text_config.max_position_embeddings == 32768
    assert StreamSession(lm, SessionConfig(frame_pixels=FP)).max_tokens == 16384  # the default budget


def test_misuse_is_a_clear_runtime_error(session, lm):
    with pytest.raises(RuntimeError, match="layout='stream'"):
        session.respond_probability()
    gen = session.ask("Tell me", Sampling(max_new_tokens=5))
    next(gen)
    with pytest.raises(RuntimeError, match="being generated"):
        session.add_frame(np.zeros((100, 140, 3), np.uint8), 5.0)
    with pytest.raises(RuntimeError, match="already"):
        next(session.ask("Another?"))
    gen.close()
    _still_works(session, 6.0)


def test_stream_layout_needs_stream_tokens(lm):
    from transformers import AutoTokenizer

    from model.checkpoints.tiny import qwen2_tokenizer_dir

    plain = copy.copy(lm)
    plain.tokenizer = AutoTokenizer.from_pretrained(str(qwen2_tokenizer_dir()))
    with pytest.raises(ValueError, match="stream tokens"):
        StreamSession(plain, SessionConfig(layout="stream"))


def test_unstarted_answer_changes_nothing(session):
    ids = session.token_ids()
    session.ask("Never read?")  # never iterated
    assert session.token_ids() == ids
    _still_works(session, 2.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"do_sample": True, "seed": 2**64}, "seed"), ({"seed": -1}, "seed"), ({"seed": "7"}, "seed"),
    ({"do_sample": True, "temperature": 1e9}, "temperature"), ({"do_sample": True, "top_k": 2**40}, "top_k"),
    ({"do_sample": "yes"}, "do_sample"), ({"top_p": float("nan")}, "top_p"),
])
def test_sampling_settings_out_of_range_are_refused_at_once(session, kwargs, message):
    ids = session.token_ids()
    with pytest.raises(ValueError, match=message):
        session.ask("Anything?", Sampling(max_new_tokens=3, **kwargs))
    assert session.token_ids() == ids
    _still_works(session, 2.0)


@pytest.mark.parametrize("where, fail_at", [("IncrementalDetokenizer", 1), ("sample_next", 2), ("_packed", 2)])
def test_a_failure_inside_an_answer_never_leaves_the_session_answering(session, monkeypatch, where, fail_at):
    """Whatever breaks once the question is committed (right after, or mid-answer), the answer ends and
    the session takes frames and questions again."""
    import model.answering as ms
    from model.executor import Executor

    owner = Executor if where == "_packed" else ms
    real = getattr(owner, where)
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, where, broken)
    with pytest.raises(RuntimeError, match="injected"):
        sampled = {"do_sample": True, "seed": 1} if where == "sample_next" else {}  # greedy: the step's argmax
        for _ in session.ask("Tell me a story.", Sampling(max_new_tokens=6, ignore_eos=True, **sampled)):
            pass
    monkeypatch.undo()
    assert not session.answering and session.kv_len == session.cache_len
    _still_works(session, 2.0)
