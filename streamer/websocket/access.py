"""Who may connect, and how fast (pure: no I/O). What a session may pull from is
``streamer/sources/spec.py``'s allow-list.

- **Origins.** A browser sends ``Origin`` with every websocket handshake, and any page the user
  has open may try ``ws://127.0.0.1:8765/``. With no list configured, only handshakes without an
  ``Origin`` (programs, not browsers) and from loopback pages are accepted.
- **Resume throttle.** Failed resume attempts are counted per client address (token bucket), so
  resume tokens cannot be guessed at speed.
- **Rates.** Messages and frames per connection (:class:`TokenBucket`).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from urllib.parse import urlsplit


def _loopback_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str | None, allowed: list[str] | None) -> bool:
    """Whether a handshake's ``Origin`` may connect: none (not a browser) always; with no list, pages
    served from loopback only; with a list, its entries (``"*"``: any origin)."""
    if origin is None:
        return True
    if allowed is not None:
        return "*" in allowed or origin.rstrip("/").lower() in {o.rstrip("/").lower() for o in allowed}
    try:
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and _loopback_host((parts.hostname or "").lower())
    except ValueError:
        return False


class FailureThrottle:
    """Failures per key (a client address): ``per_minute`` with bursts of ``burst``; at most
    ``max_keys`` remembered (the least recently seen are forgotten), so memory stays bounded."""

    def __init__(self, per_minute: float, burst: float, max_keys: int = 4096):
        self.rate, self.burst, self.max_keys = per_minute / 60.0, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def blocked(self, key: str, now: float | None = None) -> bool:
        """Whether ``key`` has used up its failures for now."""
        return self._tokens(key, time.monotonic() if now is None else now) < 1

    def failed(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._buckets[key] = (max(0.0, self._tokens(key, now) - 1), now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


class TokenBucket:
    """``rate`` per second with bursts up to ``capacity``."""

    def __init__(self, rate: float, capacity: float):
        self.rate, self.capacity = rate, capacity
        self.tokens = capacity
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
