"""``vl3live eval`` on the benchmarks' own formats, and ``vl3live data synth``'s world.

The fixtures follow OVO-Bench's ``data/ovo_bench_new.json`` and StreamingBench's
``src/data/questions_real.json`` / ``questions_proactive.json`` field for field (the records below
are shaped as the first record of each task there, with our own values), with real H.264 videos at
the paths they name. Runs use the tiny random-weight model: what is checked is the protocol (what
is asked when, in which session, how it is scored and resumed), not the accuracy.
"""

import dataclasses
import json

import numpy as np
import pytest

from model.video import write_video_file
from tests.conftest import scene_frames
from training.synth import (
    BACKGROUND,
    CELL,
    COLORS,
    CONTRAST,
    OBJECT_IMAGES_PER_VIDEO,
    RADIUS,
    SHAPES,
    SIZE,
    STREAM_SAMPLES_PER_VIDEO,
    TOKEN,
    h264,
    heldout_cell,
    make_world,
    object_world,
    write_synth,
)
from vl3live.config import load_config
from vl3live.evaluation import EvalConfig, evaluate, run_identity
from vl3live.evaluation import formats as F
from vl3live.evaluation.report import Results, markdown, summarize

OVO = [
    {"id": 0, "task": "EPM", "video": "Ego4D/clips/a.mp4", "realtime": 4, "question": "Who did I talk to?",
     "answer": "a person with blue shirt", "options": ["a person with brown shirt", "a person with green shirt",
                                                       "a person with blue shirt", "a person with white shirt"],
     "gt": 2},
    {"id": 1, "task": "ATR", "video": "Ego4D/clips/a.mp4", "realtime": 6.5, "question": "What color is the dog?",
     "answer": "Black.", "options": ["White.", "Black.", "Pink.", "Brown."], "gt": 1},
    {"id": 2, "task": "CRR", "video": "Ego4D/clips/a.mp4", "question": "What does she do to the car?",
     "answer": "She walks past the car.", "ask_time": 2, "clue_time": 5,
     "test_info": [{"realtime": 2, "type": 0}, {"realtime": 6, "type": 1}]},
    {"id": 3, "task": "SSR", "video": "COIN/b.mp4", "tutorial": "PutOnHairExtensions",
     "all_steps": ["pull up the hair", "put on the hair extensions"], "start_time": [1, 4], "end_time": [3, 7],
     "test_info": [{"realtime": 2, "step": "pull up the hair", "type": 1},
                   {"realtime": 2.5, "step": "put on the hair extensions", "type": 0}]},
    {"id": 4, "task": "REC", "video": "COIN/b.mp4", "activity": "breaking something", "start_times": [1],
     "end_times": [3], "test_info": [{"realtime": 3, "count": 1}, {"realtime": 7.0, "count": 1}]},
]
SB_REAL = [{"time": "[0:00:00 - 0:00:10]", "questions": [
    {"task_type": "Clips Summarize", "question": "What did the individual just do?", "time_stamp": "00:00:05",
     "answer": "C", "options": ["A. Sat down.", "B. Left.", "C. Stacked buns.", "D. Checked stock."],
     "required_ability": "episodic memory"}], "video_categories": "preparation_of_meals",
    "video_path": "./videos/sample_1_real.mp4"}]
SB_PROACTIVE = [{"time": "[0:00:00 - 0:00:10]", "questions": [
    {"task_type": "Proactive Output", "question": "When the scoreboard shows 3 points for USA, output \"3\".",
     "time_stamp": "00:00:02", "ground_truth_time_stamp": "00:00:06", "ground_truth_output": "3",
     "required_ability": "working memory"}], "video_categories": "basketball",
    "video_path": "./videos/sample_2_proactive.mp4"}]


@pytest.fixture
def bench(tmp_path):
    for rel in ("Ego4D/clips/a.mp4", "COIN/b.mp4", "videos/sample_1_real.mp4", "videos/sample_2_proactive.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video_file(tmp_path / rel, scene_frames(16, 84, 112), 2)
    (tmp_path / "ovo_bench_new.json").write_text(json.dumps(OVO))
    (tmp_path / "questions_real.json").write_text(json.dumps(SB_REAL))
    (tmp_path / "questions_proactive.json").write_text(json.dumps(SB_PROACTIVE))
    return tmp_path


def test_ovo_bench_records_become_its_own_prompts_at_its_times(bench):
    probes = {p.key: p for p in F.read_ovo(bench / "ovo_bench_new.json", bench)}
    assert sorted(probes) == ["ovo:0", "ovo:1", "ovo:2:0", "ovo:2:1", "ovo:3:0", "ovo:3:1", "ovo:4:0", "ovo:4:1"]
    epm = probes["ovo:0"]
    assert (epm.category, epm.time, epm.kind, epm.expected) == ("backward", 4.0, "choice", "C")
    assert epm.prompt == F.OVO_BR_PROMPT.format(
        "Who did I talk to?", "A. a person with brown shirt; B. a person with green shirt; "
                              "C. a person with blue shirt; D. a person with white shirt;")
    assert probes["ovo:1"].category == "realtime" and probes["ovo:1"].time == 6.5
    assert [(probes[k].time, probes[k].expected) for k in ("ovo:2:0", "ovo:2:1")] == [(2.0, "No"), (6.0, "Yes")]
    assert probes["ovo:2:0"].prompt == F.OVO_CRR_PROMPT.format("What does she do to the car?")
    assert probes["ovo:3:1"].prompt == F.OVO_SSR_PROMPT.format("put on the hair extensions")
    assert probes["ovo:4:1"].prompt == F.OVO_REC_PROMPT.format("How many times did they breaking something?")
    assert (probes["ovo:4:1"].kind, probes["ovo:4:1"].expected, probes["ovo:4:1"].category) == ("count", 1, "forward")
    assert probes["ovo:0"].video == bench / "Ego4D/clips/a.mp4"
    jobs = F.jobs(list(probes.values()))
    assert [len(j.probes) for j in jobs] == [4, 4]
    assert all([p.time for p in j.probes] == sorted(p.time for p in j.probes) for j in jobs)


def test_streamingbench_questions_and_proactive_items(bench):
    real = F.read_streamingbench(bench / "questions_real.json", bench)
    (q,) = real
    assert (q.time, q.expected, q.kind, q.category) == (5.0, "C", "choice", "realtime")
    assert q.prompt.startswith("You are an advanced video question-answering AI assistant.")
    assert "A. Sat down.\nB. Left.\nC. Stacked buns.\nD. Checked stock." in q.prompt
    assert q.prompt.endswith("\n\nThe best option is:") and q.video == bench / "videos/sample_1_real.mp4"
    (p,) = F.read_streamingbench(bench / "questions_proactive.json", bench)
    assert (p.time, p.due, p.expected, p.kind) == (2.0, 6.0, "3", "proactive")
    assert F.seconds("01:02:03") == 3723.0


def test_answers_are_parsed_and_the_unparsable_counted():
    assert F.parse("choice", "B") == "B" and F.parse("choice", " (C) the dog") == "C"
    assert F.parse("choice", "Another answer") is None and F.parse("choice", "") is None
    assert F.parse("yesno", "Yes.") == "Yes" and F.parse("yesno", "no, not yet") == "No"
    assert F.parse("yesno", "maybe") is None
    assert F.parse("count", "3 times") == 3 and F.parse("count", "none") is None


def test_the_summary_averages_tasks_within_categories():
    rows = [{"key": str(i), "task": t, "category": c, "correct": ok, "unparsable": un, "ttft_ms": 10.0}
            for i, (t, c, ok, un) in enumerate([("ATR", "realtime", True, False), ("ATR", "realtime", False, True),
                                                ("OJR", "realtime", True, False), ("EPM", "backward", False, False)])]
    rows.append({"key": "p", "task": "Proactive Output", "category": "proactive", "correct": True,
                 "false_alarm": False, "delay": 0.5})
    s = summarize(rows)
    assert s["tasks"]["ATR"]["accuracy"] == 50.0 and s["categories"]["realtime"] == 75.0  # mean of 50 and 100
    assert s["categories"]["backward"] == 0.0 and s["categories"]["proactive"] == 100.0
    assert s["overall"] == round((75.0 + 0.0 + 100.0) / 3, 2) and s["unparsable"] == 1
    assert "| ATR | realtime | 2 | 50.0 | 1 |" in markdown(s, "online")


def test_online_run_asks_every_probe_in_one_session_per_video_and_resumes(bench):
    config = load_config(overrides=["model.spec=tiny", "session.frame_pixels=9408"])
    cfg = EvalConfig(ovo=[str(bench / "ovo_bench_new.json")],
                     streamingbench=[str(bench / "questions_real.json"), str(bench / "questions_proactive.json")],
                     videos=str(bench), out=str(bench / "run"), fps=2.0, parallel=2, max_new_tokens=3)
    summary = evaluate(cfg, config)
    assert summary["items"] == 10
    rows = Results(bench / "run" / "results_online.jsonl").rows
    expected = [p.key for p in F.read_ovo(bench / "ovo_bench_new.json", bench)] + \
        ["streamingbench:questions_real:0:0", "streamingbench:questions_proactive:0:0"]
    assert sorted(r["key"] for r in rows) == sorted(expected)
    answered = [r for r in rows if r["kind"] != "proactive"]
    assert all(r["answer"] is not None and r["ttft_ms"] > 0 and r["cache_len"] > 0 for r in answered)
    # questions later in a video see more of it: the cache only grows within one session
    a = sorted((r for r in answered if r["video"].endswith("a.mp4")), key=lambda r: r["time"])
    assert [r["cache_len"] for r in a] == sorted(r["cache_len"] for r in a) and a[0]["cache_len"] < a[-1]["cache_len"]
    assert json.loads((bench / "run" / "summary_online.json").read_text()) == summary
    # a killed run: half its lines, the last one cut short; the rerun scores only what is missing
    path = bench / "run" / "results_online.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    again = evaluate(cfg, config)
    keys = [r["key"] for r in Results(path).rows]
    assert len(keys) == len(set(keys)) == 10 and again["items"] == 10
    assert evaluate(cfg, config)["items"] == 10 and len(Results(path).rows) == 10  # nothing left to do
    # another model or other settings into the same folder: refused, not mixed in with these results
    before = path.read_text()
    for other, what in ((dataclasses.replace(cfg, model="random-small"), "model"), (dataclasses.replace(cfg, fps=1.0), "fps")):
        with pytest.raises(ValueError, match=f"holds online results of another run \\({what} differ"):
            evaluate(other, config)
    assert path.read_text() == before


def test_a_checkpoint_retrained_in_place_is_another_run(tmp_path):
    config = load_config(overrides=[f"model.spec={tmp_path}"])
    cfg = EvalConfig(ovo=["x"])
    (tmp_path / "model.safetensors").write_bytes(b"0" * 10)
    first = run_identity(cfg, config)
    (tmp_path / "model.safetensors").write_bytes(b"1" * 11)
    assert run_identity(cfg, config)["weights"] != first["weights"] and first["model"] == str(tmp_path)


def test_offline_run_answers_each_question_afresh(bench):
    config = load_config(overrides=["model.spec=tiny", "session.frame_pixels=9408"])
    cfg = EvalConfig(streamingbench=[str(bench / "questions_real.json"), str(bench / "questions_proactive.json")],
                     videos=str(bench), out=str(bench / "off"), protocol="offline", fps=2.0, context=3.0,
                     max_new_tokens=3)
    summary = evaluate(cfg, config)
    rows = {r["category"]: r for r in Results(bench / "off" / "results_offline.jsonl").rows}
    assert summary["items"] == 2 and rows["realtime"]["frames"] == 7  # pts 2.0 .. 5.0 at 2 fps: StreamingBench's window
    assert rows["proactive"]["calls"] >= 1 and rows["realtime"]["ttft_ms"] > 0


def test_missing_videos_and_bad_options_are_clear_errors(bench, tmp_path):
    with pytest.raises(ValueError, match="--ovo"):
        EvalConfig()
    with pytest.raises(ValueError, match="protocol"):
        EvalConfig(ovo=["x"], protocol="sideways")
    cfg = EvalConfig(ovo=[str(bench / "ovo_bench_new.json")], videos=str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="2 video"):
        evaluate(cfg, load_config(overrides=["model.spec=tiny"]))


def test_the_synthetic_world_holds_out_its_pairs_and_writes_every_format(lm, tmp_path):
    for seed in range(40):  # a held-out video shows every shape where no training video shows it in that colour
        held, train = make_world("h", seed, heldout=True), make_world("t", seed)
        assert all(heldout_cell(k.shape, k.color) == k.cell for k in held.tracks)
        assert all(heldout_cell(k.shape, c) != k.cell for k in train.tracks for c in (k.color, k.new_color) if c)
        for world in (held, train):  # one shape a cell, and its pixels are its colour (below the centre:
            assert len({k.cell for k in world.tracks}) == len(world.tracks)  # a ring's centre is a hole)
            k = world.tracks[0]
            t = k.t_in + 0.5
            y, x = (round(v) for v in (k.centre(t)[0] + 0.75 * RADIUS, k.centre(t)[1]))
            assert abs(world.frame(t, np.random.default_rng(0))[y, x].astype(int) - COLORS[k.color_at(t)]).max() < 30
        alone = object_world("o", seed)  # stage 1's pictures: one shape, never in its held-out cell
        (k,) = alone.tracks
        assert heldout_cell(k.shape, k.color) != k.cell and (k.cell // 2, k.cell % 2) == tuple(
            int(v // CELL) for v in k.centre(0.0))
        for world in (held, train, alone):  # every shape on a token's centre, spanning 3 x 3 tokens
            for k in world.tracks:
                assert all(abs(v % TOKEN - TOKEN / 2) <= 1.0 for v in k.centre(k.t_in))
                assert TOKEN < RADIUS < CELL / 2  # past the middle of the outer tokens, inside the cell
    # every colour stands out from the background alike
    assert all(abs(np.linalg.norm(np.subtract(c, BACKGROUND)) - CONTRAST) < 1.0 for c in COLORS.values())
    with pytest.raises(ValueError, match="at least one video of each kind"):
        write_synth(tmp_path / "none", train_videos=2, heldout_videos=2, seed=1, say=None, indist_videos=0)
    assert not (tmp_path / "none").exists()  # refused before anything is written
    files = write_synth(tmp_path, train_videos=2, heldout_videos=2, seed=1, say=None)
    pictures = [json.loads(line) for line in files["stage1"].read_text().splitlines()]
    assert len(pictures) == 2 * OBJECT_IMAGES_PER_VIDEO and all((tmp_path / s["image"]).is_file() for s in pictures)
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / pictures[0]["image"]))
    rendered = [object_world("o", seed).frames()[0] for seed in range(3)]  # the round trip stage 1-2's pictures take
    decoded = h264(rendered, tmp_path / "scratch.mp4")
    assert not (tmp_path / "scratch.mp4").exists() and len(decoded) == 3
    errors = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(rendered, decoded)]
    assert all(0.5 < e < 8.0 for e in errors)  # changed by the codec, as the videos' frames are, and close
    assert first.shape == (*SIZE, 3)
    assert {"compositional/questions_proactive.json", "in_distribution/ovo_bench_new.json"} <= set(files)
    indist = F.read_ovo(files["in_distribution/ovo_bench_new.json"], tmp_path)
    assert indist and all("indist" in p.video.name and p.video.is_file() for p in indist)
    assert {tuple(s["conversations"][1]["value"].split()) for s in pictures} <= {(c, k) for c in COLORS for k in SHAPES}
    ovo = F.read_ovo(files["compositional/ovo_bench_new.json"], tmp_path)
    sb = F.read_streamingbench(files["compositional/questions_real.json"], tmp_path)
    pro = F.read_streamingbench(files["compositional/questions_proactive.json"], tmp_path)
    assert {p.category for p in ovo} >= {"realtime", "backward", "forward"} and sb and pro
    assert all(p.video.is_file() and "heldout" in p.video.name for p in ovo + sb + pro)
    # every file's probes of a video share a session, and the files never share one: each benchmark alone
    sessions = F.jobs(ovo + sb + pro)
    assert all(len({p.source for p in j.probes}) == 1 for j in sessions)
    assert len(sessions) == len({(p.source, p.video) for p in ovo + sb + pro}) > len({p.video for p in ovo + sb + pro})
    for p in ovo:  # the answers are the ground truth's
        if p.task == "ATR":
            world = make_world(p.video.stem, 1 * 100003 + int(p.video.stem.split("_")[1]), heldout=True)
            shape = p.question.split()[-1].rstrip("?")
            (track,) = [k for k in world.tracks if k.shape == shape]
            record = next(r for r in json.loads(files["compositional/ovo_bench_new.json"].read_text())
                          if f"ovo:{r['id']}" == p.key)
            assert record["answer"] == track.color_at(p.time)
    from training.data.check import check_dataset

    config = load_config(overrides=["session.frame_pixels=28224"])
    good, errors = check_dataset([str(files[f"stage{i}"]) for i in (1, 2, 3, 4)], config.session, config.train,
                                 lm.processor)  # every stage's samples render as training renders them
    assert errors == [] and set(good) == {"video-turn", "stream"} and good["stream"] == 2 * STREAM_SAMPLES_PER_VIDEO


def test_the_synthetic_training_prompts_are_ovo_benchs_own():
    """training/ cannot import the commands' formats, so the prompt is written there too: the two must agree."""
    from training.synth import mc_prompt

    record = {"question": "What is the color of the square?", "options": ["red", "blue", "green", "yellow"]}
    assert mc_prompt(record["question"], record["options"]) == F.ovo_prompt("ATR", record)
    from training.synth import rec_prompt, sb_prompt

    assert rec_prompt("appear") == F.ovo_prompt("REC", {"activity": "appear"})
    options = ["A. red", "B. blue", "C. green", "D. yellow"]
    assert sb_prompt(record["question"], options) == F.sb_prompt(record["question"], options)


def test_a_standing_instruction_is_acknowledged_before_the_next_frame_comes(lm, bench):
    import asyncio

    from streamer.engine import Engine
    from vl3live.evaluation.online import _Stream

    config = load_config(overrides=["model.spec=tiny", "session.layout=stream", "session.frame_pixels=9408"])
    probe = F.read_streamingbench(bench / "questions_proactive.json", bench)[0]
    rgb = scene_frames(1, 84, 112)[0]

    async def go():
        async with Engine(lm, config.engine, config.session, 1) as engine:
            session = await engine.open_session()
            s = _Stream(engine, session, lambda row: None, max_new_tokens=3)
            await s.frame(0.5, rgb)
            await s.ask(probe)
            acked = [d for d in s.done.values() if not d.proactive]  # before any later frame is pushed
            await s.frame(1.0, rgb)
            s.sub.close()
            return acked

    acked = asyncio.run(go())
    assert len(acked) == 1 and acked[0].t == 0.5  # answered in the stream after the 0.5 s frame, not the 1 s one
