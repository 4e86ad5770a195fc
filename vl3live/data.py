"""``vl3live data``: training data tools (check, stream-from-captions, example)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .config import load_config

HELP = "training data tools: check FILE..., stream-from-captions VIDEO CAPTIONS OUT, example DIR, synth OUT"


def add_arguments(p) -> None:
    p.add_argument("tool", choices=["check", "stream-from-captions", "example", "synth"])
    p.add_argument("paths", nargs="+")
    p.add_argument("--config", dest="data_config", default=None,
                   help="check: the stage YAML whose session settings (layout, frame size) the run will use")
    p.add_argument("--clip-seconds", type=float, default=None, help="stream-from-captions: clip length "
                                                                     "(default: train.clip_seconds)")
    p.add_argument("--model", default=None, help="check: the tokenizer's checkpoint (default: model.spec)")
    p.add_argument("--train-videos", type=int, default=24, help="synth: videos for the training data")
    p.add_argument("--heldout-videos", type=int, default=8, help="synth: compositional held-out videos for the "
                   "benchmarks' annotations (shape, colour and place never seen together in training)")
    p.add_argument("--indist-videos", type=int, default=None, help="synth: in-distribution held-out videos "
                   "(made as the training videos are; default: as many as --heldout-videos)")
    p.add_argument("--seed", type=int, default=0, help="synth: the world's seed")


def run(args) -> int:
    config = load_config(args.data_config or args.config, args.overrides)
    if args.tool == "example":
        from training.data.example import write_example

        if len(args.paths) != 1:
            raise ValueError("usage: vl3live data example DIR")
        out = write_example(args.paths[0])
        print(f"wrote {out} and the images and clips it names", file=sys.stderr)
        return 0
    if args.tool == "synth":
        from training.synth import write_synth

        if len(args.paths) != 1:
            raise ValueError("usage: vl3live data synth OUT [--train-videos N] [--heldout-videos M] "
                             "[--indist-videos K] [--seed S]")
        files = write_synth(args.paths[0], args.train_videos, args.heldout_videos, args.seed,
                            say=lambda m: print(m, file=sys.stderr, flush=True), indist_videos=args.indist_videos)
        for name, path in files.items():
            print(f"{name}: {path}", file=sys.stderr)
        return 0
    if args.tool == "stream-from-captions":
        from training.data.convert import stream_from_captions

        if len(args.paths) != 3:
            raise ValueError("usage: vl3live data stream-from-captions VIDEO CAPTIONS OUT.jsonl")
        video, captions, out = map(Path, args.paths)
        samples = stream_from_captions(video, captions, args.clip_seconds or config.train.clip_seconds,
                                       relative_to=out.parent)
        with open(out, "a") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        print(f"{len(samples)} stream samples appended to {out}", file=sys.stderr)
        return 0
    from model.checkpoints.loading import load_processor
    from training.data.check import check_dataset

    processor = load_processor(args.model or config.model.spec)
    good, errors = check_dataset(args.paths, config.session, config.train, processor)
    for e in errors:
        print(e)
    layouts = ", ".join(f"{n} {layout}" for layout, n in sorted(good.items()))
    print(f"{sum(good.values())} good samples, {len(errors)} bad{f' (token layouts: {layouts})' if layouts else ''}",
          file=sys.stderr)
    return 1 if errors else 0
