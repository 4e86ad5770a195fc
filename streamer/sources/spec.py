"""What a source spec names, and which URLs a server may pull from: the one place these rules live.

A *spec* is what a user types for a source (``vl3live watch SOURCE``, ``vl3live client SOURCE``, the
demo's source box): an ``rtsp://`` / ``rtsps://`` URL, a video file, a camera device (``/dev/video0``,
``0`` on macOS, ``video=NAME`` on Windows) or ``webrtc``.

The allow-list (``server.source_allow``) matches URLs against ``scheme://host[:port]`` patterns on the
parsed host, never as strings: a ``*`` stands for one whole IPv4 octet or part of one DNS label, so
``rtsp://192.168.1.*`` never matches ``rtsp://192.168.1.attacker.example``. A pattern without a port
allows only the scheme's default port (``:*`` allows any). Numeric hosts that resolvers read as IPv4 but
that are not a plain dotted quad (``0x7f000001``, ``0177.0.0.1``, ``127.1``) are refused, so they cannot
slip past an IP pattern.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .base import Frame

RTSP_SCHEMES = ("rtsp://", "rtsps://")
SOURCE_KINDS = ("rtsp", "file", "camera", "webrtc")


def normalized(spec: str) -> str:
    """``spec`` with its URL scheme in lower case: schemes are case-insensitive (RFC 3986), here as in the
    allow-list, so ``RTSP://host/x`` is the same source as ``rtsp://host/x`` everywhere."""
    scheme, sep, rest = spec.partition("://")
    return f"{scheme.lower()}{sep}{rest}" if sep and scheme.isalpha() else spec


def source_kind(spec: str) -> str:
    """``rtsp``, ``file``, ``camera`` or ``webrtc``; a clear error for anything else."""
    if spec == "webrtc":
        return "webrtc"
    if normalized(spec).startswith(RTSP_SCHEMES):
        return "rtsp"
    if Path(spec).is_file():
        return "file"
    if spec.startswith("/dev/video") or spec.isdigit() or spec.startswith("video="):
        return "camera"
    if "://" in spec:
        raise ValueError(f"unsupported source URL {spec!r}: sources are rtsp:// or rtsps:// URLs, video files, "
                         "camera devices or webrtc")
    raise FileNotFoundError(f"no such source: {spec!r} (not an rtsp:// URL, a file or a camera device)")


def open_source(spec: str, fps: float, realtime: bool = True, max_seconds: float | None = None,
                on_failure: Callable[[str], None] | None = None) -> AsyncIterator[Frame]:
    """The async frame source ``spec`` names (``webrtc`` is served, not opened: see ``sources/webrtc.py``).
    ``realtime`` and ``max_seconds`` apply to files; ``on_failure`` to RTSP (called on each failed retry)."""
    from .capture import camera_source, rtsp_source
    from .file import file_source

    kind = source_kind(spec)
    if kind == "rtsp":
        return rtsp_source(normalized(spec), fps=fps, on_failure=on_failure)
    if kind == "file":
        return file_source(Path(spec), fps=fps, realtime=realtime, max_seconds=max_seconds)
    if kind == "camera":
        return camera_source(spec, fps=fps)
    raise ValueError("webrtc is not a source to open: it serves a page that browsers stream to")


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
