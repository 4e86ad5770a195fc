"""The proactive scorer against fixed policies: only the one that knows when the event comes passes.

A policy is what a model could do with a standing instruction and no sight of the event: answer at
once, after every frame, on the first change in the picture, after a fixed delay, never; against
the oracle, which answers when the named shape appears. They run through the same scorer
(:func:`vl3live.evaluation.formats.score_proactive`) and summary as a model's answers, on the held-out
instructions ``vl3live data synth`` writes, read back from its StreamingBench-format file.
"""

import random

import pytest

from training.synth import LEAD, make_world, other_events, proactive_items, write_synth
from vl3live.evaluation import formats as F
from vl3live.evaluation.report import proactive_figures
from vl3live.proof import CAPACITY, FALSE_ALARMS_MAX

SEED = 3


def _items(videos: int = 60) -> list[tuple[F.Probe, list[float], float]]:
    """(probe, when anything else happens after its instruction, the video's end) of held-out videos."""
    out = []
    for i in range(videos):
        world = make_world(f"heldout_{i:04d}", SEED * 100003 + i, heldout=True)
        for item in proactive_items(world, random.Random(i)):
            k = next(k for k in world.tracks if k.shape == item["shape"])
            probe = F.Probe(f"p{i}:{item['shape']}", "streamingbench", "Proactive Output", "proactive", None,
                            item["time"], "", "proactive", item["output"], due=item["due"], question=item["question"])
            out.append((probe, [e for e in other_events(world, k) if e > item["time"]], world.seconds))
    return out


def _frames(probe: F.Probe) -> list[float]:
    """The stream's frames (1 fps) while the instruction stands: after it, until its window closes."""
    t, close, out = int(probe.time) + 1.0, probe.due + F.PROACTIVE_WINDOW, []
    while t <= close:
        out.append(t)
        t += 1.0
    return out


POLICIES = {
    "oracle": lambda p, changes: [(p.due, p.expected)],
    "at once": lambda p, changes: [(p.time, p.expected)],
    "after every frame": lambda p, changes: [(t, p.expected) for t in _frames(p)],
    "on the first change": lambda p, changes: [(min(changes + [p.due]), p.expected)],
    "never": lambda p, changes: [],
    "the wrong shape on time": lambda p, changes: [(p.due, "star")],
    **{f"after {d} s": lambda p, changes, d=d: [(p.time + d, p.expected)] for d in range(LEAD[1] + 3)},
}


def _passes(figures: dict, recall: float) -> bool:
    return recall >= CAPACITY["proactive"] and figures["false_alarms"] <= FALSE_ALARMS_MAX


def test_only_the_oracle_passes_the_proactive_scorer():
    items = _items()
    assert len(items) >= 50
    # every instruction comes 3-10 s ahead, with something else happening in between
    assert all(LEAD[0] <= p.due - p.time <= LEAD[1] and any(e < p.due for e in changes) for p, changes, _ in items)
    outcome = {}
    for name, policy in POLICIES.items():
        rows = [F.score_proactive(p, policy(p, changes)) for p, changes, _ in items]
        recall = 100 * sum(r["correct"] for r in rows) / len(rows)
        figures = proactive_figures(rows)
        outcome[name] = (recall, figures)
    passing = [name for name, (recall, figures) in outcome.items() if _passes(figures, recall)]
    assert passing == ["oracle"], {k: (round(r), f["false_alarms"]) for k, (r, f) in outcome.items()}
    assert outcome["oracle"][0] == 100.0 and outcome["oracle"][1]["false_alarms"] == 0.0
    assert outcome["oracle"][1]["delay_s"] == {"p50": 0.0, "p90": 0.0, "max": 0.0}
    assert outcome["at once"][0] == 0.0 and outcome["at once"][1]["false_alarms"] == 100.0
    assert outcome["after every frame"][1]["false_alarms"] == 100.0  # something comes before the event, always
    assert outcome["on the first change"][0] == 0.0
    assert outcome["never"][0] == 0.0 and outcome["never"][1]["precision"] is None
    assert outcome["the wrong shape on time"][1]["false_alarms"] == 100.0
    best_delay = max(outcome[f"after {d} s"][0] for d in range(LEAD[1] + 3))
    assert best_delay < 60.0  # the leads are spread: no fixed delay finds most events


def test_the_synthetic_instructions_score_the_same_read_back_from_streamingbenchs_format(tmp_path):
    files = write_synth(tmp_path, train_videos=1, heldout_videos=6, seed=2, say=None, indist_videos=2)
    probes = F.read_streamingbench(files["compositional/questions_proactive.json"], tmp_path)
    assert probes and all(p.kind == "proactive" and p.due - p.time >= LEAD[0] for p in probes)
    for p in probes:
        assert F.score_proactive(p, [(p.due, f"A {p.expected}!")])["correct"]
        assert not F.score_proactive(p, [(p.time, p.expected)])["correct"]
    by_video: dict = {}
    for p in probes:  # one instruction stands at a time in a session: the next comes after the last window
        by_video.setdefault(p.video, []).append(p)
    for ps in by_video.values():
        assert all(b.time > a.due + F.PROACTIVE_WINDOW for a, b in zip(ps, ps[1:]))


@pytest.mark.parametrize("answers, correct, alarms, extra", [
    ([(7.5, "It is 3 now")], True, 0, {}),
    ([(6.0, "3"), (7.0, "3 again")], True, 0, {"repeats": 1}),  # said again in the window: neither
    ([(8.5, "3")], False, 0, {"late": 1}),  # too late: a miss, not a false alarm
    ([(6.0, "two")], False, 1, {}),  # the wrong thing on time
    ([(5.5, "3")], False, 1, {}),  # before the event: it cannot have seen it
    ([(3.0, "3"), (6.0, "3")], False, 1, {"repeats": 1}),  # the first answer counts: a false alarm, then no recall
    ([], False, 0, {"answered_at": None}),
])
def test_a_proactive_answer_counts_only_from_the_event_to_two_seconds_after_it(answers, correct, alarms, extra):
    p = F.Probe("k", "streamingbench", "Proactive Output", "proactive", None, 2.0, "", "proactive", "3", due=6.0)
    r = F.score_proactive(p, answers)
    assert (r["correct"], r["false_alarms"], r["false_alarm"]) == (correct, alarms, alarms > 0)
    assert {k: r[k] for k in extra} == extra and r["watched_s"] == 6.0


def test_the_proactive_figures_add_up():
    rows = [{"correct": True, "false_alarm": False, "false_alarms": 0, "delay": 0.0, "watched_s": 30.0},
            {"correct": True, "false_alarm": True, "false_alarms": 1, "delay": 2.0, "watched_s": 30.0},
            {"correct": False, "false_alarm": True, "false_alarms": 2, "delay": None, "watched_s": 60.0}]
    f = proactive_figures(rows)
    assert f["false_alarms"] == round(100 * 2 / 3, 2) and f["precision"] == 40.0  # 2 recalls of 5 answers
    assert f["false_alarms_per_min"] == 1.5 and f["delay_s"] == {"p50": 1.0, "p90": 1.8, "max": 2.0}
