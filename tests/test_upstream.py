"""Every transformers touchpoint of ``model/upstream.py``, checked against the installed transformers.

When upstream moves one of them, the test named after it fails here, saying what moved, instead of a
session failing deep inside a forward."""

import inspect

import pytest
import torch

from model import upstream


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_the_video_processors_resize_rule_keeps_its_signature():
    assert _params(upstream.smart_resize)[:5] == ["height", "width", "factor", "min_pixels", "max_pixels"]
    h, w = upstream.smart_resize(336, 448, factor=28, min_pixels=28 * 28, max_pixels=448 * 336)
    assert (h, w) == (336, 448) and h % 28 == w % 28 == 0


def test_the_model_keeps_its_decoder_head_and_layers(lm):
    decoder = upstream.text_model(lm.model)
    assert type(decoder).__name__ == "Qwen2Model"
    assert isinstance(upstream.lm_head(lm.model), torch.nn.Linear)
    layers = upstream.decoder_layers(lm.model)
    assert len(layers) == lm.model.config.text_config.num_hidden_layers
    assert all(isinstance(layer.self_attn.q_proj, torch.nn.Linear) for layer in layers)


def test_the_decoder_takes_a_cache_argument_by_one_of_its_known_names(lm):
    decoder = upstream.text_model(lm.model)
    assert upstream.cache_keyword(decoder) in _params(decoder.forward)

    class Moved(torch.nn.Module):
        def forward(self, inputs_embeds, kv_store=None):
            return inputs_embeds
    with pytest.raises(RuntimeError, match="moved the decoder's cache argument"):
        upstream.cache_keyword(Moved())


def test_the_cache_interface_still_has_what_the_packed_cache_overrides():
    for name in ("update", "get_seq_length"):
        assert callable(getattr(upstream.Cache, name, None)), f"transformers' Cache lost {name}"
    assert _params(upstream.Cache.update)[1:4] == ["key_states", "value_states", "layer_idx"]


def test_a_registered_attention_function_is_called_by_the_stock_layers(lm):
    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return upstream.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    assert _params(upstream.sdpa_attention_forward)[:5] == ["module", "query", "key", "value", "attention_mask"]
    upstream.register_attention("vl3live_test_spy", spy)
    decoder = upstream.text_model(lm.model)
    before = decoder.config._attn_implementation
    try:
        upstream.use_attention(decoder, "vl3live_test_spy")
        with torch.inference_mode():
            decoder(inputs_embeds=torch.zeros(1, 3, lm.model.config.text_config.hidden_size))
    finally:
        upstream.use_attention(decoder, before)
    assert len(calls) == len(decoder.layers) and calls[0][2] == 3  # every layer, the 3 query rows


def test_query_capture_sees_every_layers_queries_and_leaves_no_hook(lm):
    decoder = upstream.text_model(lm.model)
    with torch.inference_mode(), upstream.capture_queries(decoder) as captured:
        decoder(inputs_embeds=torch.zeros(1, 2, lm.model.config.text_config.hidden_size))
    tc = lm.model.config.text_config
    assert len(captured) == tc.num_hidden_layers
    assert captured[0].shape == (2, tc.num_attention_heads * (tc.hidden_size // tc.num_attention_heads))
    assert all(not layer.self_attn.q_proj._forward_hooks for layer in decoder.layers)
