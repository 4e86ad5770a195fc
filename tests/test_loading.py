import pytest
import torch
from transformers import VideoLlama3ForConditionalGeneration, VideoLlama3Processor

from model import load_model
from model.checkpoints.loading import choose_attention


def test_tiny_model_shape_and_parts(lm):
    cfg = lm.model.config
    assert isinstance(lm.model, VideoLlama3ForConditionalGeneration)
    assert isinstance(lm.processor, VideoLlama3Processor)
    assert lm.tokenizer is lm.processor.tokenizer
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers) == (64, 2)
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.vision_config.patch_size) == (32, 2, 14)
    assert lm.attn == "sdpa"
    tok = lm.tokenizer
    # real Qwen2 BPE: "hello world" is two tokens, and the VideoLLaMA3 special tokens exist
    assert tok("hello world", add_special_tokens=False).input_ids == [14990, 1879]
    assert tok.convert_tokens_to_ids(["<|video_pad|>", "<|image_pad|>"]) == [151656, 151655]
    assert len(set(tok.convert_tokens_to_ids(["<|stream_start|>", "<|stream_end|>"]))) == 2
    assert lm.processor.chat_template


def test_tiny_is_deterministic_given_seed():
    a = load_model("tiny", seed=3).model.state_dict()
    b = load_model("tiny", seed=3).model.state_dict()
    c = load_model("tiny", seed=4).model.state_dict()
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[key], b[key])
    assert not torch.equal(a[key], c[key])


def test_save_pretrained_round_trip(lm, tmp_path):
    lm.save_pretrained(tmp_path)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    back = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert isinstance(back.processor, VideoLlama3Processor)
    ids = torch.tensor([[151644, 872, 198, 14990, 1879, 151645]])
    with torch.no_grad():
        a = lm.model(input_ids=ids).logits
        b = back.model(input_ids=ids).logits
    assert torch.equal(a, b)
    for tok in ("<|stream_start|>", "<|stream_end|>", "<|video_pad|>"):
        assert back.tokenizer.convert_tokens_to_ids(tok) == lm.tokenizer.convert_tokens_to_ids(tok)
    assert back.processor.chat_template == lm.processor.chat_template


def test_missing_checkpoint_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope"))


def test_attention_choice_on_cpu():
    assert choose_attention(torch.device("cpu")) == "sdpa"
    assert choose_attention(torch.device("cpu"), "eager") == "eager"
    with pytest.raises(ValueError, match="flash-attn"):
        choose_attention(torch.device("cpu"), "flash_attention_2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_on_gpu_bf16():
    g = load_model("tiny", device="cuda")
    assert g.dtype == torch.bfloat16 and g.model.device.type == "cuda"
