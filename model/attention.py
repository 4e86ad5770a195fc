"""Attention over the KV pool for a packed step: one call per layer for every session of the step.

A packed step's queries are the rows of every scheduled session, one after another; each session's keys
are a contiguous range of the pool (:mod:`model.kvpool`): slots ``base .. base + end``. Each query row
sees the keys of its own session up to its own position, nothing else. Three ways to compute that, all
registered as one transformers attention function (``vl3live_pool``) that the stock layers call:

* ``flex`` (:class:`FlexPlan`, the default on CPU): one FlexAttention call per layer over the whole pool,
  with a block mask built from the sessions' slot ranges: each query row lists only the key blocks of its
  own session, so the work is the sum of the sessions' lengths and nothing is copied (grouped-query
  attention reads each key head once, ``enable_gqa``). FlexAttention is compiled (inductor's C++ kernel
  on CPU) once per process; its first call takes seconds (15 s cold, 1-3 s from inductor's disk cache).
  Query blocks are one row, which is what lets rows of different sessions share a call: inductor's CPU
  template takes that, its GPU (Triton) template does not, so CUDA uses the next two.
* ``segments``: SDPA per session on its slice of the pool (a Python loop: one call per session per
  layer). The reference the others are tested against, and the path of a lone ``StreamSession`` (one
  session: one call per layer).
* without either (any other caller): plain SDPA.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from . import upstream
from .upstream import sdpa_attention_forward

POOL_ATTENTION = "vl3live_pool"
KV_BLOCK = 128  # keys per block of the flex block mask

_compiled = None
_compile_lock = threading.Lock()
calls = {"flex": 0, "segments": 0}  # attention calls made (tests count them per step)


def compiled_flex():
    """FlexAttention, compiled once per process (dynamic shapes: one kernel for every step's size)."""
    global _compiled
    with _compile_lock:
        if _compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled


@dataclass
class FlexPlan:
    """One step's block mask over the pool: built once per step (a few tensor ops), used by every layer."""

    block_mask: object

    @staticmethod
    def build(kstart: torch.Tensor, qpos: torch.Tensor, pool_tokens: int) -> FlexPlan:
        """``kstart[r]``: the first slot of row r's session; ``qpos[r]``: row r's position (it sees slots
        ``kstart[r] .. kstart[r] + qpos[r]``). Both (rows,) int64 on the pool's device."""
        from torch.nn.attention.flex_attention import BlockMask

        rows = kstart.numel()
        blocks = -(-pool_tokens // KV_BLOCK)
        first = kstart // KV_BLOCK
        count = ((kstart + qpos) // KV_BLOCK - first + 1).to(torch.int32)
        # the kernel wants a row of every block per query block; only the first ``count`` are read
        indices = (first.to(torch.int32)[:, None] + torch.arange(blocks, dtype=torch.int32, device=kstart.device))
        indices.clamp_(max=blocks - 1)

        def mask_mod(b, h, q, k):
            return (k >= kstart[q]) & (k <= kstart[q] + qpos[q])
        bm = BlockMask.from_kv_blocks(count[None, None], indices[None, None], BLOCK_SIZE=(1, KV_BLOCK),
                                      mask_mod=mask_mod, seq_lengths=(rows, pool_tokens), compute_q_blocks=False)
        return FlexPlan(bm)


def pool_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, vl3_segments: list | None = None,
                   vl3_flex: FlexPlan | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention the stock layers call (``vl3live_pool``); see the module doc.

    ``key``/``value`` are the whole pool, ``(1, kv_heads, slots, head_dim)``, not a copy. ``vl3_flex``:
    one FlexAttention call with the step's block mask. ``vl3_segments``: per session, its query rows
    ``qa:qb``, its key slots ``ka:kb`` and its causal mask (None for one new token)."""
    if vl3_flex is not None:
        calls["flex"] += 1
        out = compiled_flex()(query, key, value, block_mask=vl3_flex.block_mask,
                              scale=kwargs.get("scaling"), enable_gqa=True)
        return out.transpose(1, 2), None
    if vl3_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    calls["segments"] += 1
    outs = [sdpa_attention_forward(module, query[:, :, qa:qb], key[:, :, ka:kb], value[:, :, ka:kb], mask,
                                   **kwargs)[0] for qa, qb, ka, kb, mask in vl3_segments]
    return torch.cat(outs, dim=1), None


upstream.register_attention(POOL_ATTENTION, pool_attention)
