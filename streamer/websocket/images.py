"""Frames on the wire: JPEG/PNG bytes (binary messages) or base64 text (``input_frame``).

Decoding checks size, magic bytes and the pixel count from the header before decoding anything, and
refuses with the protocol's error codes. Encoding is the client's side of the same format.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np

from .protocol import ProtocolError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """An RGB uint8 HxWx3 frame as JPEG bytes (what a client sends)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_base64_image(data: str, max_bytes: int) -> bytes:
    """The bytes of an ``input_frame.image`` (checked for size before decoding)."""
    if len(data) > (max_bytes + 2) // 3 * 4 + 4:
        raise ProtocolError("frame_too_large", f"frame is about {len(data) * 3 // 4} bytes; "
                                               f"the limit is {max_bytes}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("bad_image", f"image is not valid base64: {exc}") from None


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """A JPEG/PNG as RGB uint8 HxWx3; size, magic and pixel count are checked before decoding."""
    from PIL import Image

    # Our own pixel limit is checked from the header before anything is decoded; PIL's warning for
    # headers past its default would only repeat it (and warnings.catch_warnings is not thread-safe).
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    if len(data) == 0:
        raise ProtocolError("bad_image", "empty image")
    if len(data) > max_bytes:
        raise ProtocolError("frame_too_large", f"frame is {len(data)} bytes; the limit is {max_bytes}")
    if not (data.startswith(JPEG_MAGIC) or data.startswith(PNG_MAGIC)):
        raise ProtocolError("bad_image", "not a JPEG or PNG (wrong magic bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ProtocolError("frame_too_many_pixels", f"frame is {w}x{h}; the limit is {max_pixels} pixels")
            if w < 1 or h < 1:
                raise ProtocolError("bad_image", f"frame is {w}x{h}")
            rgb = np.array(img.convert("RGB"))  # a writable copy
    except ProtocolError:
        raise
    except Image.DecompressionBombError as exc:
        raise ProtocolError("frame_too_many_pixels", str(exc)) from None
    except Exception as exc:  # PIL raises many kinds on corrupt data (OSError, SyntaxError, struct.error...)
        raise ProtocolError("bad_image", f"cannot decode image: {exc}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ProtocolError("bad_image", f"decoded to shape {rgb.shape}")
    return rgb
