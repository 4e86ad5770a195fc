"""Model layer: loading, frames, DiffFP, layouts, the streaming session and its KV budget (no asyncio, no networking).

The names below load on first use (PEP 562), so ``from model.config import ...`` (the CLI's
argument parsing, its ``--help``) does not import torch or transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BudgetConfig": "config", "ModelConfig": "config", "SessionConfig": "config", "DiffPruner": "diffp", "FramePreprocessor": "frames", "PixelFrame": "frames",
    "ChatPieces": "layout", "LayoutRenderer": "layout", "LoadedModel": "checkpoints.loading", "load_configured": "checkpoints.loading",
    "load_model": "checkpoints.loading", "CacheLimitError": "session", "FrameResult": "session", "StreamSession": "session",
    "TokenDelta": "session", "GREEDY": "sampling", "Sampling": "sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
