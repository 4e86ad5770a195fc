"""Model layer: loading, frames, DiffFP, layouts, the streaming session and its KV budget (no asyncio, no networking)."""

from .config import BudgetConfig, Config, ModelConfig, SessionConfig, load_config
from .diffp import DiffPruner
from .frames import FramePreprocessor, PixelFrame
from .layout import ChatPieces, LayoutRenderer
from .loading import LoadedModel, load_configured, load_model
from .session import CacheLimitError, FrameResult, StreamSession, TokenDelta

__all__ = [
    "BudgetConfig", "CacheLimitError", "ChatPieces", "Config", "DiffPruner", "FramePreprocessor", "FrameResult",
    "LayoutRenderer", "LoadedModel", "ModelConfig", "PixelFrame", "SessionConfig", "StreamSession",
    "TokenDelta", "load_config", "load_configured", "load_model",
]
