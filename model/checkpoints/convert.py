"""Official VideoLLaMA3 checkpoints (remote-code layout, ``model_type: videollama3_qwen2``) to the
transformers-native layout that ``VideoLlama3ForConditionalGeneration`` loads without remote code.

* weights: ``model.vision_encoder.*`` -> ``model.vision_model.*``, ``model.mm_projector.*`` ->
  ``model.projector.*``, ``model.{embed_tokens,layers,norm}.*`` -> ``model.language_model.*``,
  ``lm_head.*`` as is (absent when the embeddings are tied). Every source tensor must be used
  exactly once and every target filled, with the target's shape; anything else is an error
  listing the keys.
* config: ``vision_encoder_config`` -> ``vision_config``, the Qwen2 fields -> ``text_config``,
  the image / video pad token ids of the tokenizer.
* tokenizer: copied with every added token at its id (``<image>``, ``<|stream_start|>``,
  ``<|stream_end|>`` stay, so the ``stream`` layout works); the processor is transformers'
  native one around it.

Weights are read from safetensors only; pickled ``.bin`` files are refused unless the caller
says it trusts the source (``trust_pickle``), and then read with ``torch.load(weights_only=True)``.
No code from the checkpoint is ever run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)
OFFICIAL_TYPE = "videollama3_qwen2"
PREFIXES = [("model.vision_encoder.", "model.vision_model."), ("model.mm_projector.", "model.projector."),
            ("model.embed_tokens.", "model.language_model.embed_tokens."),
            ("model.layers.", "model.language_model.layers."), ("model.norm.", "model.language_model.norm."),
            ("lm_head.", "lm_head.")]
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
             "rope_theta", "rope_scaling", "use_sliding_window", "sliding_window", "max_window_layers",
             "attention_dropout", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters")
SHARD_BYTES = 4 * 2**30


class ConvertError(ValueError):
    """An official checkpoint that does not map one to one onto the transformers-native layout."""

    pass


def is_official(directory: str | Path) -> bool:
    cfg = Path(directory) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == OFFICIAL_TYPE


def native_key(key: str) -> str:
    for old, new in PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    raise ConvertError(f"unknown weight {key!r}: not under {[p for p, _ in PREFIXES]}")


def native_config(official: dict, tokenizer):
    from transformers import Qwen2Config, VideoLlama3Config, VideoLlama3VisionConfig

    if "vision_encoder_config" not in official:
        raise ConvertError("the official config has no vision_encoder_config")
    fields = {k: official[k] for k in TEXT_KEYS if k in official}
    if "rope_theta" in fields and "rope_parameters" not in fields:  # transformers 4 configs (the official ones)
        fields["rope_parameters"] = {"rope_theta": fields["rope_theta"], "rope_type": "default",
                                     **(fields.get("rope_scaling") or {})}
    text = Qwen2Config(**fields)
    vision = dict(official["vision_encoder_config"])
    vision.pop("model_type", None)
    vision.pop("auto_map", None)
    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    if None in ids or tokenizer.unk_token_id in ids:
        raise ConvertError("the tokenizer lacks <|image_pad|> / <|video_pad|>")
    return VideoLlama3Config(text_config=text.to_dict(), vision_config=VideoLlama3VisionConfig(**vision).to_dict(),
                             image_token_id=ids[0], video_token_id=ids[1],
                             tie_word_embeddings=bool(official.get("tie_word_embeddings", False)))


def _read_weights(src: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("*.safetensors"))
    if files:
        out: dict[str, torch.Tensor] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    if k in out:
                        raise ConvertError(f"{k!r} is in two weight files")
                    out[k] = st.get_tensor(k)
        return out
    pickled = sorted(src.glob("*.bin"))
    if not pickled:
        raise ConvertError(f"no weights (*.safetensors) in {src}")
    if not trust_pickle:
        raise ConvertError(f"{src} has only pickled .bin weights, which can run code when loaded; "
                           "convert them to safetensors, or pass --trust-pickle if you trust the source")
    out = {}
    for f in pickled:
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def native_processor(tokenizer):
    """transformers' native processor around an official checkpoint's tokenizer (every added token kept)."""
    from transformers import VideoLlama3ImageProcessor, VideoLlama3Processor, VideoLlama3VideoProcessor

    from .tiny import CHAT_TEMPLATE

    return VideoLlama3Processor(image_processor=VideoLlama3ImageProcessor(), tokenizer=tokenizer,
                                video_processor=VideoLlama3VideoProcessor(), chat_template=CHAT_TEMPLATE)


def convert(src: str | Path, dst: str | Path, trust_pickle: bool = False) -> Path:
    """Write the native checkpoint of official ``src`` (a local dir) to ``dst``; returns ``dst``."""
    from transformers import AutoTokenizer, VideoLlama3ForConditionalGeneration

    src, dst = Path(src), Path(dst)
    official = json.loads((src / "config.json").read_text())
    if official.get("model_type") != OFFICIAL_TYPE:
        raise ConvertError(f"{src} is not an official VideoLLaMA3 checkpoint (model_type "
                           f"{official.get('model_type')!r}, expected {OFFICIAL_TYPE!r})")
    tokenizer = AutoTokenizer.from_pretrained(str(src))  # never trust_remote_code
    config = native_config(official, tokenizer)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in VideoLlama3ForConditionalGeneration(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    weights = _read_weights(src, trust_pickle)
    mapped: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for k, v in weights.items():
        nk = native_key(k)
        if nk in mapped:
            raise ConvertError(f"{k!r} and {sources[nk]!r} both map to {nk!r}")
        mapped[nk], sources[nk] = v, k
    if config.tie_word_embeddings and "lm_head.weight" in mapped:
        raise ConvertError("lm_head.weight is present but the embeddings are tied (unused source tensor)")
    missing = sorted(set(expected) - set(mapped))
    extra = sorted(sources[k] for k in set(mapped) - set(expected))
    if missing or extra:
        raise ConvertError(f"weights do not match the native model: missing {missing[:20]}"
                           f"{' ...' if len(missing) > 20 else ''}, unused {extra[:20]}{' ...' if len(extra) > 20 else ''}")
    wrong = [f"{sources[k]} {tuple(v.shape)} != {tuple(expected[k])}" for k, v in mapped.items()
             if tuple(v.shape) != tuple(expected[k])]
    if wrong:
        raise ConvertError(f"shape mismatch: {wrong[:20]}")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_shards(mapped, tmp)
    config.save_pretrained(tmp)
    native_processor(tokenizer).save_pretrained(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    log.info("converted %s -> %s (%d tensors)", src, dst, len(mapped))
    return dst


def _save_shards(tensors: dict[str, torch.Tensor], out: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        if size and size + t.numel() * t.element_size() > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += t.numel() * t.element_size()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def cache_dir() -> Path:
    return Path(os.environ.get("VL3LIVE_CACHE", Path.home() / ".cache" / "vl3live")) / "converted"


def converted(src: str | Path, trust_pickle: bool = False) -> Path:
    """The native copy of official ``src``, converted on first use and reused afterwards."""
    src = Path(src).resolve()
    stamp = hashlib.sha256()
    for f in sorted(src.iterdir()):
        if f.is_file():
            stamp.update(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}".encode())
    dst = cache_dir() / f"{src.name}-{stamp.hexdigest()[:16]}"
    if (dst / "config.json").is_file():
        log.info("using the converted copy %s", dst)
        return dst
    log.warning("converting official checkpoint %s to the transformers-native layout in %s (once)", src, dst)
    return convert(src, dst, trust_pickle)
