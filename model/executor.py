"""The executor: one step's work of many sessions in one vision call and one packed LLM forward.

A session's model work is a :class:`Forward`: token embeddings to append to its KV sequence
(optionally with one frame to encode first), and whether its last row needs logits. The
executor runs a list of them, possibly chunks of them (``Forward.chunk``), as one step:

1. every frame of the step goes through the vision tower and projector in one call (frames are
   independent attention segments: their grids are passed together);
2. every item's new tokens are packed into one sequence and run through the stock text model
   once. A :class:`~model.kvpool.PackedCache` writes each token's keys at its session's slots and
   hands the attention the keys; each session's queries see only its own keys: per-session SDPA
   on slices of the pool (``segments``), flash-attn's varlen over the gathered keys (``varlen``),
   or one eager call with a block-diagonal causal mask (``masked``);
3. the logits head runs on the rows that need them only, and their argmax is taken for the whole
   step at once (greedy decoding needs no more).

If the packed step fails, each item is run again alone, so a failure costs only the item that
causes it (``Forward.error``); the others' results are committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from . import upstream
from .frames import MERGE, PixelFrame
from .kvpool import KVSeq, PackedCache
from .upstream import sdpa_attention_forward

log = logging.getLogger(__name__)


SEGMENTED = "vl3live_segments"
# The varlen arguments the flash path passes to transformers' flash entry point, by keyword. That entry point
# takes **kwargs, so a name it does not know is swallowed and the call attends across sessions:
# ``vl3live gpu-check`` checks each against the installed transformers.
VARLEN_KEYWORDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def segmented_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, vl3_segments: list | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA per session of a packed step, on each session's own slice of the KV pool.

    Registered with transformers' ``AttentionInterface`` as ``vl3live_segments``; the stock layers
    call it like any attention function. ``vl3_segments`` lists, per session, its query rows
    ``qa:qb``, its key slots ``ka:kb`` in ``key``/``value`` (the whole pool, not a copy) and its
    causal mask (None for one new token). Without segments (any other caller) it is plain SDPA.
    """
    if vl3_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outs = [sdpa_attention_forward(module, query[:, :, qa:qb], key[:, :, ka:kb], value[:, :, ka:kb], mask,
                                   **kwargs)[0] for qa, qb, ka, kb, mask in vl3_segments]
    return torch.cat(outs, dim=1), None


upstream.register_attention(SEGMENTED, segmented_attention)


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
        """``attention``: "segments" (SDPA per session on slices of the pool), "masked" (one call over
        the gathered keys with a block-diagonal mask) or "varlen" (flash-attn over the gathered keys);
        None = varlen with flash_attention_2, segments with SDPA, masked with eager."""
        self.lm = lm
        model = lm.model
        self.text_model = upstream.text_model(model)
        self.cache_kw = upstream.cache_keyword(self.text_model)
        tc = model.config.text_config
        self.layer_types = sorted(set(getattr(tc, "layer_types", None) or ["full_attention"]))
        self.heads = tc.num_attention_heads
        attn = getattr(lm, "attn", "sdpa")
        if attention is None:  # SDPA: per-session attention on slices of the pool (no gather, and no
            # scores across sessions, which at 100+ sessions would not fit a GPU); eager: one masked call
            attention = "varlen" if attn == "flash_attention_2" else "segments" if attn in ("sdpa", SEGMENTED) \
                else "masked"
        if attention not in ("segments", "masked", "varlen"):
            raise ValueError(f"attention must be segments, masked or varlen, got {attention!r}")
        if (attention == "varlen") != (attn == "flash_attention_2") or (attention == "segments" and attn == "eager"):
            raise ValueError(f"attention {attention!r} does not go with the model's {attn!r} attention")
        self.attention = attention
        self.varlen = attention == "varlen"  # flash-attn: varlen over the gathered keys
        self.segmented = attention == "segments"
        if self.segmented:  # (plain SDPA for every other caller: they pass no segments)
            upstream.use_attention(self.text_model, SEGMENTED)
        self.bool_mask = attn != "eager"  # SDPA takes a boolean mask, eager an additive one
        self.steps = 0  # packed forwards run
        self.fallbacks = 0  # packed steps that failed and were re-run item by item

    # -- one step ---------------------------------------------------------------------------------
    def run(self, items: list[Forward]) -> None:
        """Run one step of ``items`` (each its ``chunk`` or all that is left); results go on the items."""
        items = [it for it in items if not it.finished]
        for it in items:
            if it.seq.released:  # never write into slots that may belong to another session now
                it.error = RuntimeError("this session's KV slots were released")
        items = [it for it in items if it.error is None]
        if not items:
            return
        with torch.inference_mode():
            self._vision([it for it in items if it.embeds is None])
            ready = [it for it in items if it.error is None]
            if not ready:
                return
            try:
                self._packed(ready)
            except Exception as exc:  # find the item that fails; the rest are committed
                if len(ready) == 1:
                    ready[0].error = exc
                    return
                self.fallbacks += 1
                log.warning("a packed step of %d items failed (%s); running them one by one", len(ready), exc)
                for it in ready:
                    try:
                        self._packed([it])
                    except Exception as one:
                        it.error = one

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
        rows, writes, reads, qpos, segments, cu_q, cu_k = [], [], [], [], [], [0], [0]
        for it in items:
            start = it.seq.length if it.start is None else it.start
            n = it.left if it.chunk is None else min(it.chunk, it.left)
            lo, hi = start + it.done, start + it.done + n
            rows.append(it.embeds[it.done: it.done + n])
            writes.append(it.seq.slots(lo, hi))
            qpos.append(torch.arange(lo, hi, device=dev))
            if self.segmented:
                mask = None if n == 1 else torch.ones(n, hi, dtype=torch.bool, device=dev).tril(hi - n)[None, None]
                segments.append((cu_q[-1], cu_q[-1] + n, it.seq.base, it.seq.base + hi, mask))
            else:
                reads.append(it.seq.table[:hi])
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + hi)
        positions = torch.cat(qpos)
        pool = items[0].seq.pool
        cache = PackedCache(pool, torch.cat(writes), None if self.segmented else torch.cat(reads))
        kwargs: dict = {"position_ids": positions.unsqueeze(0), "use_cache": True, self.cache_kw: cache}
        if self.segmented:
            kwargs.update(vl3_segments=segments, attention_mask=dict.fromkeys(self.layer_types))
        elif self.varlen:  # flash-attn: per-session lengths, causal within each (bottom-right aligned)
            kwargs["attention_mask"] = dict.fromkeys(self.layer_types)
            kwargs.update(zip(VARLEN_KEYWORDS, (torch.tensor(cu_q, device=dev, dtype=torch.int32),
                                                torch.tensor(cu_k, device=dev, dtype=torch.int32),
                                                max(b - a for a, b in zip(cu_q, cu_q[1:])),
                                                max(b - a for a, b in zip(cu_k, cu_k[1:])))))
        else:  # one call over the gathered keys with a block-diagonal causal mask
            qs = torch.repeat_interleave(torch.arange(len(items), device=dev),
                                         torch.tensor([b - a for a, b in zip(cu_q, cu_q[1:])], device=dev))
            ks = torch.repeat_interleave(torch.arange(len(items), device=dev),
                                         torch.tensor([b - a for a, b in zip(cu_k, cu_k[1:])], device=dev))
            kpos = torch.cat([torch.arange(b - a, device=dev) for a, b in zip(cu_k, cu_k[1:])])
            mask = (qs[:, None] == ks[None, :]) & (kpos[None, :] <= positions[:, None])
            if not self.bool_mask:  # eager adds the mask to the scores
                mask = torch.zeros(mask.shape, dtype=self.lm.dtype, device=dev).masked_fill_(
                    ~mask, torch.finfo(self.lm.dtype).min)
            kwargs["attention_mask"] = dict.fromkeys(self.layer_types, mask[None, None])
        probing = any(it.probe for it in items)
        with upstream.capture_queries(self.text_model) if probing else nullcontext([]) as captured:
            hidden = self.text_model(inputs_embeds=torch.cat(rows).unsqueeze(0), **kwargs).last_hidden_state[0]
        self.steps += 1
        # commit: lengths, last rows, logits only where wanted
        want, ends = [], []
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
                it.hidden = hidden[cu_q[i + 1] - 1]
                if it.probe:
                    it.queries = torch.cat(it._queries)
                if it.logits:
                    want.append(it)
                    ends.append(cu_q[i + 1] - 1)
        if want:
            logits = upstream.lm_head(self.lm.model)(hidden[ends])
            for it, row, best in zip(want, logits, logits.argmax(dim=-1).tolist()):
                it.out_logits, it.greedy = row, best
