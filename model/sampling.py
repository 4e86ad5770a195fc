"""How an answer is generated: one frozen value, validated once when it is made.

The websocket protocol builds it from ``session.generation`` , the
engine keeps one per session and changes it with ``replace``, the session generates with it.
Nothing downstream checks it again. Pure Python: the protocol shares the bounds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# Bounds, so that no value a client may send is too large for torch.
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes, non-negative
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20  # above any vocabulary
MAX_NEW_TOKENS = 2**31 - 1  # (servers set their own, lower limit)


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Sampling:
    """Answer length and token choice: greedy unless ``do_sample``; ``seed`` makes sampling repeatable;
    ``ignore_eos`` generates exactly ``max_new_tokens`` (benchmarks, teacher forcing)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        """``ValueError`` naming the first setting of the wrong type or out of range."""
        if not _integer(self.max_new_tokens) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be an integer in 1..2**31-1, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, bool) or not isinstance(self.ignore_eos, bool):
            raise ValueError(f"do_sample must be true or false, got {self.do_sample!r}")
        if not _number(self.temperature) or not 0 < self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be a number in (0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not _integer(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an integer in 0..{MAX_TOP_K}, got {self.top_k!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in 0..2**63-1, got {self.seed!r}")

    def replace(self, **changes: object) -> Sampling:
        """A copy with ``changes`` (validated again: a new value)."""
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict[str, object]:
        """The token-choice settings as the protocol names them (``session.generation`` minus its length)."""
        return {"do_sample": self.do_sample, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "seed": self.seed}


GREEDY = Sampling()
