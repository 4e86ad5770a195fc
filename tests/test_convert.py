"""Official-layout checkpoints (synthetic: random tensors under the official key names and config
schema) convert to the native layout, load, and compute the same logits; bad ones fail clearly."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model import StreamSession, load_model
from model.checkpoints.convert import PREFIXES, ConvertError, convert, is_official
from model.config import SessionConfig
from model.frames import FramePreprocessor
from tests.conftest import assert_answers

NATIVE_TO_OFFICIAL = [(new, old) for old, new in PREFIXES]


def official_key(native: str) -> str:
    for new, old in sorted(NATIVE_TO_OFFICIAL, key=lambda p: -len(p[0])):
        if native.startswith(new):
            return old + native[len(new):]
    raise AssertionError(native)


def write_official(lm, path, drop: str | None = None, extra: str | None = None, shards: int = 2):
    """The tiny native model written the way DAMO-NLP-SG/VideoLLaMA3-* are: remote-code config, official keys."""
    path.mkdir(parents=True)
    cfg = lm.model.config
    official = {k: v for k, v in cfg.text_config.to_dict().items()
                if k not in ("model_type", "architectures", "rope_parameters", "layer_types")}
    official["rope_theta"] = cfg.text_config.rope_parameters["rope_theta"]  # transformers-4 style, as released
    official.update(model_type="videollama3_qwen2", architectures=["Videollama3Qwen2ForCausalLM"],
                    auto_map={"AutoConfig": "configuration_videollama3.Videollama3Qwen2Config"},
                    vision_encoder_config={**cfg.vision_config.to_dict(), "model_type": "videollama3_vision_encoder"},
                    tie_word_embeddings=cfg.tie_word_embeddings, mm_projector_type="mlp2x_gelu")
    (path / "config.json").write_text(json.dumps(official))
    state = {official_key(k): v.detach().clone().contiguous() for k, v in lm.model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if drop:
        del state[drop]
    if extra:
        state[extra] = torch.zeros(3)
    keys = sorted(state)
    for i in range(shards):
        save_file({k: state[k] for k in keys[i::shards]}, str(path / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    lm.processor.tokenizer.save_pretrained(path)
    (path / "modeling_videollama3.py").write_text("raise SystemExit('remote code must never run')\n")
    return path


def _logits(lm, ids, frame):
    pf = FramePreprocessor(28 * 28 * 12)(frame)
    m = lm.model
    with torch.no_grad():
        text = m(input_ids=torch.tensor([ids])).logits
        vis = m.model.get_video_features(pixel_values_videos=pf.pixel_values, video_grid_thw=torch.tensor([pf.grid_thw]),
                                         video_merge_sizes=torch.tensor([2])).pooler_output[0]
    return text, vis


def test_an_official_checkpoint_converts_loads_and_matches_the_native_model(lm, tmp_path):
    src = write_official(lm, tmp_path / "official")
    assert is_official(src)
    dst = convert(src, tmp_path / "native")
    converted = load_model(str(dst), device="cpu")
    ids = lm.processor.tokenizer("Time 0.0s: what is on the table?")["input_ids"]
    frame = np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8)
    a_text, a_vis = _logits(lm, ids, frame)
    b_text, b_vis = _logits(converted, ids, frame)
    assert torch.equal(a_text, b_text) and torch.equal(a_vis, b_vis)
    tok = converted.processor.tokenizer
    for token in ("<|stream_start|>", "<|stream_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>"):
        assert tok.convert_tokens_to_ids(token) == lm.processor.tokenizer.convert_tokens_to_ids(token)
    assert converted.model.config.video_token_id == lm.model.config.video_token_id
    s = StreamSession(converted, SessionConfig(layout="stream", frame_pixels=28 * 28 * 12))  # stream tokens work
    s.add_frame(frame, 0.0)
    assert 0.0 <= s.respond_probability() <= 1.0


@pytest.mark.parametrize("bad", ["missing", "extra"])
def test_a_missing_or_extra_key_fails_naming_it(lm, tmp_path, bad):
    name = "model.layers.1.mlp.up_proj.weight"
    src = write_official(lm, tmp_path / "official", drop=name if bad == "missing" else None,
                         extra="model.mm_projector.surplus.weight" if bad == "extra" else None)
    with pytest.raises(ConvertError) as info:
        convert(src, tmp_path / "native")
    msg = str(info.value)
    if bad == "missing":
        assert "missing ['model.language_model.layers.1.mlp.up_proj.weight']" in msg and "unused []" in msg
    else:
        assert "unused ['model.mm_projector.surplus.weight']" in msg and "missing []" in msg
    assert not (tmp_path / "native").exists()


def test_load_model_converts_once_and_reuses_the_cache(lm, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VL3LIVE_CACHE", str(tmp_path / "cache"))
    src = write_official(lm, tmp_path / "official")
    with caplog.at_level("INFO", logger="model.checkpoints.convert"):
        first = load_model(str(src), device="cpu")
        converted_once = sum("converting official checkpoint" in r.message for r in caplog.records)
        second = load_model(str(src), device="cpu")
    assert converted_once == 1
    assert sum("converting official checkpoint" in r.message for r in caplog.records) == 1
    assert any("using the converted copy" in r.message for r in caplog.records)
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1
    assert torch.equal(first.model.lm_head.weight, second.model.lm_head.weight)


def test_pickled_weights_are_refused_without_trust(lm, tmp_path):
    src = write_official(lm, tmp_path / "official")
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        from safetensors.torch import load_file

        state.update(load_file(str(f)))
        f.unlink()
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ConvertError, match="pickled .bin"):
        convert(src, tmp_path / "native")
    assert convert(src, tmp_path / "native", trust_pickle=True).is_dir()
    native = tmp_path / "native_bin"
    lm.save_pretrained(native)
    (native / "model.safetensors").unlink()
    torch.save(lm.model.state_dict(), native / "pytorch_model.bin")
    with pytest.raises(ValueError, match="trust-pickle"):
        load_model(str(native), device="cpu")


def test_quantization_on_cpu_is_a_clear_error(lm, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    lm.save_pretrained(tmp_path / "ckpt")
    for quant in ("8bit", "4bit"):
        with pytest.raises(ValueError, match="needs CUDA"):
            load_model(str(tmp_path / "ckpt"), device="cpu", quant=quant)
    r = subprocess.run([sys.executable, "-m", "vl3live", "--set", "model.quant=4bit", "ask", "x.mp4", "q",
                        "--model", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs CUDA" in r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes quantization needs CUDA")
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_loading_on_cuda(lm, tmp_path, quant):
    lm.save_pretrained(tmp_path / "ckpt")
    q = load_model(str(tmp_path / "ckpt"), device="cuda", quant=quant)
    s = StreamSession(q, SessionConfig(frame_pixels=28 * 28 * 12))
    s.add_frame(np.zeros((84, 112, 3), np.uint8), 0.0)
    assert_answers(s, "What is it?", 3)


def test_cli_convert(lm, tmp_path):
    src = write_official(lm, tmp_path / "official")
    r = subprocess.run([sys.executable, "-m", "vl3live", "convert", str(src), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "config.json").is_file() and "load it with --model" in r.stderr
