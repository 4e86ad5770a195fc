"""``StreamSession``: one stream's persistent KV cache, fed frame by frame and asked at any time.

Each frame is preprocessed, pruned by DiffFP, encoded by the vision tower (frames are
independent attention segments, so this equals encoding the clip at once) and its kept tokens
are appended with their timestamp text to the cache in one forward. Questions and answers go
into the same cache, so later questions can refer to them.

The session's model work is written as *operations* (:meth:`begin_frame`, :meth:`begin_answer`):
generators that yield each forward they need as a :class:`model.executor.Forward` and get it back
run. :meth:`add_frame` and :meth:`ask` run them at once on the session's own executor; the live
engine runs the operations of many sessions together, one packed forward per step, over one
shared :class:`model.kvpool.KVPool`. It is the same code either way.

Text that must follow an answer (``<|im_end|>\\n``) is held as *pending* and forwarded together
with the next frame or question, saving one forward per answer; ``token_ids()`` and
``cache_len`` describe exactly what is in the KV cache.

With ``session.budget.max_tokens`` set, whole frames (and old question/answer exchanges) are
evicted from between the sink and the recent window before anything new is appended, and the
keys that move are re-rotated (``model.kvcache``); with ``recall: on`` the evicted frames go to a
:class:`model.recall.RecallStore` and the most relevant come back for each question.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

from . import upstream
from .answering import Answering, Op, TokenDelta
from .budget import EXCHANGE, FRAME, SINK, CacheLimitError, KVBudget, Ledger, Unit
from .checkpoints.loading import LoadedModel
from .config import SessionConfig
from .diffp import DiffPruner
from .driver import drive
from .executor import Executor, Forward
from .frames import MERGE, FramePreprocessor, PixelFrame
from .kvcache import RopeMover
from .kvpool import KVPool
from .layout import STREAM_START, ChatPieces, LayoutRenderer, timestamp
from .memory import Memory
from .recall import RecallStore

__all__ = ["CacheLimitError", "FrameResult", "Op", "SessionStats", "StreamSession", "TokenDelta"]

@dataclass
class FrameResult:
    """What one ``add_frame`` did."""

    t: float
    tokens_total: int  # merged tokens of the whole frame
    tokens_kept: int  # tokens that survived DiffFP and went into the cache
    cache_len: int  # tokens in the KV cache after this frame
    keep_mask: np.ndarray  # (rows, cols) bool, which merged tokens were kept
    ms: float  # wall time of the whole step (preprocess + DiffFP + encode + append)
    evicted_frames: int = 0  # frames the KV budget evicted to make room for this one


@dataclass(frozen=True)
class SessionStats:
    """A session's cache, budget and recall counters (``StreamSession.stats()``)."""

    cache_len: int
    max_tokens: int
    frames_added: int
    frames_in_cache: int
    evicted_frames: int  # by the KV budget, over the session's life
    evicted_exchanges: int
    recalled_frames: int  # brought back for questions
    recall_stored: int  # evicted frames held for recall now
    recall_dropped: int  # dropped from the store past its memory cap
    recall_mb: float
    recent_seconds_overruns: int  # times budget.recent_seconds had to give way
    pinned_tokens: int  # tokens of pinned exchanges (a standing instruction)


class StreamSession(Memory, Answering):
    """A persistent VideoLLaMA3 conversation over one video stream (not thread-safe).

    ``pool`` and ``executor``: the live engine's shared KV pool and executor (the session reserves
    its KV budget in the pool now: ``PoolFullError`` if it does not fit; :meth:`close` returns it).
    Without them the session has a private pool that grows as needed.
    """

    def __init__(self, lm: LoadedModel, config: SessionConfig | None = None, pool: KVPool | None = None,
                 executor: Executor | None = None):
        self.lm = lm
        self.config = config or SessionConfig()
        self.tokenizer = lm.tokenizer
        model = lm.model
        self._text_model = upstream.text_model(model)
        self._text_config = model.config.text_config
        limit = self._text_config.max_position_embeddings
        if self.config.max_cache_tokens is not None:
            limit = min(limit, self.config.max_cache_tokens)
        self.video_token_id = model.config.video_token_id
        self._prep = FramePreprocessor(self.config.frame_pixels, self.config.min_pixels, lm.device)
        self._pruner = DiffPruner(self.config.diffp_reference, self.config.threshold,
                                  self.config.diffp_min_tokens, grey_scale=self._prep.grey_scale())
        pieces = ChatPieces.from_processor(lm.processor, self.config.system_prompt)
        self._renderer = LayoutRenderer(self.config.layout, pieces, self.config.stream_timestamps)
        self.eos_ids = self._eos_ids()
        self._close_len = len(self._encode_ids(self._renderer.answer_close()))
        self._stream_ids: tuple[int, int] | None = None
        if self.config.layout == "stream":
            ids = (self._special_id("<|im_start|>"), self._special_id(STREAM_START))
            if None in ids:
                raise ValueError(f"layout 'stream' needs the tokens <|im_start|> and {STREAM_START}; "
                                 f"checkpoint {lm.spec!r} has no stream tokens (use layout 'video-turn')")
            self._stream_ids = ids
        self._ledger = Ledger()
        sink_ids = self._encode_ids(self._renderer.start())
        budget_cfg = self.config.budget
        self._budget = None
        if budget_cfg.max_tokens is not None:
            self._budget = KVBudget(budget_cfg, limit, len(sink_ids), self._max_frame_tokens(pieces))
        self.max_tokens = int(self._budget.max_tokens if self._budget else limit)
        if pool is None:
            pool = KVPool(self._text_config, 16 * 64, lm.device, lm.dtype, growable=True)
        self._pool = pool
        self._executor = executor or Executor(lm)
        self._seq = pool.open(self.max_tokens)  # admission: the whole budget fits the pool, or PoolFullError
        self._mover = RopeMover(self._text_model.rotary_emb)
        self._store: RecallStore | None = None
        if self._budget is not None and budget_cfg.recall == "on":
            tc = self._text_config
            head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
            self._store = RecallStore(int(budget_cfg.recall_memory_mb * 2**20), tc.num_hidden_layers,
                                      tc.num_key_value_heads, head_dim)
        self._pending_ids: list[int] = []  # generated but not yet forwarded
        self._pending_text = ""  # closing text of the last answer
        self._pending_owner: Unit | None = None  # the exchange the pending tokens belong to
        self._anchors: dict = {}  # pinned exchanges' float32 keys (uid -> positions, per-layer keys): memory.py
        self._turn: Unit | None = None  # video-turn: the exchange of the open user turn
        self._last_logits: torch.Tensor | None = None
        self._last_hidden: torch.Tensor | None = None  # after a frame: its last row, for logits on demand
        self.logit_log: list[torch.Tensor] | None = None  # a list: each answer token's logits are appended
        self.frame_logits = False  # compute the full logits after every frame (else on demand)
        self._last_event = ""
        self._last_t: float | None = None
        self._answering = False
        self.frames_added = 0
        self.frames_prepared_here = 0  # frames begin_frame had to preprocess itself (not from prepare())
        self.evicted_frames = 0
        self.evicted_exchanges = 0
        self.recalled_frames = 0
        self.recent_seconds_overruns = 0  # evictions that had to reach into session.budget.recent_seconds
        self.last_recall: list[float] = []  # stream times of the frames recalled for the last question
        if len(sink_ids) > self.max_tokens:
            raise ValueError(f"the system prompt ({len(sink_ids)} tokens) does not fit {self.max_tokens} tokens")
        if sink_ids:
            try:
                self._run(self._sink_op(sink_ids))
            except BaseException:
                self.close()
                raise

    def _sink_op(self, ids: list[int]) -> Op:
        yield self._fwd(lambda _: self._embed(ids), len(ids), logits=False)
        self._ledger.append(ids, self._ledger.new_unit(SINK, 0.0))

    def close(self) -> None:
        """Return this session's KV pages and reservation to the pool (the session is unusable after)."""
        self._pool.release(self._seq)

    # -- running operations -------------------------------------------------------------------------
    def _fwd(self, build, tokens: int, logits: bool = True, kind: str = "prefill", frame=None,
             probe: bool = False) -> Forward:
        return Forward(self._seq, tokens, build, logits=logits, probe=probe, frame=frame, kind=kind)

    def _drive(self, op: Op) -> Generator[TokenDelta, None, object]:
        """Run ``op`` on this session's executor, each forward at once; its token deltas pass through."""
        return drive(op, lambda work: self._executor.run([work]))

    def _run(self, op: Op) -> object:
        """Run an operation that streams nothing; return its result."""
        gen = self._drive(op)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value

    # -- public state -------------------------------------------------------------------------
    @property
    def cache_len(self) -> int:
        """Tokens in the KV cache."""
        return len(self._ledger)

    @property
    def kv_len(self) -> int:
        """Positions holding keys and values in the pool (equals ``cache_len`` between operations)."""
        return self._seq.length

    def cached_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (after RoPE) and values of every cached position in ``layer``: each (1, kv_heads, n, head_dim)."""
        slots = self._seq.table[: self._seq.length]
        return tuple(t[layer].index_select(0, slots).transpose(0, 1).unsqueeze(0)
                     for t in (self._pool.keys, self._pool.values))

    @property
    def last_t(self) -> float | None:
        return self._last_t

    def token_ids(self) -> list[int]:
        """Every token id in the KV cache, in order (visual tokens as the video pad id)."""
        return list(self._ledger.ids)

    @property
    def answering(self) -> bool:
        """An answer is being generated (frames and other questions wait until it ends)."""
        return self._answering

    def token_units(self) -> list[int]:
        """The id of the unit (the system prompt, a frame or an exchange) each cache position belongs to,
        in cache order: alongside :meth:`token_ids`, what eviction keeps and drops is visible."""
        return list(self._ledger.owners)

    @property
    def min_budget(self) -> int | None:
        """The smallest ``session.budget.max_tokens`` these settings allow (None without a budget)."""
        return self._budget.minimum if self._budget is not None else None

    def frames_in_cache(self) -> list[float]:
        """Stream times of the frames whose tokens are in the KV cache (recalled ones included)."""
        return sorted(u.t for u in self._ledger.frames())

    def set_diffp_threshold(self, threshold: float | None) -> None:
        """Change the DiffFP threshold for the frames to come (None = the reference mode's default)."""
        self.config = dataclasses.replace(self.config, diffp_threshold=threshold)
        self._pruner.threshold = self.config.threshold

    def stats(self) -> SessionStats:
        """Counters of the cache, the budget and recall."""
        store = self._store
        return SessionStats(
            cache_len=self.cache_len, max_tokens=self.max_tokens, frames_added=self.frames_added,
            frames_in_cache=len(self._ledger.frames()), evicted_frames=self.evicted_frames,
            evicted_exchanges=self.evicted_exchanges, recalled_frames=self.recalled_frames,
            recall_stored=len(store) if store is not None else 0,
            recall_dropped=store.dropped if store is not None else 0,  # (an empty store is falsy)
            recall_mb=store.nbytes / 2**20 if store is not None else 0.0,
            recent_seconds_overruns=self.recent_seconds_overruns,
            pinned_tokens=sum(self._ledger.units[o].pinned for o in self._ledger.owners))

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

    def _max_frame_tokens(self, pieces: ChatPieces) -> int:
        """Upper bound of one frame's tokens: visual tokens at the pixel budget plus its text."""
        probe = LayoutRenderer(self.config.layout, pieces, self.config.stream_timestamps)
        probe.start()
        text = probe.frame_text(99999.9)
        return self.config.frame_pixels // (28 * 28) + len(self._encode_ids(
            text.lead + "," + timestamp(99999.9) + text.after)) + 1

    def _embed(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.long, device=self.lm.device)
        return self.lm.model.get_input_embeddings()(t)  # (T, H)

    def _rollback(self) -> None:
        """Drop anything a failed forward wrote past the committed tokens."""
        self._pool.truncate(self._seq, self.cache_len)

    # -- token pieces and their owners ------------------------------------------------------------
    # A part is (token ids, owning unit); ids None stands for the owner's visual tokens.
    def _snapshot(self) -> tuple[object, Unit | None]:
        return self._renderer.snapshot(), self._turn

    def _restore(self, state: tuple[object, Unit | None]) -> None:
        self._renderer.restore(state[0])
        self._turn = state[1]

    def _pending_part(self) -> list[tuple[list[int] | None, Unit]]:
        """The closing text of the last answer: it belongs to that answer's exchange."""
        if self._pending_ids or self._pending_text:
            return [(self._pending_ids + self._encode_ids(self._pending_text), self._pending_owner)]
        return []

    def _frame_parts(self, unit: Unit, recalled: bool = False) -> list[tuple[list[int] | None, Unit]]:
        """One frame's pieces (advances the renderer).

        A new user turn's opening belongs to that turn's exchange, and the separator to the
        previous frame (so evicting the oldest frame of a turn leaves clean text), except for
        recalled frames, which own theirs and leave as a block after the answer.
        """
        ft = self._renderer.frame_text(unit.t)
        parts: list[tuple[list[int] | None, Unit]] = []
        if ft.lead:
            if self.config.layout == "video-turn":
                now = self._last_t if recalled and self._last_t is not None else unit.t
                self._turn = self._ledger.new_unit(EXCHANGE, now, complete=False)
            parts.append((self._encode_ids(ft.lead), self._turn or unit))
        if ft.sep:
            newest = self._ledger.newest()
            owner = newest if not recalled and newest is not None and newest.kind == FRAME else unit
            parts.append((self._encode_ids(ft.sep), owner))
        parts += [(self._encode_ids(ft.stamp), unit), (None, unit), (self._encode_ids(ft.after), unit)]
        return [(ids, owner) for ids, owner in parts if ids is None or ids]

    @staticmethod
    def _count(parts: list) -> int:
        return sum(owner.n_vis if ids is None else len(ids) for ids, owner in parts)

    def _embed_parts(self, parts: list) -> torch.Tensor:
        return torch.cat([self._embed(ids) if ids is not None else owner.emb.to(self.lm.device, self.lm.dtype)
                          for ids, owner in parts])

    def _append_parts(self, parts: list) -> None:
        for ids, owner in parts:
            self._ledger.append(ids if ids is not None else [self.video_token_id] * owner.n_vis, owner)

    # -- frames ----------------------------------------------------------------------------------
    def prepare(self, frame: object) -> PixelFrame:
        """Validate, resize, normalize and patchify one RGB uint8 HxWx3 frame (``ValueError`` if bad).

        Thread-safe and independent of the stream's state: the live engine runs it where the frame
        arrives, so it never waits in front of other sessions' steps."""
        with torch.inference_mode():
            return self._prep(frame)

    def add_frame(self, frame: np.ndarray | PixelFrame, t: float) -> FrameResult:
        """Preprocess, prune, encode and append one RGB uint8 HxWx3 frame at stream time ``t`` seconds."""
        return self._run(self.begin_frame(frame, t))

    def begin_frame(self, frame: np.ndarray | PixelFrame, t: float) -> Op:
        """The operation of :meth:`add_frame` (a frame from :meth:`prepare` skips preprocessing)."""
        start = time.perf_counter()
        if self._answering:
            raise RuntimeError("an answer is being generated; finish or close it before adding frames")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"t must be a finite number of seconds >= 0, got {t!r}")
        t = float(t)
        if self._last_t is not None and t <= self._last_t:
            raise ValueError(f"timestamps must increase: got t={t} after t={self._last_t}")
        with torch.inference_mode():
            if not isinstance(frame, PixelFrame):
                self.frames_prepared_here += 1
            pf = frame if isinstance(frame, PixelFrame) else self._prep(frame)  # validates the frame
            keep = self._pruner.mask(pf)
            keep_np = keep.cpu().numpy()  # the one device sync of the step
        unit = self._ledger.new_unit(FRAME, t, n_vis=int(keep_np.sum()))
        state = self._snapshot()
        parts = self._pending_part() + self._frame_parts(unit)

        def build(visual: torch.Tensor) -> torch.Tensor:
            unit.emb = visual
            return self._embed_parts(parts)
        try:
            evicted = self._evict(self._plan_room(self._count(parts), f"frame at t={t}"))
            item = yield self._fwd(build, self._count(parts), logits=self.frame_logits, kind="frame",
                                   frame=(pf, keep))
        except BaseException:
            self._restore(state)
            self._rollback()
            raise
        self._pruner.commit(pf, keep)
        if self._store is None:
            unit.emb = None
        self._append_parts(parts)
        self._pending_ids, self._pending_text, self._pending_owner = [], "", None
        # copies: an idle session must not keep a whole step's hidden states or logits alive through a view
        self._last_logits = item.out_logits.clone() if item.out_logits is not None else None
        self._last_hidden = item.hidden.clone() if item.hidden is not None else None
        self._last_event, self._last_t = "frame", t
        self.frames_added += 1
        rows, cols = pf.grid_thw[1] // MERGE, pf.grid_thw[2] // MERGE
        return FrameResult(t=t, tokens_total=pf.num_tokens, tokens_kept=unit.n_vis, cache_len=self.cache_len,
                           keep_mask=keep_np.reshape(rows, cols), ms=(time.perf_counter() - start) * 1e3,
                           evicted_frames=evicted)
