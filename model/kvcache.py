"""RoPE arithmetic on cached keys: move them between positions, and undo it for recall.

Qwen2 caches keys after RoPE. Removing tokens from the middle moves every later token to a
smaller position; RoPE is a rotation by ``position x inv_freq``, so a cached key is moved from
position ``p`` to ``p'`` by rotating it by the difference. The rotations use the model's own
rotary embedding module (its ``cos``/``sin`` at ``p`` and ``p'``, composed in float32), so a moved
key equals the key the model would compute at ``p'`` up to float rounding. ``KVPool.compact``
uses it to evict from the middle of a session's pages; no transformers module is patched.
"""

from __future__ import annotations

import torch


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


def mean_prerope_keys(layer_keys: list[torch.Tensor], positions: torch.Tensor, groups: torch.Tensor,
                      n_groups: int, mover: RopeMover) -> torch.Tensor:
    """Mean key before RoPE of each group of cached positions: (n_groups, layers, kv_heads, head_dim) float32.

    ``layer_keys`` are the cached keys at ``positions``, per layer (kv_heads, n, head_dim);
    ``groups[i]`` is the group of ``positions[i]``; every group must be non-empty.
    """
    device = positions.device
    cos, sin = mover.cos_sin(positions)
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1).float()
    out = []
    for k in layer_keys:
        k0 = mover.rotate(k.float(), cos, -sin)  # (H, n, D), rotated back to position 0
        sums = torch.zeros(n_groups, k0.shape[0], k0.shape[-1], device=device)
        sums.index_add_(0, groups, k0.transpose(0, 1))
        out.append(sums / counts.view(-1, 1, 1))
    return torch.stack(out, dim=1)
