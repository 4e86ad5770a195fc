"""``vl3live protocol-schema``: print (or write) the websocket protocol's JSON Schema."""

from __future__ import annotations

import json
import sys

HELP = "print the websocket protocol's JSON Schema"


def add_arguments(p) -> None:
    p.add_argument("--output", "-o", default=None, help="write it to this file instead")


def run(args) -> int:
    from streamer.websocket.protocol import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0
