"""Video sources. Each yields :class:`Frame` with the source's own presentation timestamps."""

from .base import Frame
from .file import read_video_file

__all__ = ["Frame", "read_video_file"]
