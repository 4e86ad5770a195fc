"""A synthetic streaming world: videos of coloured shapes and, from the same ground truth, training
data for the four stages and evaluation annotations in the OVO-Bench and StreamingBench formats.

Each video is a few shapes (ring, square, triangle, each one colour) on a noisy grey background:
a shape appears at a random time, drifts, may change colour once, and may leave. Everything a
question can ask is in the ground truth (:class:`Track`), so answers, announcement times and
distractor options are exact. Each shape-colour pair has one place, a cell of the 2 x 2 grid the
shapes sit in (:func:`heldout_cell`), where no training video ever shows it; ``heldout`` videos show
every shape in its pair's held-out cell: a combination of shape, colour and place never seen
together. (Holding out whole shape-colour pairs instead, a green ring when training never shows
one, a small model from random weights scores 0 %: it learns which colours each shape comes in.)

``vl3live data synth OUT`` writes (paths relative to OUT):

* ``videos/*.mp4`` (H.264, PyAV) and ``images/*.png`` (frames of the training videos and one-shape
  pictures, both through the same H.264 round trip as the videos the evaluation decodes);
* ``stage1.jsonl`` one-shape pictures described ("red ring") and ``stage2.jsonl`` image QA on the
  videos' frames (LLaVA format), ``stage3.jsonl``
  video QA on clips cut at each question (stream format, ``video-turn`` layout), ``stage4.jsonl``
  stream samples with timed questions, answers and announcements (``stream`` layout);
* for each held-out set, ``compositional/`` (shape, colour and place never seen together in
  training) and ``in_distribution/`` (videos made as the training videos are, never trained on):
  ``ovo_bench_new.json`` (OVO-Bench: real-time ATR / OJR, backward EPM / ASI, forward REC with
  ``test_info`` probes) and ``questions_real.json`` / ``questions_proactive.json`` (StreamingBench),
  whose videos are under ``videos/`` with the names these annotations use.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.video import read_video_file, write_video_file

# A visual token is a 2 x 2 merge of 14 px patches: 28 x 28 px. Every shape is centred on a token's centre and
# spans 3 x 3 tokens, so its middle token is all shape (a ring's is all hole) and its eight others are cut the same
# way in every frame: a ring, a square and a triangle (narrow above, wide below) differ in every one of them.
# (Before, 112 x 112 frames of 4 x 4 tokens with each shape on a token corner: a shape was four quarter tokens whose
# mean coverage, .33 for a ring, .64 for a square, is what the model saw, and coverage times contrast made a green
# ring token look like a yellow triangle token.)
SHAPES = ("ring", "square", "triangle")
VERSION = 3  # of what write_synth writes: a run made with another is synthesized again (vl3live proof)
BACKGROUND = 110.0  # grey
CONTRAST = 140.0  # every colour's distance from the background grey, in RGB: the same contrast for each


def _colour(direction: tuple[float, float, float]) -> tuple[int, int, int]:
    """The colour at :data:`CONTRAST` from the background along ``direction`` (rounded to whole levels)."""
    norm = math.sqrt(sum(v * v for v in direction))
    return tuple(int(round(BACKGROUND + CONTRAST * v / norm)) for v in direction)


COLORS = {"red": _colour((1.0, -0.3, -0.3)), "green": _colour((-0.3, 1.0, -0.3)),
          "blue": _colour((-0.3, -0.3, 1.0)), "yellow": _colour((1.0, 1.0, -0.6))}
TOKEN = 28  # px: one merged visual token
CELL = 3 * TOKEN  # a cell of the 2 x 2 grid, 3 x 3 tokens, one shape in each
CELLS = 4


def heldout_cell(shape: str, color: str) -> int:
    """The cell where training never shows this shape in this colour (and held-out videos do)."""
    return (SHAPES.index(shape) + list(COLORS).index(color)) % CELLS


def cell_centre(cell: int) -> tuple[float, float]:
    """The centre (y, x) of ``cell`` in pixels: the centre of its middle token."""
    return CELL / 2 + CELL * (cell // 2), CELL / 2 + CELL * (cell % 2)


SIZE = (2 * CELL, 2 * CELL)  # height, width: 168 x 168, 6 x 6 visual tokens a frame
FPS = 2
RADIUS = 36  # a shape spans its cell's 3 x 3 tokens (22 of the outer tokens' 28 px), 6 px short of the cell's edge


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
    cell: int = 0  # which cell of the 2 x 2 grid it sits in

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
        img = np.full((h, w, 3), BACKGROUND)
        yy, xx = np.mgrid[0:h, 0:w]
        for k in self.visible(t):
            cy, cx = k.centre(t)
            r = RADIUS
            if k.shape == "ring":
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                mask &= (yy - cy) ** 2 + (xx - cx) ** 2 >= (r * 0.55) ** 2
            elif k.shape == "square":
                mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            else:  # triangle, apex up, as wide at its base as it is tall
                mask = (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) * 0.5)
            img[mask] = COLORS[k.color_at(t)]
        img += rng.normal(0.0, self.noise, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    def frames(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return [self.frame(i / FPS, rng) for i in range(int(self.seconds * FPS))]


FIRST_APPEARANCE = (1, 6)  # s: when a video's first shape appears
APPEARANCE_GAP = (2, 6)  # s: between one shape's appearance and the next one's


def make_world(name: str, seed: int, heldout: bool = False, seconds: float = 20.0) -> World:
    """A video of 2-3 shapes of distinct kinds, each in its own cell: a training video never puts a
    shape-colour pair in its :func:`heldout_cell`, a held-out video always does."""
    rng = random.Random(seed)
    world = World(name, seconds, seed=seed)
    while True:  # shapes, colours and cells as the split allows (a few tries at most)
        shapes = rng.sample(SHAPES, rng.choice((2, 3)))
        colors = [rng.choice(list(COLORS)) for _ in shapes]
        if heldout:
            cells = [heldout_cell(k, c) for k, c in zip(shapes, colors)]
        else:
            cells = rng.sample(range(CELLS), len(shapes))
        if len(set(cells)) == len(cells) and all((heldout_cell(k, c) == cell) == heldout
                                                 for k, c, cell in zip(shapes, colors, cells)):
            break
    t_in = float(rng.randint(*FIRST_APPEARANCE))  # whole seconds (StreamingBench's stamps are exact), 2-6 s apart: one event
    for shape, color, cell in zip(shapes, colors, cells):  # at a time, and room for the ones between
        cy, cx = cell_centre(cell)
        start = (cy + rng.uniform(-1.0, 1.0), cx + rng.uniform(-1.0, 1.0))
        velocity = (0.0, rng.choice((-1.0, 1.0)) * rng.uniform(0.05, 0.1))  # drifts 2 px at most: on its tokens
        track = Track(shape, color, t_in, seconds, start, velocity, cell=cell)
        if rng.random() < 0.5:  # changes colour once, to one a training video may show there
            track.t_change = min(seconds - 2.0, t_in + float(rng.randint(3, 6)))
            track.new_color = rng.choice([c for c in COLORS if c != color and heldout_cell(shape, c) != cell])
        if rng.random() < 0.3:
            track.t_out = min(seconds, (track.t_change or t_in) + float(rng.randint(3, 6)))
        world.tracks.append(track)
        t_in += float(rng.randint(*APPEARANCE_GAP))
    return world


# -- questions from the ground truth ------------------------------------------------------------------
# Options are listed in one fixed order (every colour; every shape and a "star" that never shows), so
# the letter says the answer and a small model need not learn to find its answer among shuffled
# option texts; which option is right still depends only on what the video shows.
COLOR_OPTIONS = list(COLORS)
SHAPE_OPTIONS = list(SHAPES) + ["star"]


def _item(task: str, t: float, question: str, correct: str, pool: list[str]) -> dict:
    return {"task": task, "time": t, "question": question, "options": list(pool), "gt": pool.index(correct)}


def realtime_items(world: World, rng: random.Random, anytime: bool = False) -> list[dict]:
    """Questions about what is visible at the moment they are asked: a colour (ATR), a shape (OJR).
    Asked 1 s after the shape appears (before any change); ``anytime``: at a random whole second
    while it is visible (training)."""
    items = []
    for k in world.tracks:
        if anytime:
            span = [float(t) for t in range(int(k.t_in) + 1, int(math.ceil(k.t_out))) if k.visible(t)]
            if not span:
                continue
            t = rng.choice(span)
        else:
            t = k.t_in + 1.0
            if k.t_change is not None and k.t_change <= t + 1.0 or not k.visible(t):
                continue
        items.append(_item("ATR", t, f"What is the color of the {k.shape}?", k.color_at(t), COLOR_OPTIONS))
        color = k.color_at(t)
        if sum(o.color_at(t) == color for o in world.visible(t)) == 1:
            items.append(_item("OJR", t, f"What shape is {color}?", k.shape, SHAPE_OPTIONS))
    return items


def backward_items(world: World, rng: random.Random, anytime: bool = False) -> list[dict]:
    """Questions about the past: a shape's colour before it changed (EPM), which shape came first (ASI).
    ``anytime``: at a random whole second after the change / the last appearance (training)."""
    items = []
    end = int(world.seconds) - 1
    for k in world.tracks:
        if k.t_change is None:
            continue
        times = [float(t) for t in range(int(k.t_change) + 1, end + 1) if k.visible(t)]
        t = (rng.choice(times) if anytime else k.t_change + 1.0) if times else None
        if t is not None and k.visible(t):
            items.append(_item("EPM", t, f"What color was the {k.shape} when it first appeared?", k.color,
                               COLOR_OPTIONS))
    order = sorted(world.tracks, key=lambda k: k.t_in)
    if len(order) >= 2:
        t = float(rng.randint(int(order[-1].t_in) + 1, end)) if anytime else order[-1].t_in + 1.5
        items.append(_item("ASI", t, "Which shape appeared first?", order[0].shape, SHAPE_OPTIONS))
    return items


LEAD = (3, 10)  # seconds an instruction comes before its event, uniform (a fixed delay cannot guess it)
EVAL_INSTRUCTIONS = 2  # at most, per held-out video, one standing at a time


def other_events(world: World, track: Track) -> list[float]:
    """When something else happens in ``world``: another shape appears, changes colour or leaves."""
    out = []
    for o in world.tracks:
        if o is not track:
            out += [o.t_in] + [t for t in (o.t_change, o.t_out) if t is not None and t < world.seconds]
    return sorted(out)


def _instruction(k: Track, ask: float) -> dict:
    return {"time": ask, "due": k.t_in, "shape": k.shape, "color": k.color,
            "question": f"When a {k.shape} appears, output \"{k.shape}\".", "output": k.shape}


def proactive_items(world: World, rng: random.Random, training: bool = False) -> list[dict]:
    """Standing instructions ("when a ring appears, output ring") and when the answer is due.

    Evaluation: up to :data:`EVAL_INSTRUCTIONS` a video, one standing at a time (the next comes after the
    last one's window closed), each a :data:`LEAD` drawn uniformly before its shape appears, with
    something else happening in between (another shape appearing, changing colour or leaving): what
    answers at once, after every frame, on the first change or after a fixed delay answers too early
    (README "Proactive scoring"). ``training``: one for every shape, 2-10 s before it as the video
    allows, and one for the star, which never comes (``due`` None)."""
    items = []
    if training:
        for k in world.tracks:
            items.append(_instruction(k, k.t_in - rng.randint(min(2, int(k.t_in)), min(LEAD[1], int(k.t_in)))))
        items.append({"time": float(rng.randint(0, 8)), "due": None, "shape": "star", "color": None,
                      "question": 'When a star appears, output "star".', "output": "star"})
        return items
    free, chosen = 0.0, []
    for _ in range(EVAL_INSTRUCTIONS):
        for _ in range(8):  # a lead first, then a shape it fits (the leads stay near uniform)
            lead = rng.randint(*LEAD)
            fits = [k for k in world.tracks if k.t_in - lead >= free and k not in chosen
                    and any(k.t_in - lead < e < k.t_in for e in other_events(world, k))]
            if fits:
                k = rng.choice(fits)
                chosen.append(k)
                items.append(_instruction(k, k.t_in - lead))
                free = k.t_in + 2.0 + 1.0  # its window, and a frame's gap
                break
    return items


def appearances_so_far(world: World, t: float) -> int:
    return sum(k.t_in <= t for k in world.tracks)


# -- writing ------------------------------------------------------------------------------------------
def _clock(t: float) -> str:
    s = int(math.floor(t))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _letter(i: int) -> str:
    return chr(65 + i)


def _qa(item: dict, rng: random.Random) -> list[dict]:
    """A multiple-choice question and its answer, worded as OVO-Bench or as StreamingBench asks it."""
    if rng.random() < 0.5:
        prompt = mc_prompt(item["question"], item["options"])
    else:
        prompt = sb_prompt(item["question"], [f"{_letter(i)}. {o}" for i, o in enumerate(item["options"])])
    return [{"role": "user", "content": prompt, "time": item["time"]},
            {"role": "assistant", "content": _letter(item["gt"]), "time": item["time"]}]


def _count_qa(world: World, t: float) -> list[dict]:
    return [{"role": "user", "content": rec_prompt("appear"), "time": t},
            {"role": "assistant", "content": str(appearances_so_far(world, t)), "time": t}]


def object_world(name: str, seed: int) -> World:
    """One shape, still, in a random cell (never its held-out one): the stage 1 pictures, where a shape is
    seen alone and described ("red ring"), so that learning to see shapes needs no question to point at it."""
    rng = random.Random(seed)
    while True:
        shape, color, cell = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.randrange(CELLS)
        if heldout_cell(shape, color) != cell:
            break
    cy, cx = (v + rng.uniform(-1.0, 1.0) for v in cell_centre(cell))  # on its middle token, as in the videos
    return World(name, 1.0, [Track(shape, color, 0.0, 1.0, (cy, cx), (0.0, 0.0), cell=cell)], seed=seed)


IMAGES_PER_VIDEO = 8  # frames saved from each training video for stage 2
OBJECT_IMAGES_PER_VIDEO = 16  # one-shape pictures for stage 1, per training video
STREAM_SAMPLES_PER_VIDEO = 3  # each with its own question times, wordings and instruction


def training_samples(world: World, video: str, images: list[tuple[str, float]],
                     rng: random.Random) -> dict[str, list[dict]]:
    """Stages 2-4's samples for one training video (stage 1's pictures are :func:`object_world`'s):
    LLaVA format for 2 (``images``: (path, time) of frames saved from it), stream format for 3
    (``video-turn``: a clip cut at each question) and 4 (``stream``: timed questions, answers and one
    instruction with its announcement)."""
    out: dict[str, list[dict]] = {"stage1": [], "stage2": [], "stage3": [], "stage4": []}
    for image, t_img in images:
        seen = world.visible(t_img)
        if not seen:
            continue
        # the whole picture described, cell by cell ("green ring, yellow triangle"): every shape with its colour
        described = ", ".join(f"{k.color_at(t_img)} {k.shape}" for k in sorted(seen, key=lambda k: k.cell))
        out["stage2"].append({"image": image, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": described}]})
        for k in seen:  # each question answered in a word, and as a multiple choice
            color = k.color_at(t_img)
            asked = [(f"What is the color of the {k.shape}?", color, COLOR_OPTIONS)]
            if sum(o.color_at(t_img) == color for o in seen) == 1:
                asked.append((f"What shape is {color}?", k.shape, SHAPE_OPTIONS))
            for question, answer, pool in asked:
                choice = _qa(_item("", t_img, question, answer, pool), rng)
                for prompt, reply in ((question, answer), (choice[0]["content"], choice[1]["content"])):
                    out["stage2"].append({"image": image, "conversations": [
                        {"from": "human", "value": "<image>\n" + prompt}, {"from": "gpt", "value": reply}]})
    for item in backward_items(world, rng, anytime=True) + realtime_items(world, rng, anytime=True):
        out["stage3"].append({"video": video, "start_time": 0.0, "end_time": item["time"], "layout": "video-turn",
                              "conversation": _qa(item, rng)})
    instructions = proactive_items(world, rng, training=True)
    for n in range(STREAM_SAMPLES_PER_VIDEO):
        turns: list[tuple[float, int, list[dict]]] = []  # (time, order, messages): a question and its answer together
        for item in realtime_items(world, rng, anytime=True) + backward_items(world, rng, anytime=True):
            turns.append((item["time"], len(turns), _qa(item, rng)))
        t_count = float(rng.randint(1, int(world.seconds) - 1))
        turns.append((t_count, len(turns), _count_qa(world, t_count)))
        p = instructions[n % len(instructions)]
        turns.append((p["time"], len(turns), [{"role": "user", "content": p["question"], "time": p["time"]},
                                              {"role": "assistant", "content": "OK.", "time": p["time"]}]))
        if p["due"] is not None:
            turns.append((p["due"], len(turns), [{"role": "assistant", "content": p["output"], "time": p["due"]}]))
        conv = _untangled(turns)
        out["stage4"].append({"video": video, "start_time": 0.0, "end_time": world.seconds, "layout": "stream",
                              "conversation": conv})
    return out


def _untangled(turns: list[tuple[float, int, list[dict]]]) -> list[dict]:
    """The turns in time order, a question never at the same time as the announcement (the announcement
    comes right after its frame; a question then moves half a second on)."""
    due = {msgs[0]["time"] for _, _, msgs in turns if msgs[0]["role"] == "assistant"}
    fixed = []
    for t, order, msgs in turns:
        if msgs[0]["role"] == "user" and t in due:
            t = t + 0.5
            msgs = [dict(m, time=t) for m in msgs]
        fixed.append((t, order, msgs))
    return [m for _, _, msgs in sorted(fixed, key=lambda x: (x[0], x[1])) for m in msgs]


def mc_prompt(question: str, options: list[str]) -> str:
    """A multiple-choice prompt as OVO-Bench words it (``constant.BR_PROMPT_TEMPLATE``)."""
    formatted = "; ".join(f"{_letter(i)}. {o}" for i, o in enumerate(options)) + ";"
    return (f"\nQuestion: {question}\nOptions:\n{formatted}\n\nRespond only with the letter corresponding to your "
            "chosen option (e.g., A, B, C). \nDo not include any additional text or explanation in your response.\n")


def sb_prompt(question: str, options: list[str]) -> str:
    """A multiple-choice prompt as StreamingBench words it (``StreamingBench.py``; ``options`` "A. ...")."""
    return ("You are an advanced video question-answering AI assistant. You have been provided with some frames from "
            "the video and a multiple-choice question related to the video. Your task is to carefully analyze the "
            "video and provide the best answer to question, choosing from the four options provided. Respond with "
            f"only the letter (A, B, C, or D) of the correct option.\n\nQuestion: {question}\n\nOptions:\n"
            + "\n".join(options[:4]) + "\n\nThe best option is:")


def rec_prompt(activity: str) -> str:
    """OVO-Bench's counting prompt (``constant.REC_PROMPT_TEMPLATE``) for ``activity``."""
    return ("\nYou're watching a video in which people may perform a certain type of action repetively. \n"
            "The person performing this kind of action are referred to as 'they' in the following statement.\n"
            "You're task is to count how many times have different people in the video perform this kind of action "
            "in total.\nOne complete motion counts as one. \nNow, answer the following question: How many times did "
            f"they {activity}?\nProvide your answer as a single number (e.g., 0, 1, 2, 3…) indicating the total "
            "count.\nDo not include any additional text or explanation in your response.\n")


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
            "required_ability": "working memory"} for p in proactive_items(world, rng)]
    return rec, ({"time": span, "questions": pro, "video_categories": "synthetic", "video_path": f"./{video}"}
                 if pro else None)


def h264(frames: list[np.ndarray], scratch: Path) -> list[np.ndarray]:
    """``frames`` as a video's decoder gives them back: through H.264 at :data:`FPS` (stages 1-2's pictures
    go through the same round trip as the videos the evaluation decodes)."""
    write_video_file(scratch, frames, FPS)
    try:
        out = [f.rgb for f in read_video_file(scratch, fps=FPS)]
    finally:
        scratch.unlink(missing_ok=True)
    if len(out) != len(frames):
        raise RuntimeError(f"H.264 round trip: {len(frames)} frames in, {len(out)} out")
    return out


def _write_eval(out: Path, sub: str, worlds: list[tuple[World, str]], rng: random.Random) -> dict[str, Path]:
    """A held-out set's annotations (OVO-Bench, StreamingBench real-time and proactive) into ``out/sub``."""
    ovo: list[dict] = []
    sb_real: list[dict] = []
    sb_pro: list[dict] = []
    for world, video in worlds:
        ovo += ovo_items(world, video, rng, len(ovo))
        real, pro = streamingbench_items(world, video, rng)
        sb_real.append(real)
        if pro is not None:
            sb_pro.append(pro)
    (out / sub).mkdir(parents=True, exist_ok=True)
    files = {}
    for name, data in (("ovo_bench_new.json", ovo), ("questions_real.json", sb_real),
                       ("questions_proactive.json", sb_pro)):
        files[name] = out / sub / name
        files[name].write_text(json.dumps(data, indent=1))
    return files


HELDOUT_SETS = ("compositional", "in_distribution")  # the two held-out sets' folders under the output


def write_synth(out_dir: str | Path, train_videos: int = 24, heldout_videos: int = 8, seed: int = 0,
                say=print, indist_videos: int | None = None) -> dict[str, Path]:
    """Render the world into ``out_dir``; returns the files written, by name (a held-out set's as
    ``"<set>/<file>"``). Two held-out sets, annotated alike: ``compositional/`` (``heldout_videos`` videos
    that show every shape in the one cell where training never shows it in that colour) and
    ``in_distribution/`` (``indist_videos``, as many by default: videos made as the training videos are,
    never trained on)."""
    from PIL import Image

    indist_videos = heldout_videos if indist_videos is None else indist_videos
    if train_videos < 1 or heldout_videos < 1 or indist_videos < 1:
        raise ValueError(f"synth needs at least one video of each kind, got {train_videos} training, "
                         f"{heldout_videos} compositional and {indist_videos} in-distribution")
    out = Path(out_dir)
    for sub in ("videos", "images"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    stages: dict[str, list[dict]] = {"stage1": [], "stage2": [], "stage3": [], "stage4": []}
    held: dict[str, list[tuple[World, str]]] = {k: [] for k in HELDOUT_SETS}
    plan = ([("train", i, False) for i in range(train_videos)]
            + [("heldout", train_videos + i, True) for i in range(heldout_videos)]
            + [("indist", train_videos + heldout_videos + i, False) for i in range(indist_videos)])
    scratch = out / "videos" / ".roundtrip.mp4"
    for n, (kind, i, compositional) in enumerate(plan):
        name = f"{kind}_{i:04d}"
        world = make_world(name, seed * 100003 + i, heldout=compositional)
        video = f"videos/{name}.mp4"
        write_video_file(out / video, world.frames(), FPS)
        if kind != "train":
            held["compositional" if compositional else "in_distribution"].append((world, video))
        else:
            decoded = [f.rgb for f in read_video_file(out / video, fps=FPS)]  # pictures as the decoder shows them
            images = []
            times = [max(k.t_in for k in world.tracks) + 0.5] + [rng.uniform(2.0, world.seconds)
                                                                 for _ in range(IMAGES_PER_VIDEO - 1)]
            for j, t_img in enumerate(times):
                image = f"images/{name}_{j}.png"
                index = min(len(decoded) - 1, int(t_img * FPS))
                Image.fromarray(decoded[index]).save(out / image)
                images.append((image, index / FPS))
            for stage, samples in training_samples(world, video, images, rng).items():
                stages[stage] += samples
            alone = [object_world(f"{name}_one{j}", rng.randrange(2**31)) for j in range(OBJECT_IMAGES_PER_VIDEO)]
            pictures = h264([w.frames()[0] for w in alone], scratch)
            for w, picture in zip(alone, pictures):
                image = f"images/{w.name}.png"
                Image.fromarray(picture).save(out / image)
                k = w.tracks[0]
                stages["stage1"].append({"image": image, "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": f"{k.color} {k.shape}"}]})
        if say is not None and ((n + 1) % 8 == 0 or n + 1 == len(plan)):
            say(f"synth: {n + 1}/{len(plan)} videos")
    files = {}
    for stage, samples in stages.items():
        files[stage] = out / f"{stage}.jsonl"
        files[stage].write_text("".join(json.dumps(s) + "\n" for s in samples))
    for sub, worlds in held.items():
        files.update({f"{sub}/{k}": v for k, v in _write_eval(out, sub, worlds, rng).items()})
    return files
