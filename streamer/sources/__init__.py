"""Video sources. Each yields :class:`Frame` with the source's own presentation timestamps."""

from .base import FpsSampler, Frame
from .capture import ReaderStats, camera_source, rtsp_source
from .file import file_source, read_video_file
from .threaded import iterate_in_thread

__all__ = ["FpsSampler", "Frame", "ReaderStats", "camera_source", "file_source", "iterate_in_thread", "read_video_file",
           "rtsp_source"]
