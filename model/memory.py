"""Making room in a :class:`~model.session.StreamSession`'s cache under its KV budget.

A mixin of ``StreamSession``: plan what must go for new tokens to fit (``model/budget.py`` decides),
remove whole units from the cache with the keys that move re-rotated (``model/kvcache.py``), and keep
evicted frames for recall (``model/recall.py``) with their mean pre-RoPE keys.

Each move re-rotates a key in float32 but stores it in the cache's dtype: in bf16 every move adds one
rounding, so drift can grow with the moves a key has made. A frame or an exchange makes at most about
``max_tokens / margin`` moves before it is evicted itself, which bounds its drift; a pinned exchange (a
standing instruction) is never evicted and moves at every eviction for as long as the stream runs, so
its keys are anchored: a float32 copy taken the first time it is about to move, from which every later
move is rotated (two roundings in all, whatever the number of moves). Measured (tests/test_budget.py,
bf16, 108 evictions): 0.60 % per-token error anchored, 0.64 % not, 1.7 % at most for frames.
"""

from __future__ import annotations

import numpy as np
import torch

from .budget import EXCHANGE, FRAME, CacheLimitError, Eviction, Unit
from .kvcache import mean_prerope_keys


class Memory:
    """The eviction side of ``StreamSession`` (see its docstring for the budget and recall)."""

    def _plan_room(self, new_tokens: int, what: str) -> Eviction:
        """Units to evict so ``new_tokens`` fit (nothing is changed); CacheLimitError when they cannot."""
        if self._budget is not None:
            return self._budget.plan(self._ledger, new_tokens, self._last_t)
        if self.cache_len + new_tokens > self.max_tokens:
            raise CacheLimitError(
                f"{what} needs {new_tokens} more tokens but the KV cache holds {self.cache_len} of at most "
                f"{self.max_tokens} (limit: model max_position_embeddings / session.max_cache_tokens; "
                "set session.budget.max_tokens to evict old frames instead)")
        return Eviction()

    def _evict(self, plan: Eviction, to_store: bool = True) -> int:
        """Remove whole units from the cache and re-rotate what moves; returns the live frames evicted."""
        uids = plan.uids
        if not uids:
            return 0
        self.recent_seconds_overruns += plan.overrun
        units = sorted((self._ledger.units[u] for u in uids), key=lambda u: u.t)
        frames = [u for u in units if u.kind == FRAME and not u.recalled]
        if self._store is not None and to_store and frames:
            self._store_frames(frames)
        with torch.inference_mode():
            self._anchor_pinned(uids)
            keep = self._ledger.remove(uids)
            self._pool.compact(self._seq, torch.from_numpy(keep), self._mover)
            self._reanchor()
        self.evicted_frames += len(frames)
        self.evicted_exchanges += sum(u.kind == EXCHANGE for u in units)
        return len(frames)

    def _positions(self, uid: int, owners: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.flatnonzero(owners == uid)).to(self.lm.device)

    def _anchor_pinned(self, leaving: set[int]) -> None:
        """(Before a compaction.) A float32 copy of the keys of each complete pinned exchange that stays and
        has none yet, at the positions its keys have now."""
        if self._pool.dtype == torch.float32:
            return  # a float32 cache re-rotates without a loss worth keeping a copy for
        owners = None
        for uid, unit in self._ledger.units.items():
            if unit.pinned and unit.complete and uid not in self._anchors and uid not in leaving \
                    and unit is not self._pending_owner:
                owners = np.asarray(self._ledger.owners) if owners is None else owners
                positions = self._positions(uid, owners)
                if positions.numel():
                    self._anchors[uid] = (positions, [k.float() for k in
                                                      self._pool.layer_keys(self._seq, positions)])

    def _reanchor(self) -> None:
        """(After a compaction.) Each anchored unit that moved gets its keys rotated from its anchor."""
        if not self._anchors:
            return
        owners = np.asarray(self._ledger.owners)
        for uid in list(self._anchors):
            unit = self._ledger.units.get(uid)
            if unit is None or not unit.pinned:  # evicted or unpinned: its drift is bounded again
                del self._anchors[uid]
                continue
            old, keys = self._anchors[uid]
            new = self._positions(uid, owners)
            if torch.equal(new, old):
                continue
            cos, sin = self._mover.delta(old, new)
            slots = self._seq.table[new]
            for layer, k in enumerate(keys):
                moved = self._mover.rotate(k, cos, sin).transpose(0, 1)
                self._pool.keys[layer].index_copy_(0, slots, moved.to(self._pool.dtype))

    def _store_frames(self, frames: list[Unit]) -> None:
        owners = np.asarray(self._ledger.owners)
        visual = np.asarray(self._ledger.ids) == self.video_token_id
        index = {u.uid: i for i, u in enumerate(frames)}
        pos = np.flatnonzero(visual & np.isin(owners, list(index)))
        groups = np.array([index[o] for o in owners[pos]], dtype=np.int64)
        dev = self.lm.device
        positions = torch.from_numpy(pos).to(dev)
        keys = mean_prerope_keys(self._pool.layer_keys(self._seq, positions), positions,
                                 torch.from_numpy(groups).to(dev), len(frames), self._mover).cpu()
        embs = torch.cat([u.emb for u in frames]).cpu().split([u.n_vis for u in frames])  # one copy, one sync
        for u, emb, key in zip(frames, embs, keys):
            self._store.add(u.t, emb, key)
            u.emb = None
