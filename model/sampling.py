"""Sampling settings: their bounds and their one check (pure Python: the protocol shares the bounds)."""

from __future__ import annotations

import math

# Bounds of the sampling settings, checked once by :func:`check_sampling` (the protocol uses the same).
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes, non-negative
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20  # above any vocabulary


def check_sampling(do_sample: object = False, temperature: object = 1.0, top_k: object = 0, top_p: object = 1.0,
                   seed: object = None) -> None:
    """``ValueError`` naming the first sampling setting of the wrong type or out of range."""
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be true or false, got {do_sample!r}")
    if not number(temperature) or not 0 < temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be a number in (0, {MAX_TEMPERATURE:g}], got {temperature!r}")
    if not integer(top_k) or not 0 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be an integer in 0..{MAX_TOP_K}, got {top_k!r}")
    if not number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and (not integer(seed) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer in 0..2**63-1, got {seed!r}")
