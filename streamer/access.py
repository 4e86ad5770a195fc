"""Who may connect and what a session may pull from (pure: no I/O).

- **Origins.** A browser sends ``Origin`` with every websocket handshake, and any page the user
  has open may try ``ws://127.0.0.1:8765/``. With no list configured, only handshakes without an
  ``Origin`` (programs, not browsers) and from loopback pages are accepted.
- **Sources.** ``source.attach`` URLs are matched against ``scheme://host[:port]`` patterns on the
  parsed host, never as strings: a ``*`` stands for one whole IPv4 octet or part of one DNS label,
  so ``rtsp://192.168.1.*`` never matches ``rtsp://192.168.1.attacker.example``. A pattern without
  a port allows only the scheme's default port (``:*`` allows any). Numeric hosts that resolvers
  read as IPv4 but that are not a plain dotted quad (``0x7f000001``, ``0177.0.0.1``, ``127.1``) are
  refused, so they cannot slip past an IP pattern.
- **Resume throttle.** Failed resume attempts are counted per client address (token bucket), so
  resume tokens cannot be guessed at speed.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
ANY_PORT = -1
_LABEL = re.compile(r"[a-z0-9-]{1,63}")
_PATTERN_LABEL = re.compile(r"[a-z0-9*-]{1,63}")


@dataclass(frozen=True)
class SourcePattern:
    """One ``scheme://host[:port]`` entry of ``server.source_allow``."""

    scheme: str
    host: tuple[str, ...] | ipaddress.IPv6Address  # labels (IPv4 octets or DNS labels, may hold "*"), or an IPv6
    ipv4: bool
    port: int | None  # None: the scheme's default port only; ANY_PORT: any

    def matches(self, scheme: str, host: tuple[str, ...] | ipaddress.IPv6Address, ipv4: bool,
                port: int | None) -> bool:
        if scheme != self.scheme or not self._port_ok(port):
            return False
        if isinstance(self.host, ipaddress.IPv6Address) or isinstance(host, ipaddress.IPv6Address):
            return self.host == host
        if ipv4 != self.ipv4 or len(host) != len(self.host):
            return False
        if self.ipv4:
            return all(p == "*" or p == h for p, h in zip(self.host, host))
        return all(fnmatch.fnmatchcase(h, p) for p, h in zip(self.host, host))

    def _port_ok(self, port: int | None) -> bool:
        if self.port == ANY_PORT:
            return True
        default = DEFAULT_PORTS.get(self.scheme)
        if self.port is None:
            return port is None or port == default
        return (port if port is not None else default) == self.port


def _host(text: str) -> tuple[tuple[str, ...] | ipaddress.IPv6Address, bool]:
    """(labels or IPv6 address, is IPv4) of a URL's host; ValueError for anything ambiguous."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"bad IPv6 host {text!r}")
        return ipaddress.IPv6Address(text[1:-1]), False
    host = text.lower()
    if host.endswith("."):  # the fully qualified spelling of the same name
        host = host[:-1]
    labels = tuple(host.split("."))
    try:
        ipaddress.IPv4Address(host)
        return labels, True
    except ValueError:
        pass
    try:  # what inet_aton reads as an address (hex, octal, short forms) is refused
        socket.inet_aton(host)
        raise ValueError(f"numeric host {text!r} is not a plain dotted-quad IPv4 address")
    except OSError:
        pass
    if not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError(f"{text!r} is not a host name")
    return labels, False


def parse_pattern(pattern: str) -> SourcePattern:
    """A ``server.source_allow`` entry; ValueError says what is wrong with it."""
    scheme, sep, rest = pattern.partition("://")
    if not sep or not scheme or not rest or "/" in rest or "@" in rest:
        raise ValueError(f"server.source_allow entries look like rtsp://host[:port], got {pattern!r}")
    scheme = scheme.lower()
    port: int | None = None
    host = rest
    head, colon, tail = rest.rpartition(":")
    if colon and not head.endswith(":") and (tail == "*" or tail.isdigit()) and (not head.startswith("[") or
                                                                                 head.endswith("]")):
        host, port = head, ANY_PORT if tail == "*" else int(tail)
        if port != ANY_PORT and not 0 < port < 65536:
            raise ValueError(f"server.source_allow: bad port in {pattern!r}")
    if host.startswith("["):
        return SourcePattern(scheme, _host(host)[0], False, port)
    labels = tuple(host.lower().rstrip(".").split("."))
    if not all(_PATTERN_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"server.source_allow: bad host pattern in {pattern!r} (letters, digits, '-' and '*' "
                         "within dot-separated labels)")
    ipv4 = len(labels) == 4 and all(label == "*" or label.isdigit() for label in labels)
    if ipv4:
        for label in labels:
            if label != "*" and (int(label) > 255 or (len(label) > 1 and label[0] == "0")):
                raise ValueError(f"server.source_allow: bad IPv4 octet {label!r} in {pattern!r}")
    elif all(re.fullmatch(r"[0-9*]+", label) for label in labels):
        raise ValueError(f"server.source_allow: {pattern!r}: an IPv4 pattern has four octets, each a number "
                         "or a whole '*'")
    elif labels[-1].isdigit():
        raise ValueError(f"server.source_allow: {pattern!r} is neither a dotted-quad IPv4 pattern nor a host name")
    return SourcePattern(scheme, labels, ipv4, port)


def source_allowed(url: str, allow: list[str] | list[SourcePattern]) -> bool:
    """Whether ``url`` matches one of the ``allow`` patterns (strings or parsed) by its parsed host."""
    if not isinstance(url, str) or any(c.isspace() or ord(c) < 32 or c == "\\" for c in url):
        return False
    try:
        parts = urlsplit(url)
        port = parts.port
        netloc_host = parts.netloc.rpartition("@")[2]
        bracketed = netloc_host.startswith("[")
        raw = parts.hostname or ""
        host, ipv4 = _host(f"[{raw}]" if bracketed else raw)
    except ValueError:
        return False
    if not parts.scheme or not raw or "%" in parts.netloc:
        return False
    scheme = parts.scheme.lower()
    patterns = [p if isinstance(p, SourcePattern) else parse_pattern(p) for p in allow]
    return any(p.matches(scheme, host, ipv4, port) for p in patterns)


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
