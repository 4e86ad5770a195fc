"""``vl3live eval``: OVO-Bench and StreamingBench, online on the live engine or by their own offline protocol.

    vl3live eval --ovo data/ovo_bench_new.json --videos data/src_videos --out runs/eval
    vl3live eval --streamingbench src/data/questions_real.json --videos src/data --protocol offline

Reads the benchmarks' own annotation files (``formats.py``); ``--protocol online`` (default) runs one
live session per video and asks each question into it at its time (``online.py``), ``offline``
re-cuts the clip at each question and calls stock transformers afresh (``offline.py``). Every
scored probe is appended to ``OUT/results_<protocol>.jsonl`` at once, and a rerun skips what is
there (a killed run resumes; ``OUT/run_<protocol>.json`` records the model and settings, and a rerun
with others is refused rather than mixed in); at the end ``OUT/summary_<protocol>.json`` and a markdown table
(``report.py``) are written and printed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, add_dataclass_arguments, dataclass_from_args, load_config
from ..terminal import interruptible, load
from .formats import Probe, VideoJob, jobs, read_ovo, read_streamingbench
from .report import Results, markdown, summarize

HELP = "OVO-Bench / StreamingBench: online on the live engine, or their offline protocol"


@dataclass
class EvalConfig:
    """``vl3live eval`` options."""

    ovo: list[str] = field(default_factory=list, metadata={"help": "OVO-Bench annotation file(s) (ovo_bench_new.json)"})
    streamingbench: list[str] = field(default_factory=list, metadata={
        "help": "StreamingBench questions file(s) (questions_real.json, questions_proactive.json, ...)"})
    videos: str = field(default=".", metadata={"help": "the videos' root directory (the files' paths are relative "
                                                       "to it, as each benchmark's own --video_dir)"})
    out: str = field(default="runs/eval", metadata={"help": "results directory (a rerun resumes there)"})
    protocol: str = field(default="online", metadata={"help": "online (one live session per video and file) | offline "
                                                              "(the benchmark's own: a fresh call per question)"})
    fps: float = field(default=1.0, metadata={"help": "frames per second streamed (and sampled for offline clips)"})
    parallel: int = field(default=1, metadata={"help": "online: videos run at once, as sessions of one engine"})
    context: float | None = field(default=None, metadata={"help": "offline: seconds of video before each question "
                                                                  "(StreamingBench's context_time); None = all"})
    max_new_tokens: int = field(default=16, metadata={"help": "answer length limit"})
    limit: int | None = field(default=None, metadata={"help": "only the first N sessions (a video of one file each; a quick look)"})
    model: str | None = field(default=None, metadata={"help": "overrides model.spec (tiny | dir | hub id)"})

    def __post_init__(self) -> None:
        if not self.ovo and not self.streamingbench:
            raise ValueError("give --ovo FILE and/or --streamingbench FILE")
        if self.protocol not in ("online", "offline"):
            raise ValueError(f"--protocol must be online or offline, got {self.protocol!r}")
        if self.fps <= 0 or self.parallel < 1 or self.max_new_tokens < 1:
            raise ValueError("--fps must be > 0, --parallel and --max-new-tokens >= 1")


def load_probes(cfg: EvalConfig) -> list[Probe]:
    probes: list[Probe] = []
    for path in cfg.ovo:
        probes += read_ovo(path, cfg.videos)
    for path in cfg.streamingbench:
        probes += read_streamingbench(path, cfg.videos)
    missing = sorted({str(p.video) for p in probes if not p.video.is_file()})
    if missing:
        raise FileNotFoundError(f"{len(missing)} video(s) named by the annotations are not under --videos "
                                f"{cfg.videos}: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return probes


class Progress:
    """One status line on stderr: probes scored of all, and how many were right."""

    def __init__(self, total: int, done: int, err=sys.stderr):
        self.total, self.n, self.right, self.err = total, done, 0, err

    def __call__(self, row: dict) -> None:
        self.n += 1
        self.right += bool(row.get("correct"))
        width = 30
        filled = int(width * self.n / max(1, self.total))
        print(f"\r[eval] [{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} scored, {self.right} right "
              "this run", end="", file=self.err, flush=True)


def run_identity(cfg: EvalConfig, config: Config) -> dict:
    """What a resumed run must share with the one that wrote ``cfg.out``'s results: the model (for a
    checkpoint folder, its weight files' sizes and times too: retrained in place, it is another model),
    the settings answers depend on."""
    spec = cfg.model or config.model.spec
    folder = Path(spec)
    weights = sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in folder.glob("*.safetensors")) \
        if folder.is_dir() else []
    identity = {"model": spec, "weights": weights, "fps": cfg.fps, "context": cfg.context,
                "max_new_tokens": cfg.max_new_tokens, "session": dataclasses.asdict(config.session),
                "engine": dataclasses.asdict(config.engine) if cfg.protocol == "online" else None}
    return json.loads(json.dumps(identity, default=str))  # as it reads back from the file


def _claim(out: Path, protocol: str, identity: dict) -> None:
    """Refuse to resume another run's results; record this run's identity."""
    path = out / f"run_{protocol}.json"
    if path.exists() and (results := out / f"results_{protocol}.jsonl").exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
        if changed:
            raise ValueError(f"{out} holds {protocol} results of another run ({', '.join(changed)} differ): give "
                             f"another --out, or delete {results} to start over")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=1))


def evaluate(cfg: EvalConfig, config: Config, err=sys.stderr) -> dict:
    """Run ``cfg`` (resuming from what ``cfg.out`` holds, if the same model and settings wrote it);
    returns the summary."""
    probes = load_probes(cfg)
    _claim(Path(cfg.out), cfg.protocol, run_identity(cfg, config))
    work = jobs(probes)[: cfg.limit] if cfg.limit else jobs(probes)
    results = Results(Path(cfg.out) / f"results_{cfg.protocol}.jsonl")
    keys = {p.key for j in work for p in j.probes}
    total = len(keys)
    todo = [VideoJob(job.video, [p for p in job.probes if p.key not in results.done], job.source) for job in work]
    todo = [job for job in todo if job.probes]
    print(f"eval ({cfg.protocol}): {total} probes in {len(work)} sessions (a video of one annotation file each); "
          f"{len(keys & results.done)} already scored",
          file=err, flush=True)
    progress = Progress(total, total - sum(len(j.probes) for j in todo), err)

    def sink(row: dict) -> None:
        results.add(row)
        progress(row)
    lm = load(cfg.model, config, err)
    if cfg.protocol == "online":
        asyncio.run(_online(lm, config, cfg, todo, sink))
    else:
        from .offline import run_offline

        run_offline(lm, todo, cfg.fps, config.session.frame_pixels, sink, cfg.context, cfg.max_new_tokens)
    print(file=err)
    summary = summarize([r for r in results.rows if r["key"] in keys])
    out = Path(cfg.out)
    (out / f"summary_{cfg.protocol}.json").write_text(json.dumps(summary, indent=1))
    (out / f"summary_{cfg.protocol}.md").write_text(markdown(summary, cfg.protocol) + "\n")
    return summary


async def _online(lm, config: Config, cfg: EvalConfig, todo, sink) -> None:
    from streamer.engine import Engine

    from .online import run_online

    engine_cfg = dataclasses.replace(config.engine, fps=cfg.fps, max_new_tokens=max(cfg.max_new_tokens,
                                                                                   config.engine.max_new_tokens))
    async with Engine(lm, engine_cfg, config.session, max(cfg.parallel, 1)) as engine:
        await run_online(engine, todo, cfg.fps, sink, cfg.parallel, cfg.max_new_tokens)


def add_arguments(p) -> None:
    add_dataclass_arguments(p, EvalConfig)


def run(args) -> int:
    cfg = dataclass_from_args(EvalConfig, args)
    summary = {}

    def go() -> None:
        summary.update(evaluate(cfg, load_config(args.config, args.overrides)))
    interruptible(go)
    if summary:
        print(markdown(summary, cfg.protocol))
        print(json.dumps(summary))
    return 0
