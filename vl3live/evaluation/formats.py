"""The streaming benchmarks' own annotation files, read into probes: what to ask, when, and what is right.

- **OVO-Bench** (``data/ovo_bench_new.json``): a list of records with ``id``, ``task``, ``video``.
  Backward (EPM, ASI, HLD) and real-time (STU, OJR, ATR, ACR, OCR, FPD) records have ``realtime``
  (seconds), ``question``, ``options`` and ``gt`` (the index of the right option). Forward-active
  records (REC, SSR, CRR) have ``test_info``: probes at increasing ``realtime``s, with ``count``
  (REC), or ``type`` 0/1 for no/yes (SSR with its ``step``; CRR with the record's ``question``).
  Prompts are OVO-Bench's own templates (``constant.py``), options formatted as its ``build_prompt``.
- **StreamingBench** (``src/data/questions_real.json`` and friends): a list of videos, each with
  ``video_path`` and ``questions``: ``task_type``, ``question``, ``time_stamp`` ("HH:MM:SS"),
  ``options`` ("A. ...") and ``answer`` (a letter). ``questions_proactive.json`` items have
  ``ground_truth_time_stamp`` and ``ground_truth_output`` instead: the first answer must come at
  that time or within 2 s after it and contain that output; anything said before it, or naming
  something else, is a false alarm (:func:`score_proactive`).

Everything here is pure: files in, :class:`Probe` lists out, scored by :func:`score`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

OVO_BACKWARD = ("EPM", "ASI", "HLD")
OVO_REALTIME = ("OCR", "ACR", "ATR", "STU", "FPD", "OJR")
OVO_FORWARD = ("REC", "SSR", "CRR")
PROACTIVE_WINDOW = 2.0  # seconds: StreamingBench's "within 2 s of the ground-truth time"

# OVO-Bench constant.py, verbatim
OVO_BR_PROMPT = """
Question: {}
Options:
{}

Respond only with the letter corresponding to your chosen option (e.g., A, B, C). 
Do not include any additional text or explanation in your response.
"""
OVO_REC_PROMPT = """
You're watching a video in which people may perform a certain type of action repetively. 
The person performing this kind of action are referred to as 'they' in the following statement.
You're task is to count how many times have different people in the video perform this kind of action in total.
One complete motion counts as one. 
Now, answer the following question: {}
Provide your answer as a single number (e.g., 0, 1, 2, 3…) indicating the total count.
Do not include any additional text or explanation in your response.
"""
OVO_SSR_PROMPT = """
You're watching a tutorial video which contain a sequential of steps. 
The following is one step from the whole procedures: 
{}
Your task is to determine if the man or woman in the video is currently performing this step.
Answer only with “Yes” or “No”.
Do not include any additional text or explanation in your response.
"""
OVO_CRR_PROMPT = """
You're responsible of answering questions based on the video content. 
The following question are relevant to the latest frames, i.e. the end of the video.
{}
Decide whether existing visual content, especially latest frames, i.e. frames that near the end of the video, provide enough information for answering the question.
Answer only with “Yes” or “No”.
Do not include any additional text or explanation in your response.
"""
# StreamingBench src/benchmark/StreamingBench.py and StreamingBenchProactive.py, verbatim
SB_PROMPT = """You are an advanced video question-answering AI assistant. You have been provided with some frames from the video and a multiple-choice question related to the video. Your task is to carefully analyze the video and provide the best answer to question, choosing from the four options provided. Respond with only the letter (A, B, C, or D) of the correct option.

Question: {}

Options:
{}
{}
{}
{}"""
SB_PROACTIVE_PROMPT = """You are an advanced image question-answering AI assistant. You have been provided with images and a question related to the images. Your task is to carefully analyze the images and provide the answer to the question. You need to carefully confirm whether the images content meet the conditions of the question, and then output the correct content.

Question: {}

The answer is:
"""


@dataclass
class Probe:
    """One question asked into a video's stream at ``time`` (seconds), and how its answer is scored."""

    key: str  # unique in a run: "<benchmark>:<id>[:<probe>]" (results are appended and resumed by it)
    benchmark: str  # ovo | streamingbench
    task: str  # EPM ... CRR; StreamingBench's task_type
    category: str  # backward | realtime | forward | proactive
    video: Path
    time: float
    prompt: str
    kind: str  # choice | yesno | count | proactive
    expected: str | int  # a letter, "Yes"/"No", a count, or the output a proactive answer must contain
    due: float | None = None  # proactive: when the answer is due
    question: str = ""  # the benchmark's own question text (proactive: the standing instruction)
    source: str = ""  # the annotation file it comes from: its probes of one video share a session


@dataclass
class VideoJob:
    """Every probe of one annotation file on one video, in time order: one live session streams it and
    asks them (two files naming the same video get a session each, as each benchmark runs alone)."""

    video: Path
    probes: list[Probe] = field(default_factory=list)
    source: str = ""


def _letter(i: int) -> str:
    return chr(65 + i)


def ovo_prompt(task: str, record: dict, index: int | None = None) -> str:
    """The prompt OVO-Bench's ``build_prompt`` makes for a record (and its ``index``-th probe)."""
    if task in OVO_BACKWARD + OVO_REALTIME:
        formatted = "; ".join(f"{_letter(i)}. {o}" for i, o in enumerate(record["options"])) + ";"
        return OVO_BR_PROMPT.format(record["question"], formatted)
    if task == "REC":
        return OVO_REC_PROMPT.format("How many times did they " + record["activity"] + "?")
    if task == "SSR":
        return OVO_SSR_PROMPT.format(record["test_info"][index]["step"])
    if task == "CRR":
        return OVO_CRR_PROMPT.format(record["question"])
    raise ValueError(f"unknown OVO-Bench task {task!r}")


def read_ovo(path: str | Path, video_dir: str | Path) -> list[Probe]:
    """OVO-Bench's ``ovo_bench_new.json`` as probes (videos under ``video_dir``, as its ``--video_dir``)."""
    records = json.loads(Path(path).read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path}: OVO-Bench annotations are a JSON list of records")
    out = []
    for r in records:
        task, rid, video = r["task"], r["id"], Path(video_dir) / r["video"]
        if task in OVO_BACKWARD + OVO_REALTIME:
            out.append(Probe(f"ovo:{rid}", "ovo", task, "backward" if task in OVO_BACKWARD else "realtime", video,
                             float(r["realtime"]), ovo_prompt(task, r), "choice", _letter(r["gt"]),
                             question=r["question"], source=str(path)))
        elif task in OVO_FORWARD:
            for i, info in enumerate(r["test_info"]):
                kind, expected = ("count", int(info["count"])) if task == "REC" else \
                    ("yesno", "Yes" if info["type"] == 1 else "No")
                out.append(Probe(f"ovo:{rid}:{i}", "ovo", task, "forward", video, float(info["realtime"]),
                                 ovo_prompt(task, r, i), kind, expected,
                                 question=r.get("question") or info.get("step") or r.get("activity", ""),
                                 source=str(path)))
        else:
            raise ValueError(f"{path}: record {rid}: unknown OVO-Bench task {task!r}")
    return out


def seconds(stamp: str) -> float:
    """StreamingBench's "HH:MM:SS" (or "MM:SS") as seconds."""
    return float(sum(int(x) * 60 ** i for i, x in enumerate(reversed(stamp.split(":")))))


def sb_prompt(question: str, options: list[str]) -> str:
    """The prompt StreamingBench's ``StreamingBenchEval`` makes for a multiple-choice question."""
    if not options[0].startswith("A."):
        options = [f"{_letter(i)}. {o}" for i, o in enumerate(options)]
    return SB_PROMPT.format(question, *options[:4]) + "\n\nThe best option is:"


def read_streamingbench(path: str | Path, video_dir: str | Path) -> list[Probe]:
    """A StreamingBench questions file (real-time or proactive) as probes; ``video_path`` is relative to
    ``video_dir`` (StreamingBench's own files say ``./videos/...``)."""
    videos = json.loads(Path(path).read_text())
    if not isinstance(videos, list):
        raise ValueError(f"{path}: StreamingBench questions are a JSON list of videos")
    out = []
    for v, entry in enumerate(videos):
        video = Path(video_dir) / entry["video_path"]
        for q, item in enumerate(entry["questions"]):
            key = f"streamingbench:{Path(path).stem}:{v}:{q}"
            t = seconds(item["time_stamp"])
            if "ground_truth_time_stamp" in item:
                out.append(Probe(key, "streamingbench", item["task_type"], "proactive", video, t,
                                 SB_PROACTIVE_PROMPT.format(item["question"]), "proactive",
                                 item["ground_truth_output"], due=seconds(item["ground_truth_time_stamp"]),
                                 question=item["question"], source=str(path)))
            else:
                out.append(Probe(key, "streamingbench", item["task_type"], "realtime", video, t,
                                 sb_prompt(item["question"], item["options"]), "choice", item["answer"].strip()[:1],
                                 question=item["question"], source=str(path)))
    return out


def jobs(probes: list[Probe]) -> list[VideoJob]:
    """Probes grouped by annotation file and video, each group's in time order (in first-appearance order)."""
    by: dict[tuple[str, Path], VideoJob] = {}
    for p in probes:
        by.setdefault((p.source, p.video), VideoJob(p.video, source=p.source)).probes.append(p)
    for job in by.values():
        job.probes.sort(key=lambda p: (p.time, p.key))
    return list(by.values())


# -- answers ------------------------------------------------------------------------------------------
_LETTER = re.compile(r"(?<![A-Za-z])([A-D])(?![A-Za-z])")
_YESNO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse(kind: str, text: str) -> str | int | None:
    """The answer in ``text``: an option letter, "Yes"/"No" or a count; None when it has none (counted)."""
    if kind == "choice":
        m = _LETTER.search(text.strip())
        return m.group(1) if m else None
    if kind == "yesno":
        m = _YESNO.search(text)
        return m.group(1).capitalize() if m else None
    if kind == "count":
        digits = "".join(re.findall(r"\d+", text))  # as OVO-Bench's REC scorer joins them
        return int(digits) if digits else None
    raise ValueError(f"no parser for {kind!r}")


def score_proactive(probe: Probe, answers: list[tuple[float, str]]) -> dict:
    """A proactive item, from the times and texts the model spoke by itself between the instruction and
    the close of the item's window (``due`` + 2 s).

    The rules (README "Proactive scoring"): the item is *recalled* when the model's first answer comes
    between the event and 2 s after it (``due <= t <= due + 2``) and names the expected output. Every
    other answer is a *false alarm*: one before the event (it cannot have seen it), one naming
    something else, one for an event that never comes. The expected output said again inside the window
    (after the first answer) is a repeat, and after the window it is late (a miss): neither counts as a
    false alarm. So answering at once, after every frame, or on any change in the picture cannot pass:
    those answers come before the event."""
    due, expected = probe.due, str(probe.expected).lower()
    hit: tuple[float, str] | None = None
    alarms: list[float] = []
    repeats = late = 0
    for t, text in sorted(answers, key=lambda a: a[0]):
        names = expected in text.lower()
        if names and due is not None and due <= t <= due + PROACTIVE_WINDOW:
            if hit is None and not alarms:
                hit = (t, text)
            else:  # right, but not the first thing it said: no recall, no false alarm
                repeats += 1
        elif names and due is not None and t > due + PROACTIVE_WINDOW:
            late += 1  # the right output too late: a miss, not a false alarm
        else:
            alarms.append(t)
    watched = max(0.0, due + PROACTIVE_WINDOW - probe.time) if due is not None else 0.0
    return {"correct": hit is not None, "false_alarm": bool(alarms), "false_alarms": len(alarms), "late": late,
            "repeats": repeats, "watched_s": round(watched, 2),
            "answered_at": hit[0] if hit else (min(a[0] for a in answers) if answers else None),
            "delay": round(hit[0] - due, 2) if hit else None}
