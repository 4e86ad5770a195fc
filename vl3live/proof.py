"""``vl3live proof OUT``: the whole loop on CPU, end to end, from random weights to scored answers.

1. ``vl3live data synth``: the synthetic world (training videos and held-out ones, which show each
   shape in a colour and place no training video shows it in) into ``OUT/data``;
2. the four VideoLLaMA3 stages with ``vl3live train`` and ``configs/proof/stage{1..4}.yaml``, each
   from the previous stage's model (stage 1 from the random ``random-small`` model), into
   ``OUT/stageN``;
3. ``vl3live eval`` on the held-out videos' OVO-Bench and StreamingBench annotations, online on the
   live engine (the stage 4 config: stream layout, the model speaks up by itself) and by the
   benchmarks' offline protocol on stock transformers;
4. the goals (:data:`GOALS`) against what was measured, as a table (``OUT/proof.md``, ``OUT/proof.json``).

A stage whose ``final`` model is there, trained from the same data, config and earlier stages, is not
trained again (one whose recipe changed is, with every stage after it), and the evaluation resumes
from its results files: a killed run goes on where it stopped. ``--quick`` is the shortened proof the
tests run (fewer videos, a quarter of the steps).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import CONFIG_DIR, add_dataclass_arguments, dataclass_from_args, load_config

HELP = "the four-stage proof: synthetic data -> train stages 1-4 on CPU -> online + offline eval -> goals"
STAGES = (1, 2, 3, 4)
# category -> (the accuracy it must reach, %); proactive also: false alarms at most FALSE_ALARMS_MAX %
GOALS = {"realtime": 90.0, "backward": 80.0, "proactive": 90.0}
FALSE_ALARMS_MAX = 10.0


@dataclass
class ProofConfig:
    """``vl3live proof`` options."""

    out: str = field(metadata={"help": "where data, stages and results go (a rerun resumes)"})
    train_videos: int = field(default=160, metadata={"help": "synthetic training videos"})
    heldout_videos: int = field(default=24, metadata={"help": "held-out videos the benchmarks' annotations use"})
    steps: float = field(default=1.0, metadata={"help": "scale of every stage's train.max_steps"})
    quick: bool = field(default=False, metadata={"help": "the shortened proof: 48 + 8 videos, a quarter of the "
                                                         "steps (overrides the three above)"})
    online_only: bool = field(default=False, metadata={"help": "skip the benchmarks' offline protocol"})
    seed: int = field(default=0, metadata={"help": "the synthetic world's seed"})

    def __post_init__(self) -> None:
        if self.quick:
            self.train_videos, self.heldout_videos, self.steps = 48, 8, 0.25
        if self.train_videos < 1 or self.heldout_videos < 1 or self.steps <= 0:
            raise ValueError("--train-videos and --heldout-videos must be >= 1, --steps > 0")


def stage_config(n: int, spec: str, out: Path, steps: float):
    """``configs/proof/stageN.yaml`` pointed at this run's data (the files it names, in ``OUT/data``),
    previous model and output folder, its steps scaled by ``steps``."""
    config = load_config(CONFIG_DIR / "proof" / f"stage{n}.yaml", [f"model.spec={spec}"])
    max_steps = max(1, round(config.train.max_steps * steps))
    train = dataclasses.replace(config.train, max_steps=max_steps,
                                logging_steps=max(1, min(config.train.logging_steps, max_steps // 4)),
                                data=[str(out / "data" / Path(d).name) for d in config.train.data],
                                output_dir=str(out / f"stage{n}"))
    return dataclasses.replace(config, train=train)


def recipe_of(previous: str, config) -> str:
    """What a stage's model is made from: ``previous`` (the data and the stages before it) and its config."""
    return json.dumps([previous, dataclasses.asdict(config.model), dataclasses.asdict(config.session),
                       dataclasses.asdict(config.train)], default=str)


def goals_met(summary: dict) -> dict[str, bool]:
    """Each goal of :data:`GOALS` (and the false-alarm ceiling) against an online summary."""
    cats = summary["categories"]
    met = {c: bool(cats.get(c, 0.0) >= goal) for c, goal in GOALS.items()}
    alarms = [t["false_alarms"] for t in summary["tasks"].values() if t["category"] == "proactive"]
    met["false_alarms"] = bool(alarms) and bool(max(alarms) <= FALSE_ALARMS_MAX)
    return met


def table(online: dict, offline: dict | None, minutes: dict[str, float]) -> str:
    """The proof's markdown table: each goal, what online and offline measured, and the training time."""
    def cell(summary: dict | None, c: str) -> str:
        return "-" if summary is None or c not in summary["categories"] else f"{summary['categories'][c]:.1f}"

    def alarms(summary: dict | None) -> str:
        vals = [t["false_alarms"] for t in (summary or {}).get("tasks", {}).values() if t["category"] == "proactive"]
        return f"{max(vals):.1f}" if vals else "-"
    met = goals_met(online)
    lines = ["| | goal | online (live engine) | offline (stock transformers) | met |", "|---|---|---|---|---|"]
    for c, goal in GOALS.items():
        lines.append(f"| {c} % | >= {goal:.0f} | {cell(online, c)} | {cell(offline, c)} | {'yes' if met[c] else 'no'} |")
    lines.append(f"| proactive false alarms % | <= {FALSE_ALARMS_MAX:.0f} | {alarms(online)} | {alarms(offline)} | "
                 f"{'yes' if met['false_alarms'] else 'no'} |")
    lines.append(f"| forward (REC count) % | - | {cell(online, 'forward')} | {cell(offline, 'forward')} | |")
    lines.append(f"| probes | | {online['items']} | {offline['items'] if offline else '-'} | |")
    stages = {k: v for k, v in minutes.items() if k.startswith("stage")}
    spent = " + ".join(f"{v:.1f}" for v in stages.values())
    lines.append(f"| training minutes (stages 1-4) | <= 20 | {spent} = {sum(stages.values()):.1f} | | |")
    offline_minutes = f"{minutes['eval offline']:.1f}" if "eval offline" in minutes else "-"
    lines.append(f"| eval minutes | | {minutes.get('eval online', 0.0):.1f} | {offline_minutes} | |")
    return "\n".join(lines)


def prove(cfg: ProofConfig, say=print, err=sys.stderr) -> dict:
    """Run the proof (resuming what ``cfg.out`` holds); returns the summaries, the goals met, the minutes
    and each stage's steps and losses."""
    from training.synth import write_synth
    from training.trainer import run_train

    from .evaluation import EvalConfig, evaluate

    out = Path(cfg.out)
    data = out / "data"
    minutes: dict[str, float] = {}
    stages: dict[int, dict] = {}  # stage -> minutes, steps, first and last logged loss
    started = time.monotonic()
    stamp = data / "synth.json"
    wanted = {"train_videos": cfg.train_videos, "heldout_videos": cfg.heldout_videos, "seed": cfg.seed}
    if not stamp.exists() or json.loads(stamp.read_text()) != wanted:
        say(f"proof: synthesizing {cfg.train_videos} training + {cfg.heldout_videos} held-out videos into {data}")
        write_synth(data, cfg.train_videos, cfg.heldout_videos, cfg.seed, say=say)
        stamp.write_text(json.dumps(wanted))
    minutes["data"] = (time.monotonic() - started) / 60
    spec = "random-small"
    recipe = json.dumps(wanted)  # what each stage's model comes from: the data, then every stage up to it
    for n in STAGES:
        config = stage_config(n, spec, out, cfg.steps)
        recipe = recipe_of(recipe, config)
        final = Path(config.train.output_dir) / "final"
        record = Path(config.train.output_dir) / "proof_stage.json"  # kept: a resumed run reports the real time
        started = time.monotonic()
        done = (final / "config.json").exists() and record.exists()
        if done and json.loads(record.read_text()).get("recipe") != recipe:
            say(f"proof: stage {n}'s config, or an earlier stage's or the data, changed since it was trained: "
                "training it again")
            done = False
        if not done:
            say(f"proof: stage {n} ({config.train.max_steps} steps, {', '.join(config.train.trainable)}) from {spec}")
            shutil.rmtree(config.train.output_dir, ignore_errors=True)
            shutil.rmtree(out / "eval", ignore_errors=True)  # its results are another model's
            trained = run_train(config.model, config.session, config.train, say=say)
            record.write_text(json.dumps({"minutes": (time.monotonic() - started) / 60, "steps": trained["steps"],
                                          "first_loss": trained["losses"][0], "last_loss": trained["losses"][-1],
                                          "recipe": recipe}))
        else:
            say(f"proof: stage {n} is done ({final})")
        stages[n] = {k: v for k, v in json.loads(record.read_text()).items() if k != "recipe"}
        minutes[f"stage {n}"] = stages[n]["minutes"]
        spec = str(final)
    config = stage_config(4, spec, out, cfg.steps)  # evaluated as stage 4 trained it
    files = {"ovo": [str(data / "ovo_bench_new.json")],
             "streamingbench": [str(data / "questions_real.json"), str(data / "questions_proactive.json")]}
    summaries: dict[str, dict | None] = {"online": None, "offline": None}
    for protocol in ("online",) if cfg.online_only else ("online", "offline"):
        started = time.monotonic()
        say(f"proof: eval {protocol}")
        eval_cfg = EvalConfig(**files, videos=str(data), out=str(out / "eval"), protocol=protocol,
                              fps=config.train.fps, parallel=4, model=spec)
        summaries[protocol] = evaluate(eval_cfg, config, err)
        minutes[f"eval {protocol}"] = (time.monotonic() - started) / 60
    text = table(summaries["online"], summaries["offline"], minutes)
    text += "\n\n" + " ".join(f"stage {n}: {r['steps']} steps, loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}."
                              for n, r in stages.items())
    result = {**summaries, "goals_met": goals_met(summaries["online"]), "minutes": minutes, "stages": stages,
              "table": text}
    (out / "proof.md").write_text(text + "\n")
    (out / "proof.json").write_text(json.dumps(result, indent=1))
    return result


def add_arguments(p) -> None:
    add_dataclass_arguments(p, ProofConfig, positional=("out",))


def run(args) -> int:
    cfg = dataclass_from_args(ProofConfig, args)
    result = prove(cfg, say=lambda m: print(m, file=sys.stderr, flush=True))
    print(result["table"])
    met = result["goals_met"]
    print(f"goals met: {sum(met.values())}/{len(met)}" + ("" if all(met.values()) else
          " (not met: " + ", ".join(k for k, v in met.items() if not v) + ")"))
    return 0 if all(met.values()) else 1
