import copy

import pytest

from model.checkpoints.tiny import build_config
from model.layout import ChatPieces, FrameText, LayoutRenderer


def test_pieces_come_from_the_checkpoint_chat_template(lm):
    assert ChatPieces.from_processor(lm.processor) == ChatPieces()
    proc = copy.copy(lm.processor)
    proc.chat_template = lm.processor.chat_template.replace("You are a helpful assistant.", "Watch closely.")
    pieces = ChatPieces.from_processor(proc)
    assert pieces.system_prefix == "<|im_start|>system\nWatch closely.<|im_end|>\n"
    assert pieces.video_suffix == "\n" and pieces.turn_close == "<|im_end|>\n"
    assert ChatPieces.from_processor(proc, system_prompt="Be brief.").system_prefix.endswith("Be brief.<|im_end|>\n")
    proc.chat_template = "{{ raise_exception('no videos here') }}"
    assert ChatPieces.from_processor(proc) == ChatPieces()  # unprobeable template: ChatML defaults


def test_video_turn_rendering_sequence():
    r = LayoutRenderer("video-turn", ChatPieces())
    out = [r.frame(0.0)[0], r.frame(1.25)[0], r.question("Q?"), r.answer_close(), r.frame(2.0)[0], r.question("R?")]
    assert out[0].endswith("<|im_start|>user\nTime 0.0s:") and out[0].startswith("<|im_start|>system\n")
    assert out[1] == ",Time 1.2s:"
    assert out[2] == "\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert out[4] == "<|im_start|>user\nTime 2.0s:"
    assert r.question("Again?") == "<|im_start|>user\nAgain?<|im_end|>\n<|im_start|>assistant\n"
    # the parts the KV budget cuts at: a turn's opening, the separator, the frame's own stamp
    assert r.frame_text(3.0) == FrameText("<|im_start|>user\n", "", "Time 3.0s:", "")
    assert r.frame_text(4.0) == FrameText("", ",", "Time 4.0s:", "")


def test_stream_rendering_sequence():
    r = LayoutRenderer("stream", ChatPieces())
    before, after = r.frame(3.0)
    assert before.endswith("<|stream_start|>stream\nTime 3.0s:") and after == "\n<|stream_end|>\n"
    assert r.frame(4.0) == ("<|stream_start|>stream\nTime 4.0s:", "\n<|stream_end|>\n")
    assert r.question("Q?") == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert r.assistant_open() == "<|im_start|>assistant\n"
    with pytest.raises(ValueError):
        LayoutRenderer("diagonal", ChatPieces())


def test_stream_turns_without_timestamps_are_what_the_released_checkpoints_saw():
    """The official training code renders ``<|stream_start|>stream\\n<image>\\n<|stream_end|>\\n``."""
    r = LayoutRenderer("stream", ChatPieces(), stream_timestamps=False)
    r.start()
    before, after = r.frame(3.0)
    assert (before, after) == ("<|stream_start|>stream\n", "\n<|stream_end|>\n")
    assert "Time" not in "".join(r.frame(4.0))
    assert r.question("Q?") == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    video_turn = LayoutRenderer("video-turn", ChatPieces(), stream_timestamps=False)
    assert video_turn.frame(1.0)[0].endswith("Time 1.0s:")  # (video-turn keeps its times: the processor's format)


@pytest.mark.parametrize("size, hidden, heads, kv, vocab, tied", [
    ("2b", 1536, 12, 2, 151936, True), ("7b", 3584, 28, 4, 152064, False)])
def test_real_size_configs_match_design(size, hidden, heads, kv, vocab, tied):
    c = build_config(size)
    t, v = c.text_config, c.vision_config
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.vocab_size) == (hidden, heads, kv, vocab)
    theta = getattr(t, "rope_theta", None) or (t.rope_parameters or {}).get("rope_theta")
    assert (t.num_hidden_layers, t.max_position_embeddings, theta) == (28, 32768, 1e6)
    assert c.tie_word_embeddings is tied
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size) == (
        1152, 4304, 27, 16, 14)
