"""``load_model``: the tiny built-in model, a local checkpoint directory, or a hub id."""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoProcessor, VideoLlama3ForConditionalGeneration, VideoLlama3Processor

from . import hub, tiny

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


def _quantization(quant: str | None, device: torch.device):
    if quant is None:
        return None
    if quant not in ("8bit", "4bit"):
        raise ValueError(f"quant must be 8bit or 4bit, got {quant!r}")
    if device.type != "cuda":
        raise ValueError(f"--quant {quant} needs CUDA: bitsandbytes quantization runs on NVIDIA GPUs "
                         "(on a CPU, load the model unquantized)")
    from transformers import BitsAndBytesConfig

    skip = ["vision_model", "projector", "lm_head"]  # the vision side stays in bf16
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip)


def _local_or_official(spec: str, trust_pickle: bool) -> str:
    """A native checkpoint to load: ``spec`` itself, or the converted copy of an official one."""
    from .convert import OFFICIAL_TYPE, converted, is_official

    path = Path(spec).expanduser()
    if path.is_dir():
        if is_official(path):
            return str(converted(path, trust_pickle))
        if not list(path.glob("*.safetensors")) and list(path.glob("*.bin")) and not trust_pickle:
            raise ValueError(f"{path} has only pickled .bin weights, which can run code when loaded; "
                             "pass --trust-pickle (model.trust_pickle) only if you trust the source")
        return str(path)
    try:  # a hub id: look at its config before fetching weights
        import json

        from huggingface_hub import hf_hub_download, snapshot_download

        cfg = json.loads(Path(hf_hub_download(spec, "config.json")).read_text())
        if cfg.get("model_type") == OFFICIAL_TYPE:
            local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]
                                      + (["*.bin"] if trust_pickle else []))
            return str(converted(local, trust_pickle))
    except Exception as exc:  # offline or not on the hub: from_pretrained says why below
        log.debug("could not inspect %s on the hub: %s", spec, exc)
    return spec


def load_model(spec: str = "tiny", device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, attn: str | None = None, seed: int = 0,
               quant: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load a VideoLLaMA3 model.

    ``spec`` is ``"tiny"`` (random weights built in code, deterministic for ``seed``), ``"random-2b"``
    / ``"random-7b"`` (random weights at real sizes, for benchmarks), a local checkpoint directory
    written by ``save_pretrained``, or a hub id; official remote-code checkpoints
    (``DAMO-NLP-SG/VideoLLaMA3-*``) are converted to the native layout once and cached
    (``model/checkpoints/convert.py``). ``quant`` (``8bit``/``4bit``, CUDA) loads the LLM through bitsandbytes.
    Weights load from safetensors only unless ``trust_pickle``; remote code never runs.
    """
    dev, dt, attn_impl = _settings(spec, device, dtype, attn, quant)
    if _built_in(spec):
        size = "tiny" if spec == "tiny" else spec.removeprefix("random-")
        processor = tiny.build_processor()
        model = tiny.build_random_model(size, seed=seed, device=dev, dtype=dt, attn=attn_impl)
    else:
        spec_path = _checkpoint(spec)
        bnb = _quantization(quant, dev)
        source = _local_or_official(spec_path, trust_pickle)
        try:
            processor = AutoProcessor.from_pretrained(source)
            model = VideoLlama3ForConditionalGeneration.from_pretrained(
                source, dtype=dt, attn_implementation=attn_impl, use_safetensors=not trust_pickle,
                quantization_config=bnb, **({"device_map": {"": dev.index or 0}} if bnb else {}))
        except OSError as exc:
            raise OSError(f"could not load VideoLLaMA3 checkpoint {spec!r}: {exc}") from exc
        if not isinstance(processor, VideoLlama3Processor):
            raise ValueError(f"{spec!r} has a {type(processor).__name__}, not a VideoLlama3Processor")
        model = (model if bnb else model.to(dev)).eval()
    log.info("loaded %s on %s (%s, attention %s%s)", spec, dev, dt, attn_impl, f", {quant}" if quant else "")
    return LoadedModel(model=model, processor=processor, tokenizer=processor.tokenizer, spec=spec,
                       device=dev, dtype=dt, attn=attn_impl)


def _built_in(spec: str) -> bool:
    return spec == "tiny" or spec.startswith("random-")


def _settings(spec: str, device, dtype, attn, quant) -> tuple[torch.device, torch.dtype, str]:
    """Device, dtype and attention for these settings; ValueError for ones that cannot work here."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    attn_impl = choose_attention(dev, attn)
    if quant is not None:
        _quantization(quant, dev)
        if _built_in(spec):  # random models are built in code, not quantized
            raise ValueError("--quant applies to checkpoints loaded from disk or the hub, not to built-in models")
    return dev, dt, attn_impl


def _checkpoint(spec: str) -> str:
    """A local directory, or a hub id that can be had (cached, or the hub answers): see ``model.checkpoints.hub``."""
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    if spec.startswith((".", "/", "~")) or not hub.is_hub_id(spec):
        raise FileNotFoundError(f"checkpoint directory not found: {path} (a checkpoint is tiny, a local "
                                "directory, or a hub id like DAMO-NLP-SG/VideoLLaMA3-2B)")
    return hub.resolve(spec)


TOKENIZER_FILES = ["*.json", "*.txt", "*.jinja", "*.model"]  # everything but the weights


def load_processor(spec: str) -> VideoLlama3Processor:
    """A checkpoint's processor (tokenizer, image and video processors) without its weights: what the
    training data tools need. Official checkpoints get the native processor around their tokenizer."""
    from transformers import AutoTokenizer

    from .convert import is_official, native_processor

    if _built_in(spec):
        return tiny.build_processor()
    path = _checkpoint(spec)
    if not Path(path).is_dir():
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=TOKENIZER_FILES)
    if is_official(path):
        return native_processor(AutoTokenizer.from_pretrained(path))
    processor = AutoProcessor.from_pretrained(path)
    if not isinstance(processor, VideoLlama3Processor):
        raise ValueError(f"{spec!r} has a {type(processor).__name__}, not a VideoLlama3Processor")
    return processor


def preflight(model_config, spec: str | None = None) -> str:
    """Check every ``model.*`` setting and that the checkpoint can be had, in seconds and without
    loading it (commands call this before any other work); returns the spec."""
    m = model_config
    spec = spec or m.spec
    _settings(spec, m.device, m.dtype, m.attn, m.quant)
    if not _built_in(spec):
        _checkpoint(spec)
    return spec


def load_configured(model_config, spec: str | None = None, say=print) -> LoadedModel:
    """``load_model`` with every ``model.*`` setting (``spec`` overrides ``model.spec``); tells
    ``say`` what it loads and the device, dtype, attention backend and quantization it chose."""
    m = model_config
    spec = preflight(m, spec)
    say(f"loading {spec} ...")
    lm = load_model(spec, device=m.device, dtype=m.dtype, attn=m.attn, seed=m.seed, quant=m.quant,
                    trust_pickle=m.trust_pickle)
    say(f"model on {lm.device} ({str(lm.dtype).removeprefix('torch.')}, attention {lm.attn}"
        f"{', ' + m.quant if m.quant else ''})")
    return lm
