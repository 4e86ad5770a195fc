"""Training on CPU with the tiny model and synthetic data: the four stages, overfitting, exact
resume, LoRA merge into a checkpoint the live session runs on, bad samples, the data tools."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import StreamSession, load_model
from model.config import SessionConfig
from tests import ws_rig
from tests.conftest import assert_answers
from training.data.convert import stream_from_captions
from training.trainer import module_of, run_train
from vl3live.config import CONFIG_DIR, load_config

STAGES = sorted((CONFIG_DIR / "train").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_ckpt(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    lm.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    ws_rig.write_clip(d / "clip.mp4", seconds=6.0)
    samples = [
        {"video": "clip.mp4", "start_time": 0.0, "end_time": 3.0, "conversation": [
            {"role": "user", "content": "What is moving?", "time": 1.0},
            {"role": "assistant", "content": "A red ball.", "time": 1.0},
            {"role": "assistant", "content": "It stopped.", "time": 2.5}]},
        {"video": "clip.mp4", "start_time": 2.0, "end_time": 5.0, "conversation": [
            {"role": "user", "content": "Where is the ball?", "time": 3.0},
            {"role": "assistant", "content": "On the left.", "time": 3.0}]},
        {"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nDescribe it."},
                                                {"from": "gpt", "value": "A ball rolls."}]},
        {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi there."}]},
    ]
    (d / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return d


def _train(cfg, **kwargs):
    return run_train(cfg.model, cfg.session, cfg.train, **kwargs)


def _config(spec, data_dir, out, stage_yaml=None, **train):
    cfg = load_config(stage_yaml) if stage_yaml else load_config()
    cfg.model.spec = str(spec)
    cfg.session.frame_pixels = 28 * 28 * 12
    cfg.session.layout = "stream"
    t = cfg.train
    t.data, t.output_dir, t.num_workers, t.logging_steps, t.fps = [str(data_dir / "train.jsonl")], str(out), 0, 1, 2.0
    t.bf16, t.warmup_ratio = False, 0.0
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def test_every_stage_yaml_loads_and_says_how_to_run_it():
    assert {p.name for p in STAGES} >= {f"stage{s}_{m}.yaml" for s in (1, 2, 3, 4) for m in ("2b", "7b")}
    for path in STAGES:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Run: ") and "train --config configs/train/" + path.name in first, path
        cfg = load_config(path)
        assert cfg.train.stage in (1, 2, 3, 4) and cfg.train.fps == 1.0 and cfg.train.max_frames == 180
        if cfg.train.deepspeed:
            ds = json.loads((CONFIG_DIR.parent / cfg.train.deepspeed).read_text())
            assert ds["zero_optimization"]["stage"] in (2, 3)
    s1 = load_config(CONFIG_DIR / "train" / "stage1_2b.yaml").train
    assert s1.trainable == ["vision", "projector"] and (s1.lr_projector, s1.lr_vision) == (1e-3, 1e-5)
    s4 = load_config(CONFIG_DIR / "train" / "stage4_2b.yaml")
    assert s4.train.trainable == ["vision", "projector", "llm"] and s4.session.layout == "stream"
    assert (s4.train.lr_llm, s4.train.lr_projector, s4.train.lr_vision) == (1e-5, 1e-5, 2e-6)
    fsdp = json.loads((CONFIG_DIR / "fsdp" / "fsdp.json").read_text())
    assert "Qwen2DecoderLayer" in fsdp["transformer_layer_cls_to_wrap"]


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_each_stage_trains_its_modules_at_their_learning_rates(tiny_ckpt, data, tmp_path, stage):
    yaml = CONFIG_DIR / "train" / f"stage{stage}_2b.yaml"
    cfg = _config(tiny_ckpt, data, tmp_path / "out", yaml, max_steps=3, save_steps=100,
                  lr_vision=1e-3, lr_projector=2e-3, lr_llm=3e-3 if stage > 1 else 0.0)
    before = {n: p.detach().clone() for n, p in load_model(str(tiny_ckpt), device="cpu").model.named_parameters()}
    result = _train(cfg, say=lambda m: None)
    trainer = result["trainer"]
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    expected = {"vision": 1e-3, "projector": 2e-3, "llm": 3e-3}
    assert set(groups) == set(cfg.train.trainable)
    assert all(g["initial_lr"] == expected[name] for name, g in groups.items())
    after = dict(trainer.model.named_parameters())
    changed = {module_of(n) for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    assert changed == set(cfg.train.trainable)  # frozen modules unchanged, every trainable one moved
    assert result["steps"] == 3 and result["skipped_samples"] == 0


def test_freeze_embeddings_keeps_the_input_embeddings_while_the_llm_trains(tiny_ckpt, data, tmp_path):
    cfg = _config(tiny_ckpt, data, tmp_path / "out", max_steps=2, save_steps=100, lr_llm=3e-3, freeze_embeddings=True)
    before = {n: p.detach().clone() for n, p in load_model(str(tiny_ckpt), device="cpu").model.named_parameters()}
    trainer = _train(cfg, say=lambda m: None)["trainer"]
    embeddings = "model.language_model.embed_tokens.weight"
    after = dict(trainer.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    assert embeddings not in changed and "lm_head.weight" in changed
    assert {module_of(n) for n in changed} == {"vision", "projector", "llm"}
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(after[embeddings]) not in optimized  # no AdamW state for them either


def test_overfitting_a_handful_of_samples_drives_the_loss_down(tiny_ckpt, data, tmp_path):
    cfg = _config(tiny_ckpt, data, tmp_path / "out", max_steps=80, save_steps=1000, lr_llm=1e-2, lr_projector=3e-3,
                  lr_vision=1e-3, gradient_checkpointing=False)
    losses = _train(cfg, say=lambda m: None)["losses"]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first / 5, (first, last)


def test_resume_continues_exactly(tiny_ckpt, data, tmp_path):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):  # the run dies right after step 3 (and its checkpoint)
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    common = dict(max_steps=6, save_steps=3, lr_llm=1e-3, lr_projector=1e-3, lr_vision=1e-4)
    full = _train(_config(tiny_ckpt, data, tmp_path / "a", **common), say=lambda m: None)["losses"]
    cfg = _config(tiny_ckpt, data, tmp_path / "b", **common)
    first = _train(cfg, say=lambda m: None, callbacks=[Crash()])["losses"]
    assert (tmp_path / "b" / "checkpoint-3").is_dir() and not list((tmp_path / "b").glob(".staging-*"))
    resumed = _train(cfg, resume=True, say=lambda m: None)["losses"]
    assert first == pytest.approx(full[:3], rel=1e-6)
    assert resumed[-3:] == pytest.approx(full[3:], rel=1e-5)  # step 4 onwards: as if never interrupted


def test_lora_train_merge_load_and_run_a_session(tiny_ckpt, data, tmp_path):
    cfg = _config(tiny_ckpt, data, tmp_path / "out", max_steps=3, save_steps=100, lora=True, lora_r=4, lora_alpha=8,
                  lr_llm=1e-2)
    result = _train(cfg, say=lambda m: None)
    adapter = Path(result["output"])
    assert (adapter / "adapter_config.json").is_file()
    merged = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "vl3live", "train", "merge-lora", str(adapter), str(merged)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lm2 = load_model(str(merged), device="cpu")
    base = load_model(str(tiny_ckpt), device="cpu")
    name = next(n for n, _ in lm2.model.named_parameters() if "q_proj.weight" in n and "language_model" in n)
    assert not torch.equal(dict(lm2.model.named_parameters())[name], dict(base.model.named_parameters())[name])
    s = StreamSession(lm2, SessionConfig(frame_pixels=28 * 28 * 12))
    s.add_frame(ws_rig.frames(1)[0], 0.0)
    assert_answers(s, "What is it?", 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
def test_qlora_trains_on_cuda(tiny_ckpt, data, tmp_path):
    cfg = _config(tiny_ckpt, data, tmp_path / "out", max_steps=2, save_steps=100, lora=True, quant="4bit", bf16=True)
    assert _train(cfg, say=lambda m: None)["steps"] == 2


def test_qlora_without_cuda_is_a_clear_error(tiny_ckpt, data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="needs CUDA"):
        _train(_config(tiny_ckpt, data, tmp_path / "out", lora=True, quant="4bit"), say=lambda m: None)


def test_bad_samples_are_skipped_and_counted_or_stop_the_run(tiny_ckpt, data, tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"\0" * 64)
    good = (data / "train.jsonl").read_text().splitlines()[0].replace('"clip.mp4"', json.dumps(str(data / "clip.mp4")))
    lines = [good, good.replace(str(data / "clip.mp4"), str(tmp_path / "missing.mp4")),
             good.replace(str(data / "clip.mp4"), str(tmp_path / "corrupt.mp4")), "{bad json"]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _config(tiny_ckpt, data, tmp_path / "out", max_steps=4, save_steps=100, batch_size=2)
    cfg.train.data = [str(tmp_path / "mixed.jsonl")]
    result = _train(cfg, say=lambda m: None)
    assert result["steps"] == 4 and result["skipped_samples"] >= 3  # missing, corrupt, bad JSON (each epoch)
    cfg.train.skip_bad_samples = False
    with pytest.raises(ValueError, match="mixed.jsonl:4"):
        _train(cfg, say=lambda m: None)


def test_data_tools_convert_captions_and_check_a_dataset(data, tmp_path):
    captions = {"timestamps": [[0.0, 1.5], [2.0, 4.5], [4.0, 5.5]], "sentences": ["A ball appears.", "It rolls.",
                                                                                 "It stops."],
                "qa": [{"time": 3.0, "question": "What colour is it?", "answer": "Red."}]}
    (tmp_path / "caps.json").write_text(json.dumps(captions))
    samples = stream_from_captions(data / "clip.mp4", tmp_path / "caps.json", clip_seconds=3.0)
    assert [(s["start_time"], s["end_time"]) for s in samples] == [(0.0, 3.0), (3.0, 6.0)]
    assert [m["content"] for m in samples[1]["conversation"]] == ["What colour is it?", "Red.", "It rolls.",
                                                                  "It stops."]
    out = tmp_path / "stream.jsonl"
    r = subprocess.run([sys.executable, "-m", "vl3live", "--set", "train.clip_seconds=3", "data",
                        "stream-from-captions", str(data / "clip.mp4"), str(tmp_path / "caps.json"), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with out.open("a") as f:
        f.write(json.dumps({"video": "nope.mp4", "start_time": 0, "end_time": 2, "conversation": [
            {"role": "user", "content": "?", "time": 1}, {"role": "assistant", "content": "!", "time": 1}]}) + "\n")
    r = subprocess.run([sys.executable, "-m", "vl3live", "--set", "session.frame_pixels=9408", "--set",
                        "session.layout=stream", "--set", "train.fps=2", "data", "check", str(out), "--model", "tiny"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "2 good samples, 1 bad" in r.stderr
    assert "stream.jsonl:3" in r.stdout and "file not found" in r.stdout


def test_a_dataset_where_every_sample_is_bad_stops_with_an_error_and_no_model(tiny_ckpt, data, tmp_path):
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"video": f"missing{i}.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "That."}]}) + "\n" for i in range(3)))
    cfg = _config(tiny_ckpt, data, tmp_path / "out", max_steps=2, save_steps=100)
    cfg.train.data = [str(tmp_path / "bad.jsonl")]
    with pytest.raises(ValueError, match="none of the first 3 samples can be used.*missing0.mp4"):
        _train(cfg, say=lambda m: None)
    assert not (tmp_path / "out" / "final").exists()
    r = subprocess.run([sys.executable, "-m", "vl3live", "train", f"data=[{tmp_path / 'bad.jsonl'}]",
                        "model.spec=tiny", f"output_dir={tmp_path / 'cli'}", "max_steps=2", "num_workers=0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "nothing would be trained" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cli" / "final").exists()


def test_the_logged_loss_is_per_token_under_accumulation_and_the_rates_are_the_ones_used(tiny_ckpt, data, tmp_path):
    three = tmp_path / "three.jsonl"
    three.write_text("".join((data / "train.jsonl").read_text().splitlines(keepends=True)[:3])
                     .replace('"clip.mp4"', json.dumps(str(data / "clip.mp4"))))
    losses = {}
    for name, batch, accum in (("batch", 3, 1), ("accum", 1, 3)):
        cfg = _config(tiny_ckpt, data, tmp_path / name, max_steps=2, save_steps=100, batch_size=batch,
                      grad_accum=accum, lr_llm=1e-3, lr_projector=2e-3, lr_vision=4e-4)
        cfg.train.data = [str(three)]
        result = _train(cfg, say=lambda m: None)
        losses[name] = result["losses"]
        logged = [h for h in result["trainer"].state.log_history if "loss" in h]
        # cosine without warmup over 2 steps: step 1 trains at the base rates, step 2 at half of them
        rates = [r for h in logged for r in (h["lr_llm"], h["lr_projector"], h["lr_vision"])]
        assert rates == pytest.approx([1e-3, 2e-3, 4e-4, 5e-4, 1e-3, 2e-4]) and "learning_rate" not in logged[0]
    # the same three samples in one batch or accumulated over three: the same mean loss per token
    assert losses["accum"][0] == pytest.approx(losses["batch"][0], rel=1e-4)


def test_the_readme_training_example_checks_and_the_cpu_recipe_trains(tmp_path):
    from training.data.example import SAMPLES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"\*\*Training data\*\*.*?```jsonl?\n(.*?)```", readme, re.S).group(1)
    assert [json.loads(line) for line in block.splitlines() if line.strip()] == SAMPLES  # the README as written
    cli = [sys.executable, "-m", "vl3live"]
    r = subprocess.run([*cli, "data", "example", "data/example"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "data", "check", "data/example/train.jsonl", "--model", "tiny"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)  # the default config: layout video-turn
    assert r.returncode == 0 and "5 good samples, 0 bad (token layouts: 1 stream, 4 video-turn)" in r.stderr, \
        r.stderr + r.stdout
    recipe = CONFIG_DIR / "train" / "tiny_cpu.yaml"
    r = subprocess.run([*cli, "train", "--config", str(recipe), "max_steps=2"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["steps"] == 2 and len(out["losses"]) == 2 and all(0 < loss < 20 for loss in out["losses"])
    assert "'lr_llm'" in r.stderr and (tmp_path / "runs" / "tiny_cpu" / "final" / "config.json").is_file()


def test_the_loss_on_labelled_positions_only_is_the_models_own_loss(lm, data):
    """``stream_loss`` runs the LM head only where a label is; it must equal the model's loss over all
    positions, value and gradient (a batch of two, padded, with frames and a text-only sample)."""
    from training.config import TrainConfig
    from training.data.dataset import Collator, StreamDataset
    from training.trainer import stream_loss

    session = SessionConfig(layout="stream", frame_pixels=28 * 28 * 12)
    ds = StreamDataset(lm.processor, session, TrainConfig(data=[str(data / "train.jsonl")], fps=2.0))
    batch = Collator(0)([ds[0], ds[3]])
    model = lm.model
    ours = stream_loss(model, dict(batch), model.config.video_token_id)
    ours.backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    from model.frames import MERGE

    grid = batch["grid_thw"]
    feats = model.model.get_video_features(pixel_values_videos=batch["pixel_values"], video_grid_thw=grid,
                                           video_merge_sizes=torch.full((len(grid),), MERGE))
    vis = torch.cat(list(feats.pooler_output))[batch["keep"]]
    embeds = embeds.masked_scatter((ids == model.config.video_token_id).unsqueeze(-1), vis)
    theirs = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    theirs.backward()
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5) and float(ours) > 0
    assert torch.allclose(grad, model.lm_head.weight.grad, atol=1e-7)
    model.zero_grad()


def test_group_by_length_batches_short_samples_with_short_ones(tiny_ckpt, tmp_path):
    long_text = "Tell me everything about the scene in front of the camera, in detail. " * 6
    samples = [{"conversations": [{"from": "human", "value": long_text if i % 2 else f"Say hi {i}."},
                                  {"from": "gpt", "value": "Hi."}]} for i in range(64)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    runs = {}
    for grouped in (False, True):
        cfg = _config(tiny_ckpt, tmp_path, tmp_path / f"out{grouped}", max_steps=4, batch_size=4, save_steps=100,
                      lr_llm=1e-3, group_by_length=grouped)
        result = _train(cfg, say=lambda m: None)
        trainer = result["trainer"]
        dataset = trainer.train_dataset
        rendered = [len(dataset[i].input_ids) for i in range(len(dataset))]
        assert all(abs(e - r) <= 32 + 20 for e, r in zip(dataset.lengths(bucket=1), rendered))  # the estimate
        order = list(trainer._get_train_sampler())
        assert sorted(order) == list(range(64))  # every sample once per epoch
        batches = [order[i:i + 4] for i in range(0, 64, 4)]
        runs[grouped] = sum(max(rendered[i] for i in b) * 4 - sum(rendered[i] for i in b) for b in batches)
        assert result["steps"] == 4
    # grouped (sorted within runs of 4 batches): at most one mixed batch in 4; random order pads short to long often
    assert runs[True] * 3 < runs[False], runs
