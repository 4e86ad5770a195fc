"""``StreamSession``: one stream's persistent KV cache, fed frame by frame and asked at any time.

Each frame is preprocessed, pruned by DiffFP, encoded alone by the vision tower (frames are
independent attention segments, so this equals encoding the clip at once) and its kept tokens
are appended with their timestamp text to the cache in one forward. Questions and answers go
into the same cache, so later questions can refer to them.

Text that must follow an answer (``<|im_end|>\\n``) is held as *pending* and forwarded together
with the next frame or question, saving one forward per answer; ``token_ids()`` and
``cache_len`` describe exactly what is in the KV cache.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from .config import SessionConfig
from .diffp import DiffPruner
from .frames import MERGE, FramePreprocessor, PixelFrame
from .generation import IncrementalDetokenizer, sample_next
from .layout import STREAM_START, ChatPieces, LayoutRenderer
from .loading import LoadedModel


class CacheLimitError(RuntimeError):
    """The KV cache would grow past its limit (the model's trained positions or the config's cap)."""


@dataclass
class FrameResult:
    """What one ``add_frame`` did."""

    t: float
    tokens_total: int  # merged tokens of the whole frame
    tokens_kept: int  # tokens that survived DiffFP and went into the cache
    cache_len: int  # tokens in the KV cache after this frame
    keep_mask: np.ndarray  # (rows, cols) bool, which merged tokens were kept
    ms: float  # wall time of the whole step (preprocess + DiffFP + encode + append)


@dataclass
class TokenDelta:
    """One generated token and the text it added (may be "" mid-character)."""

    token_id: int
    text: str


class StreamSession:
    """A persistent VideoLLaMA3 conversation over one video stream (not thread-safe)."""

    def __init__(self, lm: LoadedModel, config: SessionConfig | None = None):
        self.lm = lm
        self.config = config or SessionConfig()
        self.tokenizer = lm.tokenizer
        model = lm.model
        self._text_model = model.model.language_model
        self._cache_kw = "cache" if "cache" in inspect.signature(self._text_model.forward).parameters \
            else "past_key_values"
        text_config = model.config.text_config
        try:
            self._cache = DynamicCache(config=text_config)
        except TypeError:  # older transformers
            self._cache = DynamicCache()
        limit = text_config.max_position_embeddings
        if self.config.max_cache_tokens is not None:
            limit = min(limit, self.config.max_cache_tokens)
        self.max_tokens = int(limit)
        self.video_token_id = model.config.video_token_id
        self._prep = FramePreprocessor(self.config.frame_pixels, self.config.min_pixels, lm.device)
        self._pruner = DiffPruner(self.config.diffp_reference, self.config.threshold,
                                  self.config.diffp_min_tokens, grey_scale=self._prep.grey_scale())
        pieces = ChatPieces.from_processor(lm.processor, self.config.system_prompt)
        self._renderer = LayoutRenderer(self.config.layout, pieces)
        self.eos_ids = self._eos_ids()
        self._close_len = len(self._encode_ids(self._renderer.answer_close()))
        self._stream_ids: tuple[int, int] | None = None
        if self.config.layout == "stream":
            ids = (self._special_id("<|im_start|>"), self._special_id(STREAM_START))
            if None in ids:
                raise ValueError(f"layout 'stream' needs the tokens <|im_start|> and {STREAM_START}; "
                                 f"checkpoint {lm.spec!r} has no stream tokens (use layout 'video-turn')")
            self._stream_ids = ids
        self._ids: list[int] = []
        self._pending_ids: list[int] = []  # generated but not yet forwarded
        self._pending_text = ""  # closing text of the last answer
        self._last_logits: torch.Tensor | None = None
        self._last_event = ""
        self._last_t: float | None = None
        self._answering = False
        self.frames_added = 0

    # -- public state -------------------------------------------------------------------------
    @property
    def cache_len(self) -> int:
        """Tokens in the KV cache."""
        return len(self._ids)

    @property
    def last_t(self) -> float | None:
        return self._last_t

    def token_ids(self) -> list[int]:
        """Every token id in the KV cache, in order (visual tokens as the video pad id)."""
        return list(self._ids)

    def next_logits(self) -> torch.Tensor:
        """Logits (V,) for the token after the last one in the cache (inside an answer: the next token)."""
        if self._last_logits is None:
            raise RuntimeError("no logits yet: add a frame or ask first")
        return self._last_logits.detach().float().cpu().clone()

    def respond_probability(self) -> float:
        """P(``<|im_start|>``) against P(``<|stream_start|>``) after the last frame (``stream`` layout)."""
        if self._stream_ids is None:
            raise RuntimeError("respond_probability() needs layout='stream'")
        if self._last_event != "frame" or self._last_logits is None:
            raise RuntimeError("respond_probability() is defined right after add_frame()")
        pair = self._last_logits[list(self._stream_ids)].float()
        return float(torch.softmax(pair, dim=-1)[0])

    # -- model steps ----------------------------------------------------------------------------
    def _special_id(self, token: str) -> int | None:
        """The id of ``token``, or None when the tokenizer does not have it."""
        i = self.tokenizer.convert_tokens_to_ids(token)
        return i if isinstance(i, int) and i != getattr(self.tokenizer, "unk_token_id", None) else None

    def _eos_ids(self) -> set[int]:
        ids = {i for i in map(self._special_id, ("<|im_end|>", "<|endoftext|>")) if i is not None}
        gen_eos = getattr(self.lm.model.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            ids.update(int(i) for i in gen_eos)
        return ids

    def _encode_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _embed(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.long, device=self.lm.device)
        return self.lm.model.get_input_embeddings()(t)  # (T, H)

    def _encode_frame(self, pf: PixelFrame, keep: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector on one frame; returns the kept tokens' embeddings (K, H)."""
        m = self.lm.model.model
        out = m.get_video_features(
            pixel_values_videos=pf.pixel_values.to(self.lm.dtype),
            video_grid_thw=torch.tensor([pf.grid_thw], device=self.lm.device),
            video_merge_sizes=torch.tensor([MERGE], device=self.lm.device),
        )
        return out.pooler_output[0][keep]

    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append ``embeds`` (T, H) to the cache; return the logits of the last position (V,)."""
        out = self._text_model(inputs_embeds=embeds.unsqueeze(0).to(self.lm.dtype), use_cache=True,
                               **{self._cache_kw: self._cache})
        return self.lm.model.lm_head(out.last_hidden_state[:, -1])[0]

    def _rollback(self) -> None:
        """Drop anything a failed forward wrote past the committed tokens."""
        if self._cache.get_seq_length() > self.cache_len:
            self._cache.crop(self.cache_len)

    def _check_room(self, new_tokens: int, what: str) -> None:
        if self.cache_len + new_tokens > self.max_tokens:
            raise CacheLimitError(
                f"{what} needs {new_tokens} more tokens but the KV cache holds {self.cache_len} of at most "
                f"{self.max_tokens} (limit: model max_position_embeddings / session.max_cache_tokens)")

    # -- frames ----------------------------------------------------------------------------------
    def add_frame(self, frame: np.ndarray, t: float) -> FrameResult:
        """Preprocess, prune, encode and append one RGB uint8 HxWx3 frame at stream time ``t`` seconds."""
        start = time.perf_counter()
        if self._answering:
            raise RuntimeError("an answer is being generated; finish or close it before adding frames")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"t must be a finite number of seconds >= 0, got {t!r}")
        t = float(t)
        if self._last_t is not None and t <= self._last_t:
            raise ValueError(f"timestamps must increase: got t={t} after t={self._last_t}")
        with torch.inference_mode():
            pf = self._prep(frame)  # validates the frame
            keep = self._pruner.mask(pf)
            saved = self._renderer.snapshot()
            before, after = self._renderer.frame(t)
            ids_before = self._pending_ids + self._encode_ids(self._pending_text + before)
            ids_after = self._encode_ids(after)
            keep_np = keep.cpu().numpy()  # the one device sync of the step
            kept = int(keep_np.sum())
            try:
                self._check_room(len(ids_before) + kept + len(ids_after), f"frame at t={t}")
                vis = self._encode_frame(pf, keep)
                embeds = torch.cat([self._embed(ids_before), vis.to(self.lm.dtype), self._embed(ids_after)])
                logits = self._forward(embeds)
            except BaseException:
                self._renderer.restore(saved)
                self._rollback()
                raise
        self._pruner.commit(pf, keep)
        self._ids += ids_before + [self.video_token_id] * kept + ids_after
        self._pending_ids, self._pending_text = [], ""
        self._last_logits, self._last_event, self._last_t = logits, "frame", t
        self.frames_added += 1
        rows, cols = pf.grid_thw[1] // MERGE, pf.grid_thw[2] // MERGE
        return FrameResult(t=t, tokens_total=pf.num_tokens, tokens_kept=kept, cache_len=self.cache_len,
                           keep_mask=keep_np.reshape(rows, cols), ms=(time.perf_counter() - start) * 1e3)

    # -- questions -------------------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
            top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
            ignore_eos: bool = False) -> Iterator[TokenDelta]:
        """Append ``question`` and stream the answer as :class:`TokenDelta`.

        Arguments are checked now (``ValueError``); the work happens as the iterator is consumed.
        Question and answer stay in the cache. Closing the iterator early ends the answer there.
        ``ignore_eos`` generates exactly ``max_new_tokens`` (benchmarks).
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
            raise ValueError("sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
        self._renderer.restore(self._render_question(question, max_new_tokens)[1])  # checks only
        return self._generate(question, max_new_tokens, do_sample, temperature, top_k, top_p, seed, ignore_eos)

    def _render_question(self, question: str, max_new_tokens: int) -> tuple[list[int], object]:
        """Render the question (renderer state advanced) and check the room for it and its answer.

        Returns the prompt ids and the renderer state from before, to restore on failure.
        """
        if self._answering:
            raise RuntimeError("an answer is already being generated in this session")
        saved = self._renderer.snapshot()
        ids = self._pending_ids + self._encode_ids(self._pending_text + self._renderer.question(question))
        try:
            self._check_room(len(ids) + max_new_tokens + self._close_len, "question and answer")
        except CacheLimitError:
            self._renderer.restore(saved)
            raise
        return ids, saved

    def _generate(self, question: str, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int,
                  top_p: float, seed: int | None, ignore_eos: bool) -> Iterator[TokenDelta]:
        # Nothing changes until the caller starts iterating; then the question is committed.
        ids, saved = self._render_question(question, max_new_tokens)
        try:
            with torch.inference_mode():
                logits = self._forward(self._embed(ids))
        except BaseException:
            self._renderer.restore(saved)
            self._rollback()
            raise
        self._answering = True
        self._ids += ids
        self._pending_ids, self._pending_text = [], ""
        self._last_logits, self._last_event = logits, "question"
        gen = torch.Generator(device=self.lm.device).manual_seed(seed) if seed is not None else None
        detok = IncrementalDetokenizer(self.tokenizer)
        unforwarded: list[int] = []
        try:
            for step in range(max_new_tokens):
                token = sample_next(logits, do_sample, temperature, top_k, top_p, gen)
                if token in self.eos_ids and not ignore_eos:
                    break
                unforwarded = [token]
                yield TokenDelta(token_id=token, text=detok.push(token))
                if step == max_new_tokens - 1:
                    break
                with torch.inference_mode():
                    logits = self._forward(self._embed([token]))
                self._ids.append(token)
                self._last_logits = logits
                unforwarded = []
        finally:
            self._pending_ids = unforwarded
            self._pending_text = self._renderer.answer_close()
            self._last_event = "answer"
            self._last_logits = None
            self._answering = False

    def answer(self, question: str, **kwargs: object) -> str:
        """Ask and return the whole answer text."""
        return "".join(d.text for d in self.ask(question, **kwargs))
