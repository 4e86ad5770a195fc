"""Operations on a transformers ``DynamicCache``: drop tokens and re-rotate the keys that move.

Qwen2 caches keys after RoPE. Removing tokens from the middle moves every later token to a
smaller position; RoPE is a rotation by ``position x inv_freq``, so a cached key is moved from
position ``p`` to ``p'`` by rotating it by the difference. The rotations use the model's own
rotary embedding module (its ``cos``/``sin`` at ``p`` and ``p'``, composed in float32), so a moved
key equals the key the model would compute at ``p'`` up to float rounding. The compacted cache is
built through ``DynamicCache``'s public constructor; no transformers module is patched.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class RopeMover:
    """Rotates cached keys between positions with a text model's rotary embedding."""

    def __init__(self, rotary_emb: torch.nn.Module):
        self.rotary_emb = rotary_emb
        self.scaling = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled (n, rot_dim) cos and sin at ``positions`` in float32."""
        probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
        cos, sin = self.rotary_emb(probe, positions.view(1, -1))
        return cos[0].float() / self.scaling, sin[0].float() / self.scaling

    def delta(self, old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the rotation that moves a key from ``old`` to ``new`` positions."""
        cos_o, sin_o = self.cos_sin(old)
        cos_n, sin_n = self.cos_sin(new)
        return cos_n * cos_o + sin_n * sin_o, sin_n * cos_o - cos_n * sin_o

    @staticmethod
    def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``keys`` (..., n, head_dim) by per-position ``cos``/``sin`` (n, rot_dim), rotate-half style."""
        rot = cos.shape[-1]
        k = keys.float()
        head, tail = k[..., :rot], k[..., rot:]
        half = rot // 2
        rotated_half = torch.cat([-head[..., half:], head[..., :half]], dim=-1)
        out = head * cos + rotated_half * sin
        if tail.shape[-1]:
            out = torch.cat([out, tail], dim=-1)
        return out.to(keys.dtype)


def layer_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each (batch, kv_heads, seq, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def compact(cache: DynamicCache, keep: torch.Tensor, mover: RopeMover, config: object) -> DynamicCache:
    """A new cache holding only positions ``keep`` (sorted, 1-D long), moved to ``0..len(keep)-1``.

    Tokens before the first removed position do not move; only the rest is re-rotated.
    """
    kv = layer_kv(cache)
    seq = kv[0][0].shape[-2]
    device = kv[0][0].device
    keep = keep.to(device)
    n = keep.numel()
    new_pos = torch.arange(n, device=device)
    moved = (keep != new_pos).nonzero()
    first = int(moved[0, 0]) if moved.numel() else n
    if first == n and n == seq:
        return cache
    cos, sin = mover.delta(keep[first:], new_pos[first:])
    tail = keep[first:]
    data = []
    for k, v in kv:
        k_tail = mover.rotate(k.index_select(-2, tail), cos, sin)
        data.append((torch.cat([k[..., :first, :], k_tail], dim=-2),
                     torch.cat([v[..., :first, :], v.index_select(-2, tail)], dim=-2)))
    return DynamicCache(ddp_cache_data=data, config=config)


def mean_prerope_keys(cache: DynamicCache, positions: torch.Tensor, groups: torch.Tensor, n_groups: int,
                      mover: RopeMover) -> torch.Tensor:
    """Mean key before RoPE of each group of cached positions: (n_groups, layers, kv_heads, head_dim) float32.

    ``groups[i]`` is the group of ``positions[i]``; every group must be non-empty.
    """
    device = positions.device
    cos, sin = mover.cos_sin(positions)
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1).float()
    out = []
    for k, _ in layer_kv(cache):
        k0 = mover.rotate(k[0].index_select(-2, positions).float(), cos, -sin)  # (H, n, D), rotated back to 0
        sums = torch.zeros(n_groups, k0.shape[0], k0.shape[-1], device=device)
        sums.index_add_(0, groups, k0.transpose(0, 1))
        out.append(sums / counts.view(-1, 1, 1))
    return torch.stack(out, dim=1)
