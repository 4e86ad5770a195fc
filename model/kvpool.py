"""One KV pool for every session: slots in pages, one contiguous range per session.

The keys and values of all sessions live in one pair of tensors per layer, ``(slots, kv_heads,
head_dim)``, allocated once. Admission (:meth:`KVPool.open`) reserves a session's whole KV budget
(``session.budget.max_tokens``, in whole pages of ``page_size`` slots) as one contiguous range,
so its block table is ``base + position`` and its keys are a slice of the pool: nothing is
copied or re-concatenated per step. A packed forward writes each new token's keys once, at its
slot (:class:`PackedCache`, which plugs into transformers' ``Cache`` interface so the stock layers
run unchanged), and the attention reads each session's slice. Evicting frames moves keys within
the session's own range (:meth:`KVPool.compact`). A pool without a free range for a budget
refuses with :class:`PoolFullError`; a closed session's range returns at :meth:`KVPool.release`
and coalesces with its free neighbours.

Every session reserving its whole budget is what makes admission a guarantee (a session never
runs out of KV mid-stream); it also means one range per session is as good as scattered pages.
A *private* pool (one ``StreamSession`` on its own) grows instead of refusing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kvcache import RopeMover
from .upstream import Cache


class PoolFullError(RuntimeError):
    """The KV pool cannot hold another session's KV budget."""


def bytes_per_token(text_config: object, dtype: torch.dtype) -> int:
    """Bytes of keys and values one cached token takes over all layers."""
    tc = text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


class KVSeq:
    """One session's slots in the pool (a contiguous range: its block table is ``base + position``)
    and how many of its positions hold committed tokens."""

    def __init__(self, pool: KVPool, base: int, reserved: int):
        self.pool = pool
        self.base = base  # first slot
        self.reserved = reserved  # slots reserved (whole pages)
        self.length = 0  # committed tokens (positions 0..length-1)
        self.table = torch.arange(base, base + reserved, device=pool.device)  # slot of each position
        self.released = False

    @property
    def reserved_pages(self) -> int:
        return self.reserved // self.pool.page_size

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Slots of positions ``start..end-1``."""
        self.ensure(end)
        return self.table[start:end]

    def ensure(self, end: int) -> None:
        """Room for positions ``0..end-1`` (a private pool grows; a shared one refuses past the reservation)."""
        if end > self.reserved:
            self.pool.grow_seq(self, end)


@dataclass(frozen=True)
class PoolStats:
    """The pool's size and use (``/metrics`` exports each as ``vl3live_kv_<name>``)."""

    pool_tokens: int  # size in tokens (all sessions share it)
    pool_bytes: int
    bytes_per_token: int  # keys and values, all layers
    page_tokens: int  # the rounding unit of a reservation
    pages_total: int
    pages_reserved: int  # by admitted sessions' budgets
    tokens_used: int  # slots holding tokens now
    sessions: int  # sessions holding a reservation


class KVPool:
    """Keys and values of every session: one contiguous range of pages each (see the module doc)."""

    def __init__(self, text_config: object, tokens: int, device: torch.device | str, dtype: torch.dtype,
                 page_size: int = 16, growable: bool = False):
        if page_size < 1 or tokens < page_size:
            raise ValueError(f"the KV pool needs at least one page of {page_size} tokens, got {tokens} tokens")
        tc = text_config
        self.layers = tc.num_hidden_layers
        self.kv_heads = tc.num_key_value_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.device, self.dtype = torch.device(device), dtype
        self.page_size = page_size
        self.growable = growable
        self.bytes_per_token = bytes_per_token(tc, dtype)
        self.total_pages = tokens // page_size
        shape = (self.total_pages * page_size, self.kv_heads, self.head_dim)
        self.keys = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(self.layers)]
        self.values = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(self.layers)]
        self._free: list[tuple[int, int]] = [(0, self.total_pages)]  # (first page, pages), sorted
        self.seqs: set[KVSeq] = set()

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        return self.total_pages * self.page_size

    @property
    def nbytes(self) -> int:
        return self.tokens * self.bytes_per_token

    @property
    def sessions(self) -> int:
        return len(self.seqs)

    @property
    def reserved_pages(self) -> int:
        return sum(q.reserved_pages for q in self.seqs)

    def pages_for(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.page_size))

    def stats(self) -> PoolStats:
        return PoolStats(pool_tokens=self.tokens, pool_bytes=self.nbytes, bytes_per_token=self.bytes_per_token,
                         page_tokens=self.page_size, pages_total=self.total_pages, pages_reserved=self.reserved_pages,
                         tokens_used=sum(q.length for q in self.seqs), sessions=self.sessions)

    # -- admission --------------------------------------------------------------------------------
    def open(self, budget_tokens: int) -> KVSeq:
        """A new session's sequence with the slots of its whole KV budget reserved (``PoolFullError`` if
        no free range holds them). A private pool reserves what it has and grows on demand."""
        pages = self.pages_for(budget_tokens)
        if self.growable and not self.seqs:
            pages = min(pages, self.total_pages)
        while True:
            for i, (first, n) in enumerate(self._free):
                if n >= pages:
                    self._free[i:i + 1] = [(first + pages, n - pages)] if n > pages else []
                    seq = KVSeq(self, first * self.page_size, pages * self.page_size)
                    self.seqs.add(seq)
                    return seq
            if not self.growable:
                free = sum(n for _, n in self._free)
                raise PoolFullError(
                    f"the KV pool cannot hold another session: its budget of {budget_tokens} tokens needs {pages} "
                    f"pages of {self.page_size} and {free} of {self.total_pages} are free ({self.sessions} "
                    "sessions hold the rest); close a session, lower session.budget.max_tokens, or raise "
                    "engine.kv_pool_tokens")
            self._grow(pages)

    def release(self, seq: KVSeq) -> None:
        """Return ``seq``'s slots to the pool (idempotent)."""
        if seq.released:
            return
        seq.released = True
        self.seqs.discard(seq)
        self._free.append((seq.base // self.page_size, seq.reserved_pages))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for first, n in self._free:  # coalesce neighbours
            if merged and merged[-1][0] + merged[-1][1] == first:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((first, n))
        self._free = merged
        seq.length = 0

    # -- growth (private pools) ------------------------------------------------------------------
    def _grow(self, pages: int) -> None:
        old = self.total_pages
        self.total_pages = max(2 * old, old + pages)
        extra = (self.total_pages - old) * self.page_size
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                store[i] = torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])
        if self._free and sum(self._free[-1]) == old:
            first, n = self._free.pop()
            self._free.append((first, n + self.total_pages - old))
        else:
            self._free.append((old, self.total_pages - old))

    def grow_seq(self, seq: KVSeq, length: int) -> None:
        """Let ``seq`` hold ``length`` positions: a private pool extends its one session's range (it
        starts at slot 0); a shared pool refuses (admission reserved the whole budget)."""
        if seq.released:
            raise RuntimeError("this session's KV slots were released")
        if not self.growable:
            raise RuntimeError(f"a session asked for {length} KV positions, past its reserved {seq.reserved}")
        if self.sessions != 1 or seq.base != 0:
            raise RuntimeError("only a private pool (one session, from slot 0) grows")
        pages = self.pages_for(length)
        if pages > self.total_pages:
            self._grow(pages - self.total_pages)
        self._free = [(pages, self.total_pages - pages)] if self.total_pages > pages else []
        seq.reserved = pages * self.page_size
        seq.table = torch.arange(seq.base, seq.base + seq.reserved, device=self.device)

    def truncate(self, seq: KVSeq, length: int) -> None:
        """Forget positions from ``length`` on."""
        seq.length = min(seq.length, length)

    # -- reads and moves ---------------------------------------------------------------------------
    def layer_keys(self, seq: KVSeq, positions: torch.Tensor) -> list[torch.Tensor]:
        """Keys at ``positions`` per layer, each (kv_heads, n, head_dim) (after RoPE, as cached)."""
        slots = seq.table[positions.to(self.device)]
        return [k.index_select(0, slots).transpose(0, 1) for k in self.keys]

    def compact(self, seq: KVSeq, keep: torch.Tensor, mover: RopeMover) -> None:
        """Keep only positions ``keep`` (sorted), moved to ``0..len(keep)-1`` with their keys re-rotated.

        Tokens before the first removed position do not move; the moved ones are written back into
        the session's own slots."""
        keep = keep.to(self.device)
        n = keep.numel()
        new_pos = torch.arange(n, device=self.device)
        moved = (keep != new_pos).nonzero()
        first = int(moved[0, 0]) if moved.numel() else n
        if first < n:
            src, dst = seq.table[keep[first:]], seq.table[first:n]
            cos, sin = mover.delta(keep[first:], new_pos[first:])
            for k, v in zip(self.keys, self.values):
                moved_k = mover.rotate(k.index_select(0, src).transpose(0, 1), cos, sin).transpose(0, 1)
                moved_v = v.index_select(0, src)
                k.index_copy_(0, dst, moved_k)
                v.index_copy_(0, dst, moved_v)
        seq.length = n


class PackedCache(Cache):
    """The cache one packed forward sees: new tokens are written at ``write`` slots, attention reads
    ``read`` slots (every session's keys, each session's block contiguous). transformers' layers call
    ``update`` per layer; the attention function then gets the gathered keys and values with the
    step's mask (SDPA) or varlen lengths (flash-attn)."""

    def __init__(self, pool: KVPool, write: torch.Tensor, read: torch.Tensor | None):
        self.pool, self.write, self.read = pool, write, read  # read None: attention slices the pool itself
        self.layers = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        k.index_copy_(0, self.write, key_states[0].transpose(0, 1).to(k.dtype))
        v.index_copy_(0, self.write, value_states[0].transpose(0, 1).to(v.dtype))
        if self.read is None:  # no copy: each session's keys are a slice of its own slot range
            return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        return (k.index_select(0, self.read).transpose(0, 1).unsqueeze(0),
                v.index_select(0, self.read).transpose(0, 1).unsqueeze(0))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.read.numel()) if self.read is not None else self.pool.tokens

    def __len__(self) -> int:
        return self.pool.layers


def pool_size(lm: object, budget: int | None, sessions: int, page_tokens: int,
              memory_fraction: float) -> tuple[int, str]:
    """A pool's size in tokens when none is set, and why: room for ``sessions`` sessions at ``budget``
    tokens each (None: the model's positions), and on CUDA at most ``memory_fraction`` of the free GPU
    memory (the smaller of the two)."""
    tc = lm.model.config.text_config
    per = (budget or tc.max_position_embeddings) + page_tokens
    wanted = max(page_tokens, sessions * per)
    why = f"{sessions} sessions x {per} tokens"
    if lm.device.type != "cuda":
        return wanted, why
    free, _ = torch.cuda.mem_get_info(lm.device)
    fits = max(page_tokens, int(free * memory_fraction) // bytes_per_token(tc, lm.dtype))
    room = f"{memory_fraction:g} of the {free / 2**30:.1f} GiB free"
    if fits < wanted:
        return fits, f"{room} (less than {why}: {fits // per} sessions at their budget)"
    return wanted, f"{why} (less than {room})"
