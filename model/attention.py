"""Attention over the KV pool for a packed step: one call per layer for every session of the step.

A packed step's queries are the rows of every scheduled session, one after another; each session's keys
are a contiguous range of the pool (:mod:`model.kvpool`): slots ``base .. base + end``. Each query row
sees the keys of its own session up to its own position, nothing else. The ways to compute that, all
registered as one transformers attention function (``vl3live_pool``) that the stock layers call
(``engine.attention`` picks; README "Executor" has the figures behind the default):

* ``flex`` (:class:`FlexPlan`, CPU): one FlexAttention call per layer. The step's sessions are its batch
  (queries padded to the step's longest), the whole pool is the keys (broadcast over the batch, each key
  head read once: ``enable_gqa``), and a block mask built from the sessions' slot ranges lists only each
  session's own key blocks, so nothing is copied and the work follows the sessions' lengths. It is
  compiled (inductor's C++ template) into two kernels at engine start (:func:`warm_up`: 10-15 s cold,
  1-3 s from inductor's disk cache). Inductor's GPU template does not take this query layout. On this
  project's CPU machine it measured slower than ``segments`` (ATen's CPU flash kernel is faster, and a
  CPU SDPA call costs microseconds), so it is not the default.
* ``paged`` (CUDA): one call per layer of torch's flash varlen kernel (``torch.nn.attention.varlen``)
  reading the pool as pages through a block table (each session's pages are consecutive: its range),
  with per-session key lengths and bottom-right causal masking; flash's paged KV takes pages of a
  multiple of 256 tokens (``PAGED_PAGE``), so an engine on this path uses such pages. Not yet run on a
  GPU by this project: its test (``tests/test_gpu_paths.py``) carries the gpu marker.
* ``segments`` (the default with SDPA): SDPA per session on its slice of the pool (a Python loop: one
  call per session per layer). The reference the others are tested against; for a lone
  ``StreamSession`` it is one call per layer.
* without either (any other caller): plain SDPA.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from . import upstream
from .upstream import sdpa_attention_forward

POOL_ATTENTION = "vl3live_pool"
KV_BLOCK = 128  # keys per block of the flex block mask
PAGED_PAGE = 256  # the page size flash's paged KV takes (a multiple of 256 tokens)
Q_BLOCK = 32  # query rows per block (a decode row is padded to one block's work in a step with longer items)

_compiled = None
_compile_lock = threading.Lock()
calls = {"flex": 0, "paged": 0, "segments": 0}  # attention calls made (tests count them per step)


def compiled_flex():
    """FlexAttention, compiled once per process (dynamic shapes: one kernel for every step's size)."""
    global _compiled
    with _compile_lock:
        if _compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            # a kernel for decode-only steps, one for the rest, per dtype; the rest of dynamo's limit is headroom
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
            _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled


@dataclass
class FlexPlan:
    """One step's FlexAttention layout, built once per step (a few tensor ops) and used by every layer.

    The step's sessions are FlexAttention's batch: queries ``(sessions, heads, rows, head_dim)`` with each
    session's rows padded to the step's longest (a copy of the queries, never of the keys),
    keys and values the whole pool ``(1, kv_heads, slots, head_dim)`` broadcast over the batch. The block
    mask lists, per session and block of ``Q_BLOCK`` query rows, the key blocks of that session's range up
    to the block's last position; ``mask_mod`` cuts the exact range, the causal edge and the padding."""

    block_mask: object
    sessions: int  # the batch (at least 2: a lone session gets an empty one beside it)
    rows: int  # the longest session's rows this step (every session's queries are padded to it)
    dest: torch.Tensor  # where each packed query row goes in the padded (sessions x rows)

    @staticmethod
    def build(n: torch.Tensor, lo: torch.Tensor, base: torch.Tensor, dest: torch.Tensor, rows: int,
              max_blocks: int, pool_tokens: int) -> FlexPlan:
        """Per session (int64 tensors on the pool's device): ``n`` query rows from position ``lo``, keys from
        slot ``base`` (position p at slot base + p). ``dest``: each packed row's index in the padded layout;
        ``max_blocks``: the most key blocks any session spans (a host int, so nothing waits on the device)."""
        from torch.nn.attention.flex_attention import BlockMask

        sessions, dev = n.numel(), n.device
        if sessions == 1:  # a batch of at least 2 and 2 query blocks: sizes 1 would each compile a kernel
            n, lo, base = (torch.cat([x, x.new_zeros(1)]) for x in (n, lo, base))  # (an empty session)
        batch, max_blocks = n.numel(), max(2, max_blocks)
        q_blocks, kv_blocks = max(2, -(-rows // Q_BLOCK)), -(-pool_tokens // KV_BLOCK)
        j = torch.arange(q_blocks, device=dev)[None]
        last = torch.minimum((j + 1) * Q_BLOCK, n[:, None]) - 1  # each query block's last real row
        first = base // KV_BLOCK
        count = torch.where(j * Q_BLOCK < n[:, None],
                            (base[:, None] + lo[:, None] + last) // KV_BLOCK - first[:, None] + 1, 0)
        # a session's key blocks are first, first + 1, ...: one row per session, shared by its query blocks
        # (stride 0), and the kernel's full-width rows read past it into the next (never beyond ``count``)
        buf = torch.zeros(batch * max_blocks + kv_blocks, dtype=torch.int32, device=dev)
        buf[:batch * max_blocks].view(batch, max_blocks).copy_(first[:, None] + torch.arange(max_blocks, device=dev))
        indices = buf.as_strided((batch, 1, q_blocks, kv_blocks), (max_blocks, 0, 0, 1))
        base = base.clone()  # its own storage: a view's offset would be guarded (a kernel per offset)
        top = base + lo  # row q of session b sees slots base[b] .. top[b] + q (padding rows see more:
        # their output is dropped; a mask on them trips inductor's C++ codegen with dynamic shapes)

        def mask_mod(b, h, q, k):
            return (k >= base[b]) & (k <= top[b] + q)
        bm = BlockMask.from_kv_blocks(count.to(torch.int32)[:, None], indices, BLOCK_SIZE=(Q_BLOCK, KV_BLOCK),
                                      mask_mod=mask_mod, seq_lengths=(rows, pool_tokens), compute_q_blocks=False)
        return FlexPlan(bm, batch, rows, dest)

    def pad(self, query: torch.Tensor) -> torch.Tensor:
        """Packed ``(1, heads, total, head_dim)`` -> ``(sessions, heads, rows, head_dim)``."""
        q = query[0]  # (a copy of the queries even for one row each: one memory layout, one compiled kernel)
        heads, _, dim = q.shape
        out = q.new_zeros(heads, self.sessions * self.rows, dim)
        out[:, self.dest] = q
        return out.view(heads, self.sessions, self.rows, dim).transpose(0, 1)

    def unpad(self, out: torch.Tensor) -> torch.Tensor:
        """``(sessions, heads, rows, head_dim)`` -> packed ``(1, total, heads, head_dim)``."""
        heads, dim = out.shape[1], out.shape[3]
        return out.transpose(0, 1).reshape(heads, self.sessions * self.rows, dim)[:, self.dest].transpose(0, 1)[None]


@dataclass
class PagedPlan:
    """One step's varlen layout over the paged pool (built once per step, used by every layer)."""

    cu_q: torch.Tensor  # (sessions + 1,) int32: where each session's query rows start in the packed step
    cu_k: torch.Tensor  # (sessions + 1,) int32: cumulative key lengths
    lengths: torch.Tensor  # (sessions,) int32: keys each session's last row sees (``seqused_k``)
    table: torch.Tensor  # (sessions, pages) int32: each session's pages, in order
    max_q: int
    max_k: int
    page: int

    @staticmethod
    def build(n: torch.Tensor, lo: torch.Tensor, base: torch.Tensor, max_q: int, max_k: int,
              page: int, pool_pages: int | None = None) -> PagedPlan:
        """Per session (int64 on the pool's device): ``n`` query rows from position ``lo``, keys from slot
        ``base`` (a multiple of ``page``); ``max_q``/``max_k`` as host ints; table entries past a session's
        keys (never read) are kept inside the pool's ``pool_pages``."""
        lengths = (lo + n).to(torch.int32)
        zero = torch.zeros(1, dtype=torch.int32, device=n.device)
        cu_q = torch.cat([zero, torch.cumsum(n, 0).to(torch.int32)])
        cu_k = torch.cat([zero, torch.cumsum(lengths, 0).to(torch.int32)])
        pages = -(-max_k // page)
        table = (base // page)[:, None] + torch.arange(pages, device=n.device)[None]
        if pool_pages is not None:
            table = table.clamp_(max=pool_pages - 1)
        return PagedPlan(cu_q, cu_k, lengths, table.to(torch.int32), max_q, max_k, page)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None):
        from torch.nn.attention.varlen import varlen_attn

        slots, kv_heads, dim = key.shape[2], key.shape[1], key.shape[3]
        k = key[0].transpose(0, 1).reshape(slots // self.page, self.page, kv_heads, dim)  # views of the pool
        v = value[0].transpose(0, 1).reshape(slots // self.page, self.page, kv_heads, dim)
        out = varlen_attn(query[0].transpose(0, 1), k, v, self.cu_q, self.cu_k, self.max_q, self.max_k,
                          scale=scale, window_size=(-1, 0), enable_gqa=True, seqused_k=self.lengths,
                          block_table=self.table)
        return out.unsqueeze(0)  # (1, rows, heads, head_dim)


def warm_up(pool: object, heads: int, scale: float) -> float:
    """Compile FlexAttention's two kernels for ``pool`` (decode-only steps, and the rest) before the first
    step needs them, so no frame waits on the compiler; seconds taken (about 0 once done in this process)."""
    started = time.perf_counter()
    dev = pool.device
    key = pool.keys[0].transpose(0, 1).unsqueeze(0)
    value = pool.values[0].transpose(0, 1).unsqueeze(0)
    one = torch.ones(1, dtype=torch.int64, device=dev)
    for rows in (1, 2):
        plan = FlexPlan.build(one * rows, one * 0, one * 0, torch.arange(rows, device=dev), rows, 2, pool.tokens)
        query = torch.zeros(1, heads, rows, pool.head_dim, dtype=pool.dtype, device=dev)
        with torch.inference_mode():
            compiled_flex()(plan.pad(query), key, value, block_mask=plan.block_mask, scale=scale, enable_gqa=True)
    return time.perf_counter() - started


def pool_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, vl3_segments: list | None = None,
                   vl3_flex: FlexPlan | None = None, vl3_paged: PagedPlan | None = None,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """The attention the stock layers call (``vl3live_pool``); see the module doc.

    ``key``/``value`` are the whole pool, ``(1, kv_heads, slots, head_dim)``, not a copy. ``vl3_flex``:
    one FlexAttention call with the step's block mask. ``vl3_segments``: per session, its query rows
    ``qa:qb``, its key slots ``ka:kb`` and its causal mask (None for one new token)."""
    if vl3_paged is not None:
        calls["paged"] += 1
        return vl3_paged.attend(query, key, value, kwargs.get("scaling")), None
    if vl3_flex is not None:
        calls["flex"] += 1
        out = compiled_flex()(vl3_flex.pad(query), key, value, block_mask=vl3_flex.block_mask,
                              scale=kwargs.get("scaling"), enable_gqa=True)
        return vl3_flex.unpad(out), None
    if vl3_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    calls["segments"] += 1
    outs = [sdpa_attention_forward(module, query[:, :, qa:qb], key[:, :, ka:kb], value[:, :, ka:kb], mask,
                                   **kwargs)[0] for qa, qb, ka, kb, mask in vl3_segments]
    return torch.cat(outs, dim=1), None


upstream.register_attention(POOL_ATTENTION, pool_attention)
