"""What is in the KV cache, token by token, and which of it the KV budget may evict.

Every cached token belongs to a *unit*: the sink (the system prompt), a frame (its timestamp
text and visual tokens, plus the separator that joins the next frame of the same user turn), or
an exchange (a question, its answer and the turn text around them). :class:`KVBudget` evicts
whole units, oldest first, from between the sink and the recent window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .config import BudgetConfig

SINK, FRAME, EXCHANGE = "sink", "frame", "exchange"


class CacheLimitError(RuntimeError):
    """The KV cache would grow past its limit (the model's trained positions, the config's cap or budget)."""


@dataclass
class Unit:
    """What owns a run of cache positions: the system prompt (sink), one frame, or one question-and-answer
    exchange."""

    uid: int
    kind: str
    t: float  # stream time: the frame's timestamp, or the last frame's time when a question came
    complete: bool = True  # an exchange whose answer is still open is not evictable
    recalled: bool = False  # brought back from the recall store for one answer
    n_vis: int = 0  # a frame's visual tokens
    pinned: bool = False  # an exchange kept whatever its age (a standing instruction)
    emb: torch.Tensor | None = field(default=None, repr=False)  # a frame's visual embeddings (recall on)


@dataclass
class Eviction:
    """What a plan evicts: whole units, and whether the recent_seconds window had to give way."""

    uids: set[int] = field(default_factory=set)
    overrun: bool = False


class Ledger:
    """Token ids and their owning units, in cache order (``len(ledger)`` is the cache length)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.owners: list[int] = []
        self.units: dict[int, Unit] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self.ids)

    def new_unit(self, kind: str, t: float, **kw: object) -> Unit:
        unit = Unit(self._next, kind, t, **kw)
        self._next += 1
        return unit

    def append(self, ids: list[int], unit: Unit) -> None:
        self.units.setdefault(unit.uid, unit)
        self.ids += ids
        self.owners += [unit.uid] * len(ids)

    def newest(self) -> Unit | None:
        return self.units[self.owners[-1]] if self.owners else None

    def frames(self) -> list[Unit]:
        return [u for u in self.units.values() if u.kind == FRAME]

    def keep_mask(self, uids: set[int]) -> np.ndarray:
        return ~np.isin(np.asarray(self.owners, dtype=np.int64), np.fromiter(uids, dtype=np.int64))

    def remove(self, uids: set[int]) -> np.ndarray:
        """Drop the units ``uids``; returns the kept positions (sorted)."""
        keep = np.flatnonzero(self.keep_mask(uids))
        self.ids = [self.ids[i] for i in keep]
        self.owners = [self.owners[i] for i in keep]
        for uid in uids:
            self.units.pop(uid, None)
        return keep


class KVBudget:
    """The eviction policy of ``session.budget`` (see ``BudgetConfig``)."""

    def __init__(self, cfg: BudgetConfig, limit: int, sink_len: int, frame_tokens: int):
        if cfg.max_tokens is None:
            raise ValueError("KVBudget needs session.budget.max_tokens")
        if cfg.max_tokens > limit:
            raise ValueError(f"session.budget.max_tokens={cfg.max_tokens} is past the model's {limit} positions "
                             "(max_position_embeddings / session.max_cache_tokens)")
        self.cfg = cfg
        self.max_tokens = cfg.max_tokens
        self.sink = max(sink_len, cfg.sink_tokens or 0)
        self.recent = cfg.recent
        self.minimum = self.sink + self.recent + frame_tokens + cfg.reserve_tokens
        if self.max_tokens < self.minimum:
            raise ValueError(
                f"session.budget.max_tokens={self.max_tokens} is too small: the minimum is {self.minimum} = "
                f"sink {self.sink} + recent window {self.recent} + one frame {frame_tokens} "
                f"+ question reserve {cfg.reserve_tokens}")

    def plan(self, ledger: Ledger, need: int, last_t: float | None) -> Eviction:
        """Units to evict so that ``need`` more tokens fit (nothing when they already fit); changes nothing."""
        n = len(ledger)
        if n + need <= self.max_tokens:
            return Eviction()
        owners = np.asarray(ledger.owners, dtype=np.int64)
        uids, first = np.unique(owners, return_index=True)
        last = n - 1 - np.unique(owners[::-1], return_index=True)[1]
        counts = np.bincount(np.searchsorted(uids, owners), minlength=len(uids))
        newest = ledger.owners[-1]
        candidates = []  # (last position, uid, tokens, inside recent_seconds)
        for uid, f, e, c in zip(uids.tolist(), first.tolist(), last.tolist(), counts.tolist()):
            unit = ledger.units[uid]
            if (unit.kind == SINK or not unit.complete or unit.pinned or uid == newest or f < self.sink
                    or e >= n - self.recent):
                continue
            fresh = (self.cfg.recent_seconds is not None and last_t is not None
                     and unit.t >= last_t - self.cfg.recent_seconds)
            candidates.append((e, uid, c, fresh))
        candidates.sort()
        hard = n + need - self.max_tokens  # tokens that must go
        soft = hard + self.cfg.margin
        for allow_fresh in (False, True):
            chosen, freed = set(), 0
            for _, uid, c, fresh in candidates:
                if freed >= soft:
                    break
                if fresh and not allow_fresh:
                    continue
                chosen.add(uid)
                freed += c
            if freed >= hard:
                return Eviction(chosen, allow_fresh)
            if self.cfg.recent_seconds is None:
                break
        evictable = sum(c for _, _, c, _ in candidates)
        raise CacheLimitError(
            f"{need} more tokens do not fit the KV budget of {self.max_tokens}: the cache holds {n}, of which "
            f"only {evictable} are evictable (sink {self.sink}, recent window {self.recent} tokens"
            f"{'' if self.cfg.recent_seconds is None else f' / {self.cfg.recent_seconds} s'}); "
            "ask for fewer new tokens or raise session.budget.max_tokens")
