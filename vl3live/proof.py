"""``vl3live proof OUT``: the whole loop on CPU, end to end, from random weights to scored answers.

1. ``vl3live data synth``: the synthetic world into ``OUT/data``: training videos and two held-out
   sets, ``compositional`` (each shape in a colour and place no training video shows it in) and
   ``in_distribution`` (made as the training videos are);
2. the four VideoLLaMA3 stages with ``vl3live train`` and ``configs/proof/stage{1..4}.yaml``, each
   from the previous stage's model (stage 1 from the random ``random-small`` model), into
   ``OUT/stageN``; stage 4 keeps a checkpoint at half its steps;
3. ``vl3live eval`` on the held-out sets' OVO-Bench and StreamingBench annotations: after every stage
   and at half of stage 4, online on the compositional set (the curve: accuracy against training
   minutes); the final model also online on the in-distribution set and by the benchmarks' offline
   protocol on stock transformers;
4. the goals against what was measured (``OUT/proof.md``, ``OUT/proof.json``), split in two: *model
   capacity* (:data:`CAPACITY`, on the compositional set) and *engine fidelity* (online against
   offline on the same model, :data:`FIDELITY_POINTS`), with the training time
   (:data:`TRAIN_MINUTES_MAX`).

A stage whose ``final`` model is there, trained from the same data, config and earlier stages, is not
trained again (one whose recipe changed is, with every stage after it), and the evaluations resume
from their results files: a killed run goes on where it stopped. ``--quick`` is the shortened proof the
tests run (fewer videos, a fifth of the steps).
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
# Model capacity, on the compositional held-out set, online: category -> the accuracy it must reach (%; proactive:
# recall within 2 s, with false alarms on at most FALSE_ALARMS_MAX % of the items; forward: REC's counts)
CAPACITY = {"realtime": 90.0, "backward": 70.0, "proactive": 85.0, "forward": 70.0}
FALSE_ALARMS_MAX = 10.0
FIDELITY_POINTS = 2.0  # engine fidelity: online at least offline minus this, in every category, on the same model
TRAIN_MINUTES_MAX = 30.0


@dataclass
class ProofConfig:
    """``vl3live proof`` options."""

    out: str = field(metadata={"help": "where data, stages and results go (a rerun resumes)"})
    train_videos: int = field(default=160, metadata={"help": "synthetic training videos"})
    heldout_videos: int = field(default=24, metadata={"help": "compositional held-out videos (the goals' set)"})
    indist_videos: int | None = field(default=None, metadata={"help": "in-distribution held-out videos (default: "
                                                                      "as many as --heldout-videos)"})
    steps: float = field(default=1.0, metadata={"help": "scale of every stage's train.max_steps"})
    quick: bool = field(default=False, metadata={"help": "the shortened proof: 48 + 8 + 8 videos, a fifth of the "
                                                         "steps (overrides the four above)"})
    online_only: bool = field(default=False, metadata={"help": "skip the benchmarks' offline protocol (and so the "
                                                               "fidelity goal)"})
    curve: bool = field(default=True, metadata={"help": "evaluate after every stage and at half of stage 4 (the "
                                                        "accuracy-against-training-minutes curve)"})
    seed: int = field(default=0, metadata={"help": "the synthetic world's seed"})

    def __post_init__(self) -> None:
        if self.quick:
            self.train_videos, self.heldout_videos, self.indist_videos, self.steps = 48, 8, 8, 0.2
        if self.indist_videos is None:
            self.indist_videos = self.heldout_videos
        if self.train_videos < 1 or self.heldout_videos < 1 or self.indist_videos < 1 or self.steps <= 0:
            raise ValueError("--train-videos, --heldout-videos and --indist-videos must be >= 1, --steps > 0")


def stage_config(n: int, spec: str, out: Path, steps: float):
    """``configs/proof/stageN.yaml`` pointed at this run's data (the files it names, in ``OUT/data``),
    previous model and output folder, its steps scaled by ``steps``; stage 4 also keeps a checkpoint at
    half its steps (the curve's half budget)."""
    config = load_config(CONFIG_DIR / "proof" / f"stage{n}.yaml", [f"model.spec={spec}"])
    max_steps = max(1, round(config.train.max_steps * steps))
    train = dataclasses.replace(config.train, max_steps=max_steps,
                                logging_steps=max(1, min(config.train.logging_steps, max_steps // 4)),
                                data=[str(out / "data" / Path(d).name) for d in config.train.data],
                                output_dir=str(out / f"stage{n}"))
    if n == STAGES[-1] and max_steps >= 2:
        train = dataclasses.replace(train, save_steps=max_steps // 2, save_total_limit=3)  # half, 2 x half, last
    return dataclasses.replace(config, train=train)


def recipe_of(previous: str, config) -> str:
    """What a stage's model is made from: ``previous`` (the data and the stages before it) and its config,
    the settings away from their defaults only (a setting added later, at a default that changes nothing,
    leaves the stages trained before it valid)."""
    return json.dumps([previous, *(_changed(c) for c in (config.model, config.session, config.train))], default=str)


def _changed(settings) -> dict:
    out = {}
    for f in dataclasses.fields(settings):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(settings, f.name)
        if value != default:
            out[f.name] = value
    return out


def _cat(summary: dict | None, c: str) -> float | None:
    return None if summary is None else summary["categories"].get(c)


def _proactive(summary: dict | None, key: str, pick=max) -> float | None:
    """``key`` of the summary's proactive tasks (``pick`` of them, when several)."""
    vals = [t.get(key) for t in (summary or {}).get("tasks", {}).values() if t["category"] == "proactive"]
    vals = [v for v in vals if v is not None]
    return pick(vals) if vals else None


def false_alarms(summary: dict | None) -> float | None:
    """The share of proactive items with a false alarm (the worst proactive task's), %."""
    return _proactive(summary, "false_alarms")


def goals_met(online: dict, offline: dict | None, train_minutes: float) -> dict[str, bool]:
    """Each goal against the compositional set's summaries: capacity (:data:`CAPACITY`, the false-alarm
    ceiling), engine fidelity per category (online >= offline - :data:`FIDELITY_POINTS`; without an
    offline run, not met) and the training time."""
    met = {c: bool((_cat(online, c) or 0.0) >= goal) for c, goal in CAPACITY.items()}
    alarms = false_alarms(online)
    met["false_alarms"] = bool(alarms is not None and alarms <= FALSE_ALARMS_MAX)
    for c in online["categories"]:
        met[f"fidelity {c}"] = bool(offline is not None and c in offline["categories"] and
                                    online["categories"][c] >= offline["categories"][c] - FIDELITY_POINTS)
    met["training minutes"] = bool(train_minutes <= TRAIN_MINUTES_MAX)
    return met


def table(summaries: dict[str, dict | None], minutes: dict[str, float]) -> str:
    """The proof's markdown table. ``summaries``: "compositional online", "compositional offline",
    "in_distribution online" (any may be None)."""
    comp, off, ind = (summaries.get(k) for k in ("compositional online", "compositional offline",
                                                 "in_distribution online"))
    train = sum(v for k, v in minutes.items() if k.startswith("stage"))
    met = goals_met(comp, off, train)

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"
    lines = ["**Model capacity** (held-out videos; the goals are on the compositional set, online)", "",
             "| | goal | compositional, online | in-distribution, online | met |", "|---|---|---|---|---|"]
    names = {"realtime": "real-time %", "backward": "backward %", "proactive": "proactive recall (2 s) %",
             "forward": "REC (forward) %"}
    for c, goal in CAPACITY.items():
        lines.append(f"| {names[c]} | >= {goal:.0f} | {num(_cat(comp, c))} | {num(_cat(ind, c))} | "
                     f"{'yes' if met[c] else 'no'} |")
    lines.append(f"| proactive false alarms % of items | <= {FALSE_ALARMS_MAX:.0f} | {num(false_alarms(comp))} | "
                 f"{num(false_alarms(ind))} | {'yes' if met['false_alarms'] else 'no'} |")
    for label, key in (("proactive precision %", "precision"), ("proactive false alarms / min", "false_alarms_per_min")):
        vals = [_proactive(s, key, pick=lambda v: sum(v) / len(v)) for s in (comp, ind)]
        lines.append(f"| {label} | | {num(vals[0])} | {num(vals[1])} | |")
    lines.append(f"| probes | | {comp['items']} | {ind['items'] if ind else '-'} | |")
    lines += ["", "**Engine fidelity** (compositional set, the same stage 4 model: the live engine against the "
              f"benchmarks' offline protocol; goal: online >= offline - {FIDELITY_POINTS:.0f})", "",
              "| category | online | offline | online - offline | met |", "|---|---|---|---|---|"]
    for c in comp["categories"]:
        a, b = _cat(comp, c), _cat(off, c)
        lines.append(f"| {c} | {num(a)} | {num(b)} | {num(None if b is None else a - b)} | "
                     f"{'yes' if met[f'fidelity {c}'] else 'no'} |")
    stages = {k: v for k, v in minutes.items() if k.startswith("stage")}
    lines += ["", f"**Training**: {' + '.join(f'{v:.1f}' for v in stages.values())} = {train:.1f} minutes "
              f"(goal <= {TRAIN_MINUTES_MAX:.0f}: {'met' if met['training minutes'] else 'not met'}); evaluation "
              + ", ".join(f"{k[5:]} {v:.1f}" for k, v in minutes.items() if k.startswith("eval ")) + " minutes."]
    return "\n".join(lines)


def curve_table(curve: list[dict]) -> str:
    """Accuracy against training minutes: a row per model evaluated (compositional set, online)."""
    lines = ["| model | training minutes | real-time % | backward % | proactive recall % | false alarms % | REC % |",
             "|---|---|---|---|---|---|---|"]
    for c in curve:
        s = c["summary"]
        cells = [_cat(s, k) for k in ("realtime", "backward", "proactive")] + [false_alarms(s), _cat(s, "forward")]
        lines.append(f"| {c['model']} | {c['minutes']:.1f} | " + " | ".join("-" if v is None else f"{v:.1f}"
                                                                         for v in cells) + " |")
    return "\n".join(lines)


def _loadable(checkpoint: Path, final: Path) -> Path:
    """A trainer checkpoint made loadable as a model folder: the processor's files copied from ``final``."""
    for f in final.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not (checkpoint / f.name).exists():
            shutil.copy2(f, checkpoint / f.name)
    return checkpoint


def prove(cfg: ProofConfig, say=print, err=sys.stderr) -> dict:
    """Run the proof (resuming what ``cfg.out`` holds); returns the summaries, the goals met, the minutes,
    the curve and each stage's steps and losses."""
    from training.synth import HELDOUT_SETS, VERSION, write_synth
    from training.trainer import run_train

    from .evaluation import EvalConfig, evaluate

    out = Path(cfg.out)
    data = out / "data"
    minutes: dict[str, float] = {}
    stages: dict[int, dict] = {}  # stage -> minutes, steps, first and last logged loss
    started = time.monotonic()
    stamp = data / "synth.json"
    wanted = {"train_videos": cfg.train_videos, "heldout_videos": cfg.heldout_videos,
              "indist_videos": cfg.indist_videos, "seed": cfg.seed, "world": VERSION}
    if not stamp.exists() or json.loads(stamp.read_text()) != wanted:
        say(f"proof: synthesizing {cfg.train_videos} training + {cfg.heldout_videos} compositional + "
            f"{cfg.indist_videos} in-distribution held-out videos into {data}")
        shutil.rmtree(data, ignore_errors=True)
        write_synth(data, cfg.train_videos, cfg.heldout_videos, cfg.seed, say=say, indist_videos=cfg.indist_videos)
        stamp.write_text(json.dumps(wanted))
    minutes["data"] = (time.monotonic() - started) / 60

    def run_eval(model: str, config, label: str, held: str = "compositional", protocol: str = "online") -> dict:
        t0 = time.monotonic()
        say(f"proof: eval {held} {protocol}: {label}")
        files = data / held
        eval_cfg = EvalConfig(ovo=[str(files / "ovo_bench_new.json")],
                              streamingbench=[str(files / "questions_real.json"),
                                              str(files / "questions_proactive.json")],
                              videos=str(data), out=str(out / "eval" / held / label), protocol=protocol,
                              fps=config.train.fps, parallel=4, model=model)
        summary = evaluate(eval_cfg, config, err)
        key = f"eval {held} {protocol}"
        minutes[key] = minutes.get(key, 0.0) + (time.monotonic() - t0) / 60
        return summary

    spec = "random-small"
    recipe = json.dumps(wanted)  # what each stage's model comes from: the data, then every stage up to it
    curve: list[dict] = []
    trained_minutes = 0.0
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
            for held in HELDOUT_SETS:  # its results, and every later stage's, are another model's
                for m in STAGES[n - 1:]:
                    for folder in (out / "eval" / held).glob(f"stage{m}*"):
                        shutil.rmtree(folder, ignore_errors=True)
            trained = run_train(config.model, config.session, config.train, say=say)
            record.write_text(json.dumps({"minutes": (time.monotonic() - started) / 60, "steps": trained["steps"],
                                          "first_loss": trained["losses"][0], "last_loss": trained["losses"][-1],
                                          "recipe": recipe}))
        else:
            say(f"proof: stage {n} is done ({final})")
        stages[n] = {k: v for k, v in json.loads(record.read_text()).items() if k != "recipe"}
        minutes[f"stage {n}"] = stages[n]["minutes"]
        half = Path(config.train.output_dir) / f"checkpoint-{config.train.save_steps}"
        if cfg.curve and n == STAGES[-1] and config.train.save_steps < config.train.max_steps and half.is_dir():
            share = config.train.save_steps / stages[n]["steps"]  # minutes at the checkpoint: by its share of steps
            curve.append({"model": f"stage {n}, {config.train.save_steps} of {stages[n]['steps']} steps",
                          "minutes": trained_minutes + share * stages[n]["minutes"],
                          "summary": run_eval(str(_loadable(half, final)), config, f"stage{n}-half")})
        trained_minutes += stages[n]["minutes"]
        spec = str(final)
        if cfg.curve or n == STAGES[-1]:
            curve.append({"model": f"stage {n}", "minutes": trained_minutes,
                          "summary": run_eval(spec, config, f"stage{n}")})
    config = stage_config(4, spec, out, cfg.steps)  # evaluated as stage 4 trained it
    summaries: dict[str, dict | None] = {"compositional online": curve[-1]["summary"], "compositional offline": None,
                                         "in_distribution online": run_eval(spec, config, "stage4", "in_distribution")}
    if not cfg.online_only:
        summaries["compositional offline"] = run_eval(spec, config, "stage4", protocol="offline")
    text = table(summaries, minutes)
    text += "\n\n" + " ".join(f"stage {n}: {r['steps']} steps, loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}."
                              for n, r in stages.items())
    if cfg.curve:
        text += "\n\n**Accuracy against training minutes** (compositional set, online; each stage's model with its " \
                "own stage config)\n\n" + curve_table(curve)
    result = {"summaries": summaries, "goals_met": goals_met(summaries["compositional online"],
                                                             summaries["compositional offline"], trained_minutes),
              "minutes": minutes, "stages": stages, "curve": [{k: c[k] for k in ("model", "minutes")} |
                                                              {"categories": c["summary"]["categories"]} for c in curve],
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
