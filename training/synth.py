"""A synthetic streaming world: videos of coloured shapes and, from the same ground truth, training
data for the four stages and evaluation annotations in the OVO-Bench and StreamingBench formats.

Each video is a few shapes (circle, square, triangle, each one colour) on a noisy grey background:
a shape appears at a random time, drifts, may change colour once, and may leave. Everything a
question can ask is in the ground truth (:class:`Track`), so answers, announcement times and
distractor options are exact. ``heldout`` videos only use shape-colour pairs that no training video
shows (:data:`HELDOUT_PAIRS`): a model that answers them has learned shapes and colours apart.

``vl3live data synth OUT`` writes (paths relative to OUT):

* ``videos/*.mp4`` (H.264, PyAV) and ``images/*.png``;
* ``stage1.jsonl`` image captions and ``stage2.jsonl`` image QA (LLaVA format), ``stage3.jsonl``
  video QA on clips cut at each question (stream format, ``video-turn`` layout), ``stage4.jsonl``
  stream samples with timed questions, answers and announcements (``stream`` layout);
* ``ovo_bench_new.json`` (OVO-Bench: real-time ATR / OJR, backward EPM / ASI, forward REC with
  ``test_info`` probes) and ``questions_real.json`` / ``questions_proactive.json`` (StreamingBench)
  for the held-out videos, whose files are under ``videos/`` with the names these annotations use.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.video import write_video_file

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
# never shown together in training: the held-out videos use only these
HELDOUT_PAIRS = {("circle", "green"), ("square", "yellow"), ("triangle", "red")}
TRAIN_PAIRS = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in HELDOUT_PAIRS]
SIZE = (112, 112)  # height, width: 4 x 4 visual tokens per frame on the tiny model
FPS = 2


@dataclass
class Track:
    """One shape's life in a video: when it is there, where, and in which colour."""

    shape: str
    color: str
    t_in: float
    t_out: float  # = the video's length when it never leaves
    start: tuple[float, float]  # centre (y, x) at t_in, pixels
    velocity: tuple[float, float]  # pixels per second
    t_change: float | None = None  # when its colour changes to ``new_color``
    new_color: str | None = None

    def visible(self, t: float) -> bool:
        return self.t_in <= t < self.t_out

    def color_at(self, t: float) -> str:
        return self.new_color if self.t_change is not None and t >= self.t_change else self.color

    def centre(self, t: float) -> tuple[float, float]:
        dt = t - self.t_in
        return self.start[0] + self.velocity[0] * dt, self.start[1] + self.velocity[1] * dt


@dataclass
class World:
    """One video's ground truth."""

    name: str
    seconds: float
    tracks: list[Track] = field(default_factory=list)
    noise: float = 6.0
    seed: int = 0

    def visible(self, t: float) -> list[Track]:
        return [k for k in self.tracks if k.visible(t)]

    def frame(self, t: float, rng: np.random.Generator) -> np.ndarray:
        """The RGB uint8 frame at ``t``: grey background, camera noise, the visible shapes."""
        h, w = SIZE
        img = np.full((h, w, 3), 110.0)
        yy, xx = np.mgrid[0:h, 0:w]
        for k in self.visible(t):
            cy, cx = k.centre(t)
            r = 16
            if k.shape == "circle":
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            elif k.shape == "square":
                mask = (abs(yy - cy) <= r * 0.85) & (abs(xx - cx) <= r * 0.85)
            else:  # triangle, apex up
                mask = (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) * 0.6)
            img[mask] = COLORS[k.color_at(t)]
        img += rng.normal(0.0, self.noise, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    def frames(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return [self.frame(i / FPS, rng) for i in range(int(self.seconds * FPS))]


def make_world(name: str, seed: int, pairs: list[tuple[str, str]], seconds: float = 20.0) -> World:
    """A video of 2-3 shapes of distinct kinds, each shape-colour pair taken from ``pairs``."""
    rng = random.Random(seed)
    world = World(name, seconds, seed=seed)
    shapes = rng.sample(SHAPES, rng.choice((2, 3)))
    used_slots: list[float] = []
    for i, shape in enumerate(shapes):
        colors = [c for s, c in pairs if s == shape]
        color = rng.choice(colors)
        t_in = float(rng.randint(1, int(seconds * 0.45)))  # whole seconds: StreamingBench's stamps are exact
        while any(abs(t_in - u) < 2.0 for u in used_slots):  # appearances apart: one event at a time
            t_in = float(rng.randint(1, int(seconds * 0.6)))
        used_slots.append(t_in)
        lane = SIZE[0] * (0.25 + 0.25 * i)
        start = (lane, rng.uniform(20, SIZE[1] - 20))
        velocity = (0.0, rng.choice((-1.0, 1.0)) * rng.uniform(0.5, 2.0))
        track = Track(shape, color, t_in, seconds, start, velocity)
        if rng.random() < 0.5:  # changes colour once
            track.t_change = min(seconds - 2.0, t_in + float(rng.randint(4, 8)))
            track.new_color = rng.choice([c for c in COLORS if c != color])
        if rng.random() < 0.3:
            track.t_out = min(seconds, (track.t_change or t_in) + float(rng.randint(3, 6)))
        world.tracks.append(track)
    return world


# -- questions from the ground truth ------------------------------------------------------------------
def _options(correct: str, pool: list[str], rng: random.Random, n: int = 4) -> tuple[list[str], int]:
    others = [p for p in pool if p != correct]
    rng.shuffle(others)
    options = [correct] + others[: n - 1]
    rng.shuffle(options)
    return options, options.index(correct)


def realtime_items(world: World, rng: random.Random) -> list[dict]:
    """Questions about what is visible at the moment they are asked: a colour (ATR), a shape (OJR)."""
    items = []
    for k in world.tracks:
        t = k.t_in + 1.0
        if k.t_change is not None and k.t_change <= t + 1.0 or not k.visible(t):
            continue
        options, gt = _options(k.color_at(t), list(COLORS), rng)
        items.append({"task": "ATR", "time": t, "question": f"What is the color of the {k.shape}?",
                      "options": options, "gt": gt})
        color = k.color_at(t)
        if sum(o.color_at(t) == color for o in world.visible(t)) == 1:
            options, gt = _options(k.shape, list(SHAPES) + ["star"], rng)
            items.append({"task": "OJR", "time": t, "question": f"What shape is {color}?", "options": options,
                          "gt": gt})
    return items


def backward_items(world: World, rng: random.Random) -> list[dict]:
    """Questions about the past: a shape's colour before it changed (EPM), which shape came first (ASI)."""
    items = []
    for k in world.tracks:
        if k.t_change is not None and k.visible(k.t_change + 1.0):
            options, gt = _options(k.color, list(COLORS), rng)
            items.append({"task": "EPM", "time": k.t_change + 1.0, "question": f"What color was the {k.shape} "
                          "when it first appeared?", "options": options, "gt": gt})
    order = sorted(world.tracks, key=lambda k: k.t_in)
    if len(order) >= 2:
        t = order[-1].t_in + 1.5
        options, gt = _options(order[0].shape, list(SHAPES) + ["star"], rng)
        items.append({"task": "ASI", "time": t, "question": "Which shape appeared first?", "options": options,
                      "gt": gt})
    return items


def proactive_items(world: World) -> list[dict]:
    """Standing instructions set before a shape appears, and when the answer is due."""
    items = []
    for k in world.tracks:
        ask = max(0.0, k.t_in - 3.0)
        if any(o is not k and ask <= o.t_in <= k.t_in + 2.0 for o in world.tracks):
            continue  # another appearance inside the window would make the time ambiguous
        items.append({"time": ask, "due": k.t_in, "shape": k.shape, "color": k.color,
                      "question": f"When a {k.shape} appears, output \"{k.shape}\".", "output": k.shape})
    return items


def appearances_so_far(world: World, t: float) -> int:
    return sum(k.t_in <= t for k in world.tracks)


# -- writing ------------------------------------------------------------------------------------------
def _clock(t: float) -> str:
    s = int(math.floor(t))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _letter(i: int) -> str:
    return chr(65 + i)


def training_samples(world: World, video: str, image: str | None, rng: random.Random) -> dict[str, list[dict]]:
    """The four stages' samples for one training video (LLaVA format for 1-3, stream format for 4)."""
    out: dict[str, list[dict]] = {"stage1": [], "stage2": [], "stage3": [], "stage4": []}
    t_img = max(k.t_in for k in world.tracks) + 0.5
    seen = world.visible(t_img)
    if image is not None and seen:
        caption = " and ".join(f"a {k.color_at(t_img)} {k.shape}" for k in seen)
        out["stage1"].append({"image": image, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": caption[0].upper() + caption[1:] + "."}]})
        for k in seen:
            out["stage2"].append({"image": image, "conversations": [
                {"from": "human", "value": f"<image>\nWhat is the color of the {k.shape}?"},
                {"from": "gpt", "value": k.color_at(t_img)}]})
    for item in backward_items(world, rng) + realtime_items(world, rng):  # a clip up to the question
        prompt = mc_prompt(item["question"], item["options"])
        out["stage3"].append({"video": video, "start_time": 0.0, "end_time": item["time"], "layout": "video-turn",
                              "conversation": [{"role": "user", "content": prompt, "time": item["time"]},
                                               {"role": "assistant", "content": _letter(item["gt"]),
                                                "time": item["time"]}]})
    turns: list[tuple[float, int, list[dict]]] = []  # (time, order, messages): a question and its answer stay together
    for item in realtime_items(world, rng) + backward_items(world, rng):
        prompt = mc_prompt(item["question"], item["options"])
        turns.append((item["time"], len(turns), [{"role": "user", "content": prompt, "time": item["time"]},
                                                 {"role": "assistant", "content": _letter(item["gt"]),
                                                  "time": item["time"]}]))
    for p in proactive_items(world):
        turns.append((p["time"], len(turns), [{"role": "user", "content": p["question"], "time": p["time"]},
                                              {"role": "assistant", "content": "OK.", "time": p["time"]}]))
        turns.append((p["due"], len(turns), [{"role": "assistant", "content": p["output"], "time": p["due"]}]))
    conv = [m for _, _, msgs in sorted(turns, key=lambda x: (x[0], x[1])) for m in msgs]
    if conv:
        out["stage4"].append({"video": video, "start_time": 0.0, "end_time": world.seconds, "layout": "stream",
                              "conversation": conv})
    return out


def mc_prompt(question: str, options: list[str]) -> str:
    """A multiple-choice prompt as OVO-Bench words it (``constant.BR_PROMPT_TEMPLATE``)."""
    formatted = "; ".join(f"{_letter(i)}. {o}" for i, o in enumerate(options)) + ";"
    return (f"\nQuestion: {question}\nOptions:\n{formatted}\n\nRespond only with the letter corresponding to your "
            "chosen option (e.g., A, B, C). \nDo not include any additional text or explanation in your response.\n")


def ovo_items(world: World, video: str, rng: random.Random, first_id: int) -> list[dict]:
    """OVO-Bench annotations (``ovo_bench_new.json`` records) for one held-out video."""
    out = []
    for item in realtime_items(world, rng) + backward_items(world, rng):
        out.append({"id": first_id + len(out), "task": item["task"], "video": video, "realtime": item["time"],
                    "question": item["question"], "answer": item["options"][item["gt"]],
                    "options": item["options"], "gt": item["gt"]})
    starts = sorted(k.t_in for k in world.tracks)
    probes = [{"realtime": t + 1.0, "count": appearances_so_far(world, t + 1.0)} for t in starts]
    out.append({"id": first_id + len(out), "task": "REC", "video": video, "activity": "appear",
                "start_times": starts, "end_times": [t + 1.0 for t in starts], "test_info": probes})
    return out


def streamingbench_items(world: World, video: str, rng: random.Random) -> tuple[dict, dict | None]:
    """StreamingBench records (``questions_real.json`` and ``questions_proactive.json``) for one video."""
    real = []
    for item in realtime_items(world, rng):
        real.append({"task_type": "Attribute Recognition" if item["task"] == "ATR" else "Object Recognition",
                     "question": item["question"], "time_stamp": _clock(item["time"]),
                     "answer": _letter(item["gt"]),
                     "options": [f"{_letter(i)}. {o}" for i, o in enumerate(item["options"])],
                     "required_ability": "perception"})
    span = f"[0:00:00 - 0:00:{int(world.seconds):02d}]"
    rec = {"time": span, "questions": real, "video_categories": "synthetic", "video_path": f"./{video}"}
    pro = [{"task_type": "Proactive Output", "question": p["question"], "time_stamp": _clock(p["time"]),
            "ground_truth_time_stamp": _clock(p["due"]), "ground_truth_output": p["output"],
            "required_ability": "working memory"} for p in proactive_items(world)]
    return rec, ({"time": span, "questions": pro, "video_categories": "synthetic", "video_path": f"./{video}"}
                 if pro else None)


def write_synth(out_dir: str | Path, train_videos: int = 24, heldout_videos: int = 8, seed: int = 0,
                say=print) -> dict[str, Path]:
    """Render the world into ``out_dir``; returns the files written, by name."""
    from PIL import Image

    out = Path(out_dir)
    for sub in ("videos", "images"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    stages: dict[str, list[dict]] = {"stage1": [], "stage2": [], "stage3": [], "stage4": []}
    ovo: list[dict] = []
    sb_real: list[dict] = []
    sb_pro: list[dict] = []
    heldout = sorted(HELDOUT_PAIRS)
    total = train_videos + heldout_videos
    for i in range(total):
        held = i >= train_videos
        name = f"{'heldout' if held else 'train'}_{i:04d}"
        world = make_world(name, seed * 100003 + i, heldout if held else TRAIN_PAIRS)
        frames = world.frames()
        video = f"videos/{name}.mp4"
        write_video_file(out / video, frames, FPS)
        if held:
            ovo += ovo_items(world, video, rng, len(ovo))
            real, pro = streamingbench_items(world, video, rng)
            sb_real.append(real)
            if pro is not None:
                sb_pro.append(pro)
        else:
            t_img = max(k.t_in for k in world.tracks) + 0.5
            image = f"images/{name}.png"
            Image.fromarray(frames[min(len(frames) - 1, int(t_img * FPS))]).save(out / image)
            for stage, samples in training_samples(world, video, image, rng).items():
                stages[stage] += samples
        if say is not None and ((i + 1) % 8 == 0 or i + 1 == total):
            say(f"synth: {i + 1}/{total} videos")
    files = {}
    for stage, samples in stages.items():
        files[stage] = out / f"{stage}.jsonl"
        files[stage].write_text("".join(json.dumps(s) + "\n" for s in samples))
    for name, data in (("ovo_bench_new.json", ovo), ("questions_real.json", sb_real),
                       ("questions_proactive.json", sb_pro)):
        files[name] = out / name
        files[name].write_text(json.dumps(data, indent=1))
    return files
