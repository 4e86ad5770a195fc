"""Making room in a :class:`~model.session.StreamSession`'s cache under its KV budget.

A mixin of ``StreamSession``: plan what must go for new tokens to fit (``model/budget.py`` decides),
remove whole units from the cache with the keys that move re-rotated (``model/kvcache.py``), and keep
evicted frames for recall (``model/recall.py``) with their mean pre-RoPE keys.
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
        keep = self._ledger.remove(uids)
        with torch.inference_mode():
            self._pool.compact(self._seq, torch.from_numpy(keep), self._mover)
        self.evicted_frames += len(frames)
        self.evicted_exchanges += sum(u.kind == EXCHANGE for u in units)
        return len(frames)

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
