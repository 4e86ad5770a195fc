"""``vl3live train``: fine-tune one VideoLLaMA3 stage (``configs/train/*.yaml``), or merge a LoRA adapter."""

from __future__ import annotations

import json
import sys

from .config import load_config

HELP = "fine-tune (configs/train/*.yaml); or: train merge-lora ADAPTER OUT"
USAGE = ("vl3live train --config configs/train/stage4_2b.yaml key=value ... (keys without a section are "
         "train.*), or vl3live train merge-lora ADAPTER OUT [--base SPEC]")


def add_arguments(p) -> None:
    p.add_argument("items", nargs="*", help="key=value overrides, or merge-lora ADAPTER OUT")
    p.add_argument("--config", dest="train_config", default=None, help="a stage YAML (configs/train/)")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the newest checkpoint in train.output_dir (or this one)")
    p.add_argument("--base", default=None, help="merge-lora: the base model (default: the adapter's)")


def run(args) -> int:
    from training.trainer import merge_lora, run_train

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731  (stdout: the result)
    items = list(args.items)
    if items and items[0] == "merge-lora":
        if len(items) != 3:
            raise ValueError("usage: vl3live train merge-lora ADAPTER OUT [--base SPEC]")
        out = merge_lora(items[1], items[2], args.base, say=say)
        print(f"merged checkpoint: {out} (load it with --model {out})", file=sys.stderr)
        return 0
    overrides = [i if "." in i.split("=", 1)[0] else f"train.{i}" for i in items]
    config = load_config(args.train_config or args.config, args.overrides + overrides)
    result = run_train(config.model, config.session, config.train, resume=args.resume, say=say)
    result.pop("trainer")
    print(json.dumps(result))
    return 0
