"""Checkpoints by hub id: from the local cache, or from the hub when it answers; fail fast when neither.

huggingface_hub retries each file with backoff, so on a machine that cannot reach the hub a load
used to print dozens of retry warnings for minutes before failing. :func:`resolve` asks the hub
once (a few seconds at most, remembered for the process); when it does not answer, a checkpoint
in the cache is used as it is, and anything else fails at once with one line that says what to do.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path

PROBE_TIMEOUT = 5.0  # seconds


class HubUnavailableError(OSError):
    """A checkpoint that is neither local nor in the cache, and the hub cannot be reached."""


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def unreachable(url: str) -> str | None:
    """Why the hub at ``url`` does not answer, or None when it does (any HTTP status counts as an answer)."""
    try:
        req = urllib.request.Request(f"{url}/api/models", method="HEAD", headers={"User-Agent": "vl3live"})
        with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason) or type(exc).__name__


def is_hub_id(spec: str) -> bool:
    """``owner/name`` that is not a local path."""
    if spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists():
        return False
    parts = spec.split("/")
    return len(parts) == 2 and all(parts)


def resolve(spec: str, what: str = "checkpoint", hint: str = "--model DIR, or --model tiny to try the "
            "pipeline without one", patterns: list[str] | None = None) -> str:
    """``spec`` itself when it is local or the hub answers; its cached snapshot when the hub does not
    (or ``HF_HUB_OFFLINE`` is set); else :class:`HubUnavailableError` naming the checkpoint, the
    cache and what to pass instead."""
    if not is_hub_id(spec):
        return spec
    why = "HF_HUB_OFFLINE is set" if offline() else unreachable(endpoint())
    if why is None:
        return spec
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec, local_files_only=True, allow_patterns=patterns)
    except Exception:  # not in the cache (LocalEntryNotFoundError and friends)
        pass
    raise HubUnavailableError(
        f"{what} {spec!r} is not in the cache ({cache_dir()}) and the model hub cannot be reached "
        f"({endpoint()}: {why}). Download it once where the hub is reachable, or pass a local directory: {hint}")
