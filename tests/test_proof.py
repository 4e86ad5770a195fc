"""``vl3live proof``, shortened: the synthetic world, the four stages from random weights, and the
online and offline evaluation on held-out videos (README "The proof").

The shortened run (a quarter of the steps) learns, its losses show it, but it does not yet answer
the held-out videos above chance: these tests check the loop, not the accuracy goals.
"""

import io
import json

from vl3live.proof import (
    FALSE_ALARMS_MAX,
    GOALS,
    ProofConfig,
    goals_met,
    prove,
    recipe_of,
    stage_config,
    table,
)


def _summary(realtime: float, backward: float, proactive: float, alarms: float) -> dict:
    tasks = {"ATR": {"category": "realtime"}, "EPM": {"category": "backward"},
             "Proactive Output": {"category": "proactive", "false_alarms": alarms}}
    return {"items": 10, "tasks": tasks, "overall": None,
            "categories": {"realtime": realtime, "backward": backward, "proactive": proactive}}


def test_the_goals_are_the_issues_and_the_table_says_which_were_met():
    assert GOALS == {"realtime": 90.0, "backward": 80.0, "proactive": 90.0} and FALSE_ALARMS_MAX == 10.0
    assert all(goals_met(_summary(90.0, 80.0, 90.0, 10.0)).values())
    met = goals_met(_summary(95.0, 79.9, 100.0, 12.5))
    assert met == {"realtime": True, "backward": False, "proactive": True, "false_alarms": False}
    text = table(_summary(95.0, 79.9, 100.0, 12.5), None, {"data": 0.5, "stage 1": 1.0, "stage 2": 2.5,
                                                           "eval online": 0.25})
    assert "| backward % | >= 80 | 79.9 | - | no |" in text and "12.5" in text and "1.0 + 2.5 = 3.5" in text
    assert json.dumps(met)  # plain booleans


def test_the_stage_configs_point_at_the_run(tmp_path):
    for n in (1, 2, 3, 4):
        config = stage_config(n, "random-small" if n == 1 else str(tmp_path / f"stage{n - 1}" / "final"), tmp_path, 0.5)
        assert config.train.stage == n and config.train.output_dir == str(tmp_path / f"stage{n}")
        assert all(d.startswith(str(tmp_path / "data")) for d in config.train.data)
    assert stage_config(1, "random-small", tmp_path, 1.0).train.trainable == ["vision", "projector", "llm"]
    assert stage_config(4, "x", tmp_path, 1.0).session.layout == "stream"


def test_a_stage_is_trained_again_when_its_recipe_or_an_earlier_one_changed(tmp_path):
    def recipes(steps: float, stage2_steps: float) -> list[str]:
        one = recipe_of("data", stage_config(1, "random-small", tmp_path, steps))
        two = recipe_of(one, stage_config(2, str(tmp_path / "stage1" / "final"), tmp_path, stage2_steps))
        return [one, two]
    same, other1, other2 = recipes(1.0, 1.0), recipes(0.5, 1.0), recipes(1.0, 0.5)
    assert same == recipes(1.0, 1.0)
    assert other1[0] != same[0] and other1[1] != same[1]  # stage 1 changed: stage 2 too, its own config unchanged
    assert other2[0] == same[0] and other2[1] != same[1]


def test_the_shortened_proof_trains_four_stages_and_evaluates_held_out_videos_online_and_offline(tmp_path):
    said: list[str] = []
    result = prove(ProofConfig(out=str(tmp_path), quick=True), say=said.append, err=io.StringIO())
    online, offline = result["online"], result["offline"]
    assert online["items"] == offline["items"] > 50  # every probe scored, the unparsable ones counted
    assert online["unparsable"] == sum(t.get("unparsable", 0) for t in online["tasks"].values())
    assert {"realtime", "backward", "forward", "proactive"} == set(online["categories"])
    for n in (1, 2, 3, 4):
        assert (tmp_path / f"stage{n}" / "final" / "model.safetensors").exists()
    stages = result["stages"]  # every stage learns from its data
    assert [stages[n]["steps"] for n in (1, 2, 3, 4)] == [62, 62, 38, 95]
    assert all(stages[n]["last_loss"] < 0.5 * stages[n]["first_loss"] for n in (1, 2, 3, 4))
    assert "online (live engine)" in (tmp_path / "proof.md").read_text()
    assert json.loads((tmp_path / "proof.json").read_text())["goals_met"] == result["goals_met"]
    # a rerun trains nothing and scores nothing again, and reports the time the stages took
    said.clear()
    again = prove(ProofConfig(out=str(tmp_path), quick=True, online_only=True), say=said.append, err=io.StringIO())
    assert sum("is done" in m for m in said) == 4 and not any("synthesizing" in m for m in said)
    assert again["online"]["categories"] == online["categories"] and again["minutes"]["stage 2"] > 0.5


def test_bad_proof_options_are_clear_errors(tmp_path):
    import pytest

    for bad in ({"train_videos": 0}, {"heldout_videos": 0}, {"steps": 0.0}):
        with pytest.raises(ValueError, match="--train-videos and --heldout-videos must be >= 1, --steps > 0"):
            ProofConfig(out=str(tmp_path), **bad)
    assert ProofConfig(out=str(tmp_path), quick=True, train_videos=0).train_videos == 48  # --quick sets its own
    assert not (tmp_path / "data").exists()  # nothing was written
