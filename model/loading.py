"""``load_model``: the tiny built-in model, a local checkpoint directory, or a hub id."""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoProcessor, VideoLlama3ForConditionalGeneration, VideoLlama3Processor

from . import tiny

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A VideoLLaMA3 model with its processor and tokenizer, ready on one device."""

    model: VideoLlama3ForConditionalGeneration
    processor: VideoLlama3Processor
    tokenizer: object
    spec: str
    device: torch.device
    dtype: torch.dtype
    attn: str

    def save_pretrained(self, path: str | Path) -> None:
        """Write a checkpoint directory that ``load_model(path)`` reads back."""
        self.model.save_pretrained(str(path))
        self.processor.save_pretrained(str(path))


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@functools.cache
def flash_attn_importable() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
        return True
    except Exception as exc:  # a broken build must not stop the model from loading
        log.warning("flash-attn is installed but does not import (%s)", exc)
        return False


def choose_attention(device: torch.device, requested: str | None = None) -> str:
    """``flash_attention_2`` when flash-attn imports and the device is CUDA, else ``sdpa``."""
    flash_ok = device.type == "cuda" and flash_attn_importable()
    if requested == "flash_attention_2" and not flash_ok:
        raise ValueError("attn=flash_attention_2 needs CUDA and the flash-attn package (pip install '.[flash]')")
    return requested or ("flash_attention_2" if flash_ok else "sdpa")


def load_model(spec: str = "tiny", device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, attn: str | None = None, seed: int = 0) -> LoadedModel:
    """Load a VideoLLaMA3 model.

    ``spec`` is ``"tiny"`` (random weights built in code, deterministic for ``seed``), ``"random-2b"``
    / ``"random-7b"`` (random weights at real sizes, for benchmarks), a local checkpoint directory
    written by ``save_pretrained``, or a hub id in the transformers-native layout.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    attn_impl = choose_attention(dev, attn)
    if spec == "tiny" or spec.startswith("random-"):
        size = "tiny" if spec == "tiny" else spec.removeprefix("random-")
        processor = tiny.build_processor()
        model = tiny.build_random_model(size, seed=seed, device=dev, dtype=dt, attn=attn_impl)
    else:
        path = Path(spec).expanduser()
        if spec.startswith((".", "/", "~")) and not path.exists():
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        source = str(path) if path.exists() else spec
        try:
            processor = AutoProcessor.from_pretrained(source)
            model = VideoLlama3ForConditionalGeneration.from_pretrained(
                source, dtype=dt, attn_implementation=attn_impl, use_safetensors=True)
        except OSError as exc:
            raise OSError(f"could not load VideoLLaMA3 checkpoint {spec!r}: {exc}") from exc
        if not isinstance(processor, VideoLlama3Processor):
            raise ValueError(f"{spec!r} has a {type(processor).__name__}, not a VideoLlama3Processor")
        model = model.to(dev).eval()
    log.info("loaded %s on %s (%s, attention %s)", spec, dev, dt, attn_impl)
    return LoadedModel(model=model, processor=processor, tokenizer=processor.tokenizer, spec=spec,
                       device=dev, dtype=dt, attn=attn_impl)
