"""The executor: one step's work of many sessions in one vision call and one packed LLM forward.

A session's model work is a :class:`Forward`: token embeddings to append to its KV sequence
(optionally with one frame to encode first), and whether its last row needs logits. The
executor runs a list of them, possibly chunks of them (``Forward.chunk``), as one step:

1. every frame of the step goes through the vision tower and projector in one call (frames are
   independent attention segments: their grids are passed together);
2. every item's new tokens are packed into one sequence and run through the stock text model
   once. A :class:`~model.kvpool.PackedCache` writes each token's keys at its session's slots and
   hands the attention the keys; each session's queries see only its own keys: one FlexAttention
   call per layer over the pool with a block mask of the sessions' slot ranges (``flex``, CPU),
   per-session SDPA on slices of the pool (``segments``, the reference), flash-attn's varlen over
   the gathered keys (``varlen``), or one eager call with a block-diagonal causal mask (``masked``);
   positions, slots and masks are built for the whole step with a few tensor ops;
3. the logits head runs on the rows that need them only, and their argmax is taken for the whole
   step at once (greedy decoding needs no more).

If the packed step fails, each item is run again alone, so a failure costs only the item that
causes it (``Forward.error``); the others' results are committed. Out of memory, the allocator's cache
is freed before that. A sticky device error (a device-side assert, an illegal address: the CUDA context
is unusable from then on) fails every item of the step and every later one (:attr:`Executor.fault`):
whoever runs the executor must stop serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from . import upstream
from .attention import KV_BLOCK, PAGED_PAGE, POOL_ATTENTION, FlexPlan, PagedPlan, warm_up
from .frames import MERGE, PixelFrame
from .kvpool import KVPool, KVSeq, PackedCache

log = logging.getLogger(__name__)


# The varlen arguments the flash path passes to transformers' flash entry point, by keyword. That entry point
# takes **kwargs, so a name it does not know is swallowed and the call attends across sessions:
# ``vl3live gpu-check`` and a test check each against the installed transformers.
VARLEN_KEYWORDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
ATTENTIONS = ("flex", "paged", "segments", "masked", "varlen")
HEAD_COPY_LIMIT = 512 * 2**20  # the largest logits-head weight copied transposed on CPU (Executor._logits)
# what a CUDA error that poisons the context says (every later call fails too)
STICKY_ERRORS = ("device-side assert", "illegal memory access", "illegal instruction", "misaligned address",
                 "unspecified launch failure", "uncorrectable ECC error", "CUBLAS_STATUS_EXECUTION_FAILED")


class DeviceFault(RuntimeError):
    """The device hit a sticky error: nothing more runs on it in this process."""


def is_sticky(exc: BaseException) -> bool:
    """Whether ``exc`` is a device error that leaves the device unusable (see :data:`STICKY_ERRORS`)."""
    return isinstance(exc, RuntimeError) and not isinstance(exc, torch.OutOfMemoryError) and \
        any(s in str(exc) for s in STICKY_ERRORS)


def free_memory(device: torch.device) -> None:
    """Return the allocator's cached blocks (before re-running a step that ran out of memory)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def default_attention(lm: object) -> str:
    """The attention path an executor takes when none is named (see :class:`Executor`): varlen with
    flash-attn, masked with eager, else segments. On CPU, flex (one call per layer) measured slower than
    per-session SDPA at every size (README "Attention per step"): a CPU SDPA call costs microseconds of
    Python, and ATen's CPU flash kernel outruns inductor's flex template, so the loop stays the default."""
    attn = getattr(lm, "attn", "sdpa")
    return "varlen" if attn == "flash_attention_2" else "masked" if attn == "eager" else "segments"


@dataclass(eq=False)
class Forward:
    """Tokens one session appends to its KV sequence (or, with ``probe``, runs without keeping)."""

    seq: KVSeq
    tokens: int  # rows of the embeddings ``build`` returns
    build: Callable[[torch.Tensor | None], torch.Tensor]  # (visual embeddings or None) -> (tokens, H)
    logits: bool = True  # the last row's logits are wanted
    probe: bool = False  # capture the queries (recall) and keep nothing in the cache
    frame: tuple[PixelFrame, torch.Tensor] | None = None  # (pixels, DiffFP keep mask) to encode first
    kind: str = "prefill"  # decode | frame | prefill (what the scheduler orders by)
    chunk: int | None = None  # rows to run this step (None: all that are left)
    # results
    done: int = 0  # rows run so far
    start: int | None = None  # the sequence length when the first chunk ran
    embeds: torch.Tensor | None = field(default=None, repr=False)
    hidden: torch.Tensor | None = field(default=None, repr=False)  # last row's final hidden state (H,)
    out_logits: torch.Tensor | None = field(default=None, repr=False)  # (V,) when ``logits``
    greedy: int | None = None  # the argmax of ``out_logits`` (taken for the whole step at once)
    queries: torch.Tensor | None = field(default=None, repr=False)  # probe: (tokens, layers, heads, head_dim)
    error: BaseException | None = None
    _queries: list = field(default_factory=list, repr=False)

    @property
    def left(self) -> int:
        return self.tokens - self.done

    @property
    def finished(self) -> bool:
        return self.error is not None or self.done >= self.tokens


class Executor:
    """Runs :class:`Forward` items of any sessions sharing one model and one KV pool."""

    def __init__(self, lm: object, attention: str | None = None):
        """``attention`` (see :mod:`model.attention`): "flex" (one FlexAttention call per layer over the
        pool, CPU), "paged" (one flash varlen call per layer over the pool's pages, CUDA), "segments"
        (SDPA per session on slices of the pool), "masked" (one call over the
        gathered keys with a block-diagonal mask; eager models) or "varlen" (flash-attn over the gathered
        keys). None: :func:`default_attention`."""
        self.lm = lm
        model = lm.model
        self.text_model = upstream.text_model(model)
        self.cache_kw = upstream.cache_keyword(self.text_model)
        tc = model.config.text_config
        self.layer_types = sorted(set(getattr(tc, "layer_types", None) or ["full_attention"]))
        self.heads = tc.num_attention_heads
        attn = getattr(lm, "attn", "sdpa")
        attention = attention or default_attention(lm)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        if (attention == "varlen" and attn != "flash_attention_2") or (attention in ("segments", "flex", "paged")
                                                                        and attn == "eager"):
            raise ValueError(f"attention {attention!r} does not go with the model's {attn!r} attention")
        if attention == "flex" and lm.device.type != "cpu":
            raise ValueError("attention 'flex' runs on CPU (inductor's GPU template does not take its query "
                             "layout); use paged, segments or varlen on a GPU")
        if attention == "paged" and (lm.device.type != "cuda" or lm.dtype not in (torch.float16, torch.bfloat16)):
            raise ValueError("attention 'paged' is flash's paged varlen kernel: CUDA, float16 or bfloat16")
        self.attention = attention
        self.varlen = attention == "varlen"  # flash-attn: varlen over the gathered keys
        self.segmented = attention == "segments"
        self.flex = attention == "flex"
        self.paged = attention == "paged"
        if self.segmented or self.flex or self.paged:  # (plain SDPA for every other caller: they pass no segments or plan)
            upstream.use_attention(self.text_model, POOL_ATTENTION)
        self.bool_mask = attn != "eager"  # SDPA takes a boolean mask, eager an additive one
        self.steps = 0  # packed forwards run
        self.fallbacks = 0  # packed steps that failed and were re-run item by item
        self.oom_retries = 0  # of those, the ones that ran out of memory (the cache was freed first)
        self.fault: BaseException | None = None  # a sticky device error: every later run fails at once
        self._head_t: torch.Tensor | None = None  # CPU: the logits head's weight, transposed (``_logits``)
        self._head_key: tuple | None = None

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        """The logits head on ``rows``. On CPU through a transposed copy of its weight (made once, again
        if the weight changes): a (vocab, hidden) weight read transposed is 1.6x slower in the GEMM, and
        the head is most of a small model's decode step."""
        head = upstream.lm_head(self.lm.model)
        weight = getattr(head, "weight", None)
        if rows.device.type != "cpu" or not isinstance(weight, torch.Tensor) or weight.dtype != rows.dtype \
                or getattr(head, "bias", None) is not None or type(head) is not torch.nn.Linear \
                or weight.numel() * weight.element_size() > HEAD_COPY_LIMIT:
            return head(rows)
        key = (weight.data_ptr(), weight._version)
        if self._head_key != key:
            self._head_t, self._head_key = weight.detach().t().contiguous(), key
        return rows @ self._head_t

    def warm_up(self, pool: KVPool) -> float:
        """Compile what the first step would (flex: its kernels); seconds taken."""
        if not self.flex:
            return 0.0
        attn = upstream.decoder_layers(self.lm.model)[0].self_attn
        return warm_up(pool, self.heads, attn.scaling)

    # -- one step ---------------------------------------------------------------------------------
    def run(self, items: list[Forward]) -> None:
        """Run one step of ``items`` (each its ``chunk`` or all that is left); results go on the items."""
        items = [it for it in items if not it.finished]
        for it in items:
            if it.seq.released:  # never write into slots that may belong to another session now
                it.error = RuntimeError("this session's KV slots were released")
        items = [it for it in items if it.error is None]
        if not items or self._faulted(items):
            return
        with torch.inference_mode():
            self._vision([it for it in items if it.embeds is None])
            if self._faulted(items, *(it.error for it in items)):
                return
            ready = [it for it in items if it.error is None]
            if not ready:
                return
            try:
                self._packed(ready)
            except Exception as exc:  # find the item that fails; the rest are committed
                if self._faulted(ready, exc):
                    return
                if isinstance(exc, torch.OutOfMemoryError):
                    self.oom_retries += 1
                    free_memory(self.lm.device)
                if len(ready) == 1:
                    ready[0].error = exc
                    return
                self.fallbacks += 1
                log.warning("a packed step of %d items failed (%s); running them one by one", len(ready), exc)
                for it in ready:
                    try:
                        self._packed([it])
                    except Exception as one:
                        if self._faulted(ready, one):
                            return
                        it.error = one

    def _faulted(self, items: list[Forward], *errors: BaseException | None) -> bool:
        """Whether the device is gone (now or before): then every item of the step fails with it."""
        if self.fault is None:
            sticky = next((e for e in errors if e is not None and is_sticky(e)), None)
            if sticky is None:
                return False
            self.fault = sticky
            log.critical("the device failed, nothing more runs on it: %s", sticky)
        for it in items:
            if not it.finished:
                it.error = DeviceFault(f"the device failed: {self.fault}")
        return True

    def _vision(self, items: list[Forward]) -> None:
        """Encode every frame of the step in one call, then build each item's embeddings."""
        framed = [it for it in items if it.frame is not None]
        visual: dict[int, torch.Tensor] = {}
        if framed:
            try:
                outs = self.encode_frames([it.frame for it in framed])
            except Exception:  # one by one: only the frame that fails loses its step
                outs = []
                for it in framed:
                    try:
                        outs.append(self.encode_frames([it.frame])[0])
                    except Exception as exc:
                        it.error = exc
                        outs.append(None)
            visual = {id(it): o for it, o in zip(framed, outs)}
        for it in items:
            if it.error is not None:
                continue
            try:
                emb = it.build(visual.get(id(it)))
                if emb.shape[0] != it.tokens:
                    raise RuntimeError(f"a step item built {emb.shape[0]} rows for {it.tokens} tokens")
                it.embeds = emb.to(self.lm.dtype)
            except Exception as exc:
                it.error = exc

    def encode_frames(self, frames: list[tuple[PixelFrame, torch.Tensor]]) -> list[torch.Tensor]:
        """Vision tower + projector on frames; each frame's kept tokens (K_i, H)."""
        m = self.lm.model.model
        dev = self.lm.device
        out = m.get_video_features(
            pixel_values_videos=torch.cat([pf.pixel_values for pf, _ in frames]).to(dev, self.lm.dtype),
            video_grid_thw=torch.tensor([pf.grid_thw for pf, _ in frames], device=dev),
            video_merge_sizes=torch.tensor([MERGE] * len(frames), device=dev),
        )
        return [emb[keep.to(emb.device)] for emb, (_, keep) in zip(out.pooler_output, frames)]

    def _packed(self, items: list[Forward]) -> None:
        dev = self.lm.device
        # per item, Python ints only: first position, rows, first slot (a session's slot of position p is
        # base + p: its range is contiguous); the step's tensors are then built with a few ops in all
        los, ns, bases, rows = [], [], [], []
        for it in items:
            start = it.seq.length if it.start is None else it.start
            n = it.left if it.chunk is None else min(it.chunk, it.left)
            lo = start + it.done
            it.seq.ensure(lo + n)
            los.append(lo)
            ns.append(n)
            bases.append(it.seq.base)
            rows.append(it.embeds[it.done: it.done + n])
        cu_q = [0]
        for n in ns:
            cu_q.append(cu_q[-1] + n)
        total = cu_q[-1]
        per_item = torch.tensor([los, ns, bases, cu_q[:-1]], dtype=torch.int64).to(dev, non_blocking=True)
        item_lo, item_n, item_base, item_off = per_item
        which = torch.repeat_interleave(torch.arange(len(items), device=dev), item_n, output_size=total)
        within = torch.arange(total, device=dev) - item_off[which]  # each row's index in its item
        positions = item_lo[which] + within
        pool = items[0].seq.pool
        writes = item_base[which] + positions
        reads = None
        max_q, max_k = max(ns), max(lo + n for lo, n in zip(los, ns))
        kwargs: dict = {"position_ids": positions.unsqueeze(0), "use_cache": True}
        if self.paged:
            if pool.page_size % PAGED_PAGE:
                raise RuntimeError(f"attention 'paged' needs KV pages of a multiple of {PAGED_PAGE} tokens, the "
                                   f"pool has {pool.page_size} (engine.kv_page_tokens)")
            kwargs.update(vl3_paged=PagedPlan.build(item_n, item_lo, item_base, max_q, max_k, pool.page_size,
                                                    pool.total_pages),
                          attention_mask=dict.fromkeys(self.layer_types))
        elif self.flex:
            spans = max((b + lo + n - 1) // KV_BLOCK - b // KV_BLOCK + 1 for lo, n, b in zip(los, ns, bases))
            kwargs.update(vl3_flex=FlexPlan.build(item_n, item_lo, item_base, which * max_q + within, max_q, spans,
                                                  pool.tokens),
                          attention_mask=dict.fromkeys(self.layer_types))
        elif self.segmented:  # the reference: a causal mask per session
            segments = []
            for i, (lo, n, base) in enumerate(zip(los, ns, bases)):
                hi = lo + n
                mask = None if n == 1 else torch.ones(n, hi, dtype=torch.bool, device=dev).tril(hi - n)[None, None]
                segments.append((cu_q[i], cu_q[i + 1], base, base + hi, mask))
            kwargs.update(vl3_segments=segments, attention_mask=dict.fromkeys(self.layer_types))
        else:  # the gathered keys of each session, one after another
            lens = item_lo + item_n
            cu_k = torch.zeros(len(items) + 1, dtype=torch.int64, device=dev)
            torch.cumsum(lens, 0, out=cu_k[1:])
            kitem = torch.repeat_interleave(torch.arange(len(items), device=dev), lens)
            kpos = torch.arange(kitem.numel(), device=dev) - cu_k[kitem]
            reads = item_base[kitem] + kpos
            if self.varlen:  # flash-attn: per-session lengths, causal within each (bottom-right aligned)
                kwargs["attention_mask"] = dict.fromkeys(self.layer_types)
                kwargs.update(zip(VARLEN_KEYWORDS, (torch.tensor(cu_q, device=dev, dtype=torch.int32),
                                                    cu_k.to(torch.int32), max_q, max_k)))
            else:  # one call with a block-diagonal causal mask
                mask = (which[:, None] == kitem[None, :]) & (kpos[None, :] <= positions[:, None])
                if not self.bool_mask:  # eager adds the mask to the scores
                    mask = torch.zeros(mask.shape, dtype=self.lm.dtype, device=dev).masked_fill_(
                        ~mask, torch.finfo(self.lm.dtype).min)
                kwargs["attention_mask"] = dict.fromkeys(self.layer_types, mask[None, None])
        kwargs[self.cache_kw] = PackedCache(pool, writes, reads)
        probing = any(it.probe for it in items)
        with upstream.capture_queries(self.text_model) if probing else nullcontext([]) as captured:
            hidden = self.text_model(inputs_embeds=torch.cat(rows).unsqueeze(0), **kwargs).last_hidden_state[0]
        self.steps += 1
        # commit: lengths, last rows (a copy of those rows, not a view of the step's), logits only where wanted
        finished, want = [], []
        for i, it in enumerate(items):
            n = cu_q[i + 1] - cu_q[i]
            if it.start is None:
                it.start = it.seq.length
            if it.probe:
                it._queries.append(torch.stack([q[cu_q[i]: cu_q[i + 1]].view(n, self.heads, -1).float()
                                                for q in captured], dim=1))
            it.done += n
            if not it.probe:
                it.seq.length = it.start + it.done
            if it.done >= it.tokens:
                if it.probe:
                    it.queries = torch.cat(it._queries)
                if it.logits:
                    want.append(len(finished))
                finished.append((it, cu_q[i + 1] - 1))
        if not finished:
            return
        last = hidden[[row for _, row in finished]]
        for (it, _), h in zip(finished, last):
            it.hidden = h
        if want:
            logits = self._logits(last[want])
            # max(dim).indices is argmax (the first maximum, as documented) at under half of argmax's CPU time
            for j, row, best in zip(want, logits, logits.max(dim=-1).indices.tolist()):
                it = finished[j][0]
                it.out_logits, it.greedy = row, best
