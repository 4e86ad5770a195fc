"""Recall of evicted frames (ReKV-style): keep them in CPU memory, bring back the relevant ones.

An evicted frame is stored as its visual embeddings (what the projector produced, the tokens
that were in the cache) plus the mean of its cached keys before RoPE, per layer and KV head.
Embeddings are 8-9x smaller than the frame's KV blocks (2B: 3 KB vs 28 KB per token), so the
same memory holds that much more history; bringing frames back costs one prefill of at most
``recall_top_k`` frames, and the recalled frames are rendered by the same layout as live ones.

A question is scored against every stored frame through the model's own attention projections:
for each of the question's text tokens, the cosine similarity of its query (before RoPE, per
layer and query head) with the frame's mean key of the matching KV head, averaged over layers
and heads; a frame's score is its best match over the question's tokens, so one telling word
("the *red* car") finds its frame even among many function words.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

# Bookkeeping per stored frame beyond its tensor data (tensor and Python objects, allocator):
# measured at about 1.6 KB with torch 2.14 on Linux, counted against the memory budget.
FRAME_OVERHEAD_BYTES = 2048


@dataclass
class StoredFrame:
    """An evicted frame kept in CPU memory: its stream time and visual embeddings, to bring back into the cache."""

    t: float
    emb: torch.Tensor = field(repr=False)  # (tokens, hidden) on CPU
    nbytes: int = 0


class RecallStore:
    """Evicted frames in time order, within a memory budget (the oldest are dropped past it)."""

    def __init__(self, memory_bytes: int, layers: int, kv_heads: int, head_dim: int):
        self.memory_bytes = int(memory_bytes)
        self.shape = (layers, kv_heads, head_dim)
        self.frames: deque[StoredFrame] = deque()
        # Unit mean keys; rows _start.._end hold frames[0..], oldest first (a deque over a tensor).
        self._keys = torch.empty(0, layers * kv_heads * head_dim)
        self._start = self._end = 0
        self.nbytes = 0
        self.stored = 0  # frames ever stored
        self.dropped = 0  # frames dropped for the memory budget

    def __len__(self) -> int:
        return len(self.frames)

    def add(self, t: float, emb: torch.Tensor, mean_key: torch.Tensor) -> None:
        """Store one evicted frame: its embeddings (tokens, hidden) and mean keys (layers, kv_heads, dim)."""
        key = torch.nn.functional.normalize(mean_key.float().cpu(), dim=-1).reshape(-1)
        emb = emb.detach().to("cpu").clone()  # its own storage, so dropping it frees it
        frame = StoredFrame(t, emb, emb.numel() * emb.element_size() + key.numel() * 4 + FRAME_OVERHEAD_BYTES)
        if self._end == self._keys.shape[0]:
            live = self._end - self._start
            rows = max(64, self._keys.shape[0] if live <= self._keys.shape[0] // 2 else 2 * live)
            moved = torch.empty(rows, key.numel())
            moved[:live] = self._keys[self._start: self._end]
            self._keys, self._start, self._end = moved, 0, live
        self._keys[self._end] = key
        self._end += 1
        self.frames.append(frame)
        self.nbytes += frame.nbytes
        self.stored += 1
        self._drop_to_budget()

    def _drop_to_budget(self) -> None:
        while self.nbytes > self.memory_bytes and self.frames:
            self.nbytes -= self.frames.popleft().nbytes
            self._start += 1
            self.dropped += 1

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """Relevance of each stored frame to question queries (tokens, layers, heads, head_dim): (len,) in [-1, 1]."""
        layers, kv_heads, dim = self.shape
        tokens, heads = queries.shape[0], queries.shape[2]
        q = torch.nn.functional.normalize(queries.float().cpu(), dim=-1)
        q = q.view(tokens, layers, kv_heads, heads // kv_heads, dim).sum(3).reshape(tokens, -1)
        per_token = self._keys[self._start: self._end] @ q.T / (layers * heads)  # (frames, tokens)
        return per_token.max(dim=1).values

    def top(self, queries: torch.Tensor, k: int) -> list[StoredFrame]:
        """The ``k`` most relevant frames, in time order."""
        if not self.frames or k < 1:
            return []
        best = torch.topk(self.scores(queries), min(k, len(self.frames))).indices.sort().values
        return [self.frames[i] for i in best.tolist()]
