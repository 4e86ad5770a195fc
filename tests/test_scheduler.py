"""The step scheduler's rules on hand-built wants: no model, no threads."""

import pytest

from streamer.core.scheduler import Want, plan_step


def test_everything_fits_one_step_decode_then_frames_then_prefills():
    wants = [Want("q", "prefill", 40), Want("f", "frame", 30), Want("d", "decode", 1)]
    plan = plan_step(wants, max_tokens=100, min_chunk=8)
    assert plan.run == (("d", 1), ("f", 30), ("q", 40)) and plan.waiting == ()
    assert plan.tokens == 71


def test_the_token_budget_is_never_exceeded_and_a_long_prefill_is_chunked():
    wants = [Want(f"d{i}", "decode", 1) for i in range(5)] + [Want("big", "prefill", 500)]
    plan = plan_step(wants, max_tokens=64, min_chunk=16)
    rows = plan.rows()
    assert plan.tokens == 64
    assert all(rows[f"d{i}"] == 1 for i in range(5))  # every running answer advances this step
    assert rows["big"] == 59  # the rest of the budget goes to the prefill, which continues next step
    # the next steps: the prefill keeps getting what the decodes leave until it is done
    left, steps = 500 - rows["big"], 1
    while left:
        plan = plan_step([Want(f"d{i}", "decode", 1) for i in range(5)] + [Want("big", "prefill", left)], 64, None,
                         16)
        assert plan.tokens <= 64 and all(plan.rows()[f"d{i}"] == 1 for i in range(5))
        left -= plan.rows()["big"]
        steps += 1
    assert steps == 9  # ceil(500 / 59)


def test_two_prefills_share_the_budget_each_gets_its_minimum_first():
    plan = plan_step([Want("a", "prefill", 300), Want("b", "frame", 300)], max_tokens=100, min_chunk=32)
    rows = plan.rows()
    assert rows["b"] + rows["a"] == 100 and rows["a"] >= 32 and rows["b"] >= 32
    assert plan.run[0][0] == "b"  # frames before prefills


def test_work_left_out_goes_first_next_step_so_no_one_waits_twice():
    """With a budget for 3 of 5 decoders, whoever waited goes first: nobody waits two steps in a row."""
    waited = dict.fromkeys("abcde", 0)
    served = {k: 0 for k in waited}
    for step in range(30):
        wants = [Want(k, "decode", 1, waited[k]) for k in "abcde"]
        plan = plan_step(wants, max_tokens=3, rr=step)
        rows = plan.rows()
        assert len(rows) == 3
        for k in waited:
            waited[k] = 0 if k in rows else waited[k] + 1
            served[k] += k in rows
            assert waited[k] <= 1, f"{k} waited {waited[k]} steps at step {step}"
    assert max(served.values()) - min(served.values()) <= 1  # fair shares


def test_a_waiting_frame_goes_before_decodes_that_did_not_wait():
    wants = [Want("d1", "decode", 1), Want("d2", "decode", 1), Want("f", "frame", 10, waited=1)]
    plan = plan_step(wants, max_tokens=10, min_chunk=10)
    assert plan.run[0] == ("f", 10) and set(plan.waiting) == {"d1", "d2"}


def test_ties_rotate_round_robin():
    wants = [Want(k, "decode", 1) for k in "abc"]
    firsts = [plan_step(wants, max_tokens=1, rr=r).run[0][0] for r in range(3)]
    assert firsts == ["a", "b", "c"]


def test_batching_off_is_one_session_per_step_round_robin():
    waited = dict.fromkeys("abc", 0)
    order = []
    for step in range(6):
        wants = [Want("a", "decode", 1, waited["a"]), Want("b", "frame", 20, waited["b"]),
                 Want("c", "prefill", 50, waited["c"])]
        plan = plan_step(wants, max_tokens=1000, max_items=1, rr=step)
        assert len(plan.run) == 1 and len(plan.waiting) == 2
        sid, rows = plan.run[0]
        assert rows == {"a": 1, "b": 20, "c": 50}[sid]  # alone, it runs all it has
        order.append(sid)
        for k in waited:
            waited[k] = 0 if k == sid else waited[k] + 1
    assert sorted(order[:3]) == ["a", "b", "c"] and sorted(order[3:]) == ["a", "b", "c"]


def test_a_budget_smaller_than_the_minimum_chunk_still_makes_progress():
    plan = plan_step([Want("p", "prefill", 100)], max_tokens=5, min_chunk=64)
    assert plan.run == (("p", 5),)


@pytest.mark.parametrize("kwargs", [{"kind": "sleep"}, {"tokens": 0}])
def test_bad_wants_are_refused(kwargs):
    with pytest.raises(ValueError):
        Want("s", **{"kind": "decode", "tokens": 1, **kwargs})
