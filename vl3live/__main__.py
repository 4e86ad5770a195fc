"""``vl3live``: the command-line entry point and its subcommand table.

Global options pick the config tree (``--config``, ``--set section.key=value``). Each subcommand is a
module of this package with ``HELP``, ``add_arguments(parser)`` (flags from its dataclass, so every
option is documented once) and ``run(args) -> exit code``. Importing a command module is cheap:
torch and the model load when a command runs, not when the CLI parses its flags.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys

from . import (
    ask,
    bench,
    camera,
    client,
    convert,
    data,
    demo,
    evaluation,
    gpu_check,
    proof,
    schema,
    serve,
    status,
    train,
    watch,
    worker,
)

COMMANDS = {"bench": bench, "ask": ask, "watch": watch, "demo": demo, "camera": camera, "serve": serve,
            "client": client, "train": train, "data": data, "eval": evaluation, "proof": proof, "convert": convert,
            "protocol-schema": schema, "gpu-check": gpu_check, "worker": worker, "status": status}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vl3live", description="Live VideoLLaMA3: a streaming video assistant")
    p.add_argument("--config", default=None, help="config YAML (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set session.layout=stream (repeatable)")
    p.add_argument("--quant", dest="global_quant", choices=["8bit", "4bit"], default=None,
                   help="load the LLM quantized through bitsandbytes (CUDA); same as --set model.quant=...")
    p.add_argument("--attn", dest="global_attn", choices=["flash_attention_2", "sdpa", "eager"], default=None,
                   help="force an attention backend; same as --set model.attn=...")
    p.add_argument("--trust-pickle", dest="trust_pickle", action="store_true",
                   help="allow pickled .bin weights (they can run code); same as --set model.trust_pickle=true")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=getattr(module, "USAGE", None)))
    return p


def _on_sigterm(signum, frame) -> None:  # a service manager stopping us: shut down as Ctrl-C does
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    args.overrides += [f"model.{k}={v}" for k, v in (("quant", args.global_quant), ("attn", args.global_attn)) if v]
    if args.trust_pickle:
        args.overrides.append("model.trust_pickle=true")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints every thread's stack (a stuck process says where)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:  # Ctrl-C outside a long-lived command (model loading, ask, bench, train)
        print(f"vl3live {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"vl3live {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
