"""Model layer: loading, frames, DiffFP, layouts and the streaming session (no asyncio, no networking)."""

from .config import Config, ModelConfig, SessionConfig, load_config
from .diffp import DiffPruner
from .frames import FramePreprocessor, PixelFrame
from .layout import ChatPieces, LayoutRenderer
from .loading import LoadedModel, load_model
from .session import CacheLimitError, FrameResult, StreamSession, TokenDelta

__all__ = [
    "CacheLimitError", "ChatPieces", "Config", "DiffPruner", "FramePreprocessor", "FrameResult",
    "LayoutRenderer", "LoadedModel", "ModelConfig", "PixelFrame", "SessionConfig", "StreamSession",
    "TokenDelta", "load_config", "load_model",
]
