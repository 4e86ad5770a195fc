"""``vl3live convert SRC DST``: an official VideoLLaMA3 checkpoint (hub id or dir) -> transformers-native."""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "official VideoLLaMA3 checkpoint (hub id or dir) -> transformers-native"


def add_arguments(p) -> None:
    p.add_argument("src", help="hub id (e.g. DAMO-NLP-SG/VideoLLaMA3-2B) or local dir in the official layout")
    p.add_argument("dst", help="output directory (load it with --model DST)")
    p.add_argument("--trust-pickle", action="store_true", help="accept pickled .bin weights (they can run code)")


def run(args) -> int:
    from model.checkpoints.convert import convert

    src = Path(args.src).expanduser()
    if not src.is_dir():
        from huggingface_hub import snapshot_download

        from model.checkpoints.hub import resolve

        patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"] + (
            ["*.bin"] if args.trust_pickle else [])
        found = resolve(args.src, "checkpoint", "a local directory in the official layout", patterns)
        src = Path(found if found != args.src else snapshot_download(args.src, allow_patterns=patterns))
    out = convert(src, Path(args.dst), trust_pickle=args.trust_pickle)
    print(f"converted to {out}; load it with --model {out}", file=sys.stderr)
    return 0
