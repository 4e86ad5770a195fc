"""Realistic camera footage without downloads, and the DiffFP threshold measurement.

A real photograph shipped inside scikit-image is filmed by a simulated camera: sensor noise
(sigma in grey levels), slight exposure flicker, optionally a dark object walking through, then
H.264-encoded with PyAV (libx264, keyframe every ``gop_seconds``) at ``fps_in``, decoded, and
sampled at 1 fps like the live sampler does.

    python -m tests.footage            # prints the threshold table used in the README
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def photograph(height: int = 336, width: int = 448, name: str = "coffee") -> np.ndarray:
    """A real photograph from scikit-image's bundled data, resized to ``height x width``."""
    import skimage.data
    import skimage.transform

    img = getattr(skimage.data, name)()
    img = skimage.transform.resize(img, (height, width), anti_aliasing=True, preserve_range=True)
    return img.astype(np.float32)


def film(scene: np.ndarray, seconds: float, fps_in: int = 30, noise: float = 2.0, flicker: float = 0.5,
         walker: bool = False, gop_seconds: float = 1.0, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Film ``scene``; return decoded frames sampled at 1 fps and the same frames clean (no noise, no codec)."""
    rng = np.random.default_rng(seed)
    h, w = scene.shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps_in)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"g": str(int(gop_seconds * fps_in)), "crf": "23", "preset": "veryfast", "tune": "film"}
        clean = []
        for i in range(int(seconds * fps_in)):
            t = i / fps_in
            img = scene * (1.0 + flicker / 100.0 * np.sin(2 * np.pi * 0.7 * t))
            if walker:
                size = h // 4
                x = int((t / seconds) * (w + size)) - size
                y = h // 2
                x0, x1 = max(x, 0), min(max(x + size, 0), w)
                if x1 > x0:
                    img[y:y + size, x0:x1] = (40, 35, 30)
            if i % fps_in == 0:
                clean.append(np.clip(img, 0, 255).astype(np.uint8))
            img = img + rng.normal(0, noise, img.shape)
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    buf.seek(0)
    frames = []
    with av.open(buf) as inp:
        for i, frame in enumerate(inp.decode(video=0)):
            if i % fps_in == 0:
                frames.append(frame.to_ndarray(format="rgb24"))
    return frames, clean


def _pruner(reference: str, threshold: float):
    from model.diffp import DiffPruner
    from model.frames import FramePreprocessor

    prep = FramePreprocessor(frame_pixels=448 * 336)
    return prep, DiffPruner(reference, threshold, 1, grey_scale=prep.grey_scale())


def kept_fraction(frames: list[np.ndarray], reference: str, threshold: float) -> float:
    """Fraction of tokens kept over frames 2..N (the first frame is always whole)."""
    prep, pruner = _pruner(reference, threshold)
    kept = total = 0
    for i, f in enumerate(frames):
        pf = prep(f)
        keep = pruner(pf)
        if i:
            kept, total = kept + int(keep.sum()), total + keep.numel()
    return kept / max(total, 1)


def change_recall(frames: list[np.ndarray], clean: list[np.ndarray], threshold: float,
                  changed_grey: float = 8.0) -> float:
    """Of the tokens whose noise-free content moved by > ``changed_grey`` grey levels since the
    previous sample (the walker entering, crossing, leaving), the fraction that DiffFP kept."""
    prep, pruner = _pruner("last_kept", threshold)
    scale = prep.grey_scale()
    hit = total = 0
    prev = None
    for f, c in zip(frames, clean):
        keep = pruner(prep(f))
        cur = prep(c).token_pixels()
        if prev is not None:
            changed = ((cur - prev).abs() * scale).mean(-1) > changed_grey
            hit, total = hit + int((keep & changed).sum()), total + int(changed.sum())
        prev = cur
    return hit / max(total, 1)


def measure(seconds: int = 30) -> dict:
    scene = photograph()
    static, _ = film(scene, seconds, noise=2.0, gop_seconds=1.0)
    moving, clean = film(scene, seconds, noise=2.0, gop_seconds=1.0, walker=True, seed=1)
    table = {"previous@0.1": kept_fraction(static, "previous", 0.1)}
    for thr in (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0):
        table[f"last_kept@{thr}"] = {"static_kept": round(kept_fraction(static, "last_kept", thr), 4),
                                     "change_recall": round(change_recall(moving, clean, thr), 4)}
    return table


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
