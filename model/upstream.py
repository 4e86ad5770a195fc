"""Every place this project reaches into transformers below its public model classes, in one module.

We call upstream, never fork it (``shared/STYLE.md``): the stock VideoLLaMA3 / Qwen2 layers run
unchanged, and these few touchpoints are how the live session plugs into them. Each says why it
exists and what it relies on; ``tests/test_upstream.py`` checks every one against the installed
transformers, so an upstream change fails there, by name, not deep inside a session.
Pinned: ``transformers>=5.17,<6`` (``pyproject.toml``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, AttentionMaskInterface, Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

# The VideoLLaMA3 video processor's resize rule (factor 28, pixel bounds), imported from its module:
# transformers exports no public name for it, and one frame must be resized exactly as the processor
# resizes a video's frames (``model/frames.py``).
from transformers.models.video_llama_3.video_processing_video_llama_3 import smart_resize

__all__ = ["Cache", "cache_keyword", "capture_queries", "config_attention", "decoder_layers", "lm_head", "register_attention",
           "sdpa_attention_forward", "smart_resize", "text_model", "use_attention"]


def text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Qwen2 decoder inside ``VideoLlama3ForConditionalGeneration`` (its ``model.language_model``):
    the live session runs it on its own packed rows, past the wrapper's multimodal merge."""
    return model.model.language_model


def lm_head(model: torch.nn.Module) -> torch.nn.Module:
    """The logits head, run only on the rows whose logits are wanted."""
    return model.lm_head


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return text_model(model).layers


def cache_keyword(decoder: torch.nn.Module) -> str:
    """The decoder's cache argument: ``past_key_values`` in early 5.x releases, ``cache`` in later ones
    (both inside the pinned range, so both are supported; anything else fails here, loudly)."""
    params = inspect.signature(decoder.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise RuntimeError(f"transformers moved the decoder's cache argument: {type(decoder).__name__}.forward "
                       f"takes {list(params)}")


def register_attention(name: str, fn: Callable) -> None:
    """Make ``fn`` an attention function the stock layers can call by ``name`` (``AttentionInterface``);
    its mask is SDPA's own, so any caller that passes no extra arguments gets plain SDPA."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def use_attention(decoder: torch.nn.Module, name: str) -> None:
    """Have the decoder's layers call attention function ``name``. Layers read it from their config at
    every call (``config._attn_implementation``), so this is the one switch there is."""
    if decoder.config._attn_implementation != name:
        decoder.config._attn_implementation = name


def config_attention(config: object, name: str) -> None:
    """Build the model from ``config`` with attention ``name``: the config field the constructor reads
    (the public ``attn_implementation=`` argument exists only on ``from_pretrained``)."""
    config._attn_implementation = name


@contextmanager
def capture_queries(decoder: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every layer's query projection output (pre-RoPE, ``(rows, heads * head_dim)``)
    is appended to the yielded list, layer by layer. Recall scores stored frames by these queries; a
    forward hook on ``self_attn.q_proj`` is the way to read them without changing the layer."""
    captured: list[torch.Tensor] = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
             for layer in decoder.layers]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()
