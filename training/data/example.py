"""``vl3live data example DIR``: the README's training-data example, with synthetic media to run it.

Writes ``DIR/train.jsonl`` holding exactly the samples the README shows (one of each kind: an
image, two images, a video, text only, a stream sample where the assistant speaks up by itself)
and the images and clips they name, rendered from :class:`model.checkpoints.synthetic.SyntheticCamera`, so
``vl3live data check`` and the CPU recipe (``configs/train/tiny_cpu.yaml``) run as written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from model.checkpoints.synthetic import SyntheticCamera
from model.video import write_video_file

# The README's "Training data" block, line for line (tests/test_training.py checks that they agree).
SAMPLES = [
    {"image": "img/cat.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                               {"from": "gpt", "value": "A cat."}]},
    {"image": ["img/a.jpg", "img/b.jpg"], "conversations": [{"from": "human", "value": "<image><image>\nWhat changed?"},
                                                           {"from": "gpt", "value": "The light is on."}]},
    {"video": "clips/cook.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat is cooked?"},
                                                  {"from": "gpt", "value": "Pasta."}]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"video": "cam/door.mp4", "start_time": 60, "end_time": 180, "conversation": [
        {"role": "user", "content": "Tell me when someone comes in.", "time": 61.0},
        {"role": "assistant", "content": "I will.", "time": 61.0},
        {"role": "assistant", "content": "A man in a red coat came in.", "time": 95.5}]},
]
CLIPS = {"clips/cook.mp4": 12.0, "cam/door.mp4": 190.0}  # seconds
SIZE = (168, 224)  # height, width: small, so the tiny model trains in seconds


def write_example(out_dir: str | Path) -> Path:
    """Write the example dataset into ``out_dir``; returns the path of its ``train.jsonl``."""
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    camera = SyntheticCamera(*SIZE, seed=3)
    for i, name in enumerate(("cat.jpg", "a.jpg", "b.jpg")):
        rgb = camera.frame(2.0 + i)
        if name == "b.jpg":  # the light is on
            rgb = np.clip(rgb.astype(np.int16) + 60, 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(out / "img" / name, quality=90)
    fps = 2
    for name, seconds in CLIPS.items():
        write_video_file(out / name, (camera.frame(i / fps) for i in range(int(seconds * fps))), fps)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    return data
