"""``vl3live``: the command-line entry point.

Global options pick the config tree (``--config``, ``--set section.key=value``); each
subcommand's flags come from its dataclass, so every option is documented once.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys

from model.config import add_dataclass_arguments, dataclass_from_args, load_config


def _parser() -> argparse.ArgumentParser:
    from model.bench import BenchConfig

    from .ask import AskConfig
    from .client import ClientConfig
    from .local import LiveConfig
    from .serve import ServeConfig
    from .watch import WatchConfig

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
    bench = sub.add_parser("bench", help="benchmark the streaming session against stock transformers")
    add_dataclass_arguments(bench, BenchConfig)
    ask = sub.add_parser("ask", help="stream a video file through a session and answer a question")
    add_dataclass_arguments(ask, AskConfig, positional=("video", "question"))
    watch = sub.add_parser("watch", help="stream a camera, RTSP URL or file live; questions from stdin")
    add_dataclass_arguments(watch, WatchConfig, positional=("source",))
    from ui.config import DemoConfig

    demo = sub.add_parser("demo", help="the gradio live webcam demo (chat, alerts, stats, DiffFP overlay)")
    add_dataclass_arguments(demo, DemoConfig)
    live = sub.add_parser("live", help="a local camera live; ask by speaking (--mic) or on stdin")
    add_dataclass_arguments(live, LiveConfig)
    serve = sub.add_parser("serve", help="serve the websocket API (docs/protocol.md)")
    add_dataclass_arguments(serve, ServeConfig)
    client = sub.add_parser("client", help="stream a file, camera or RTSP URL to a server; print answers")
    add_dataclass_arguments(client, ClientConfig, positional=("source",))
    train = sub.add_parser("train", help="fine-tune (configs/train/*.yaml); or: train merge-lora ADAPTER OUT",
                           description="vl3live train --config configs/train/stage4_2b.yaml key=value ... "
                                       "(keys without a section are train.*), or vl3live train merge-lora ADAPTER OUT "
                                       "[--base SPEC]")
    train.add_argument("items", nargs="*", help="key=value overrides, or merge-lora ADAPTER OUT")
    train.add_argument("--config", dest="train_config", default=None, help="a stage YAML (configs/train/)")
    train.add_argument("--resume", nargs="?", const=True, default=False,
                       help="continue from the newest checkpoint in train.output_dir (or this one)")
    train.add_argument("--base", default=None, help="merge-lora: the base model (default: the adapter's)")
    data = sub.add_parser("data", help="training data tools: check FILE..., stream-from-captions VIDEO CAPTIONS OUT, "
                                       "example DIR")
    data.add_argument("tool", choices=["check", "stream-from-captions", "example"])
    data.add_argument("paths", nargs="+")
    data.add_argument("--config", dest="data_config", default=None,
                      help="check: the stage YAML whose session settings (layout, frame size) the run will use")
    data.add_argument("--clip-seconds", type=float, default=None, help="stream-from-captions: clip length "
                                                                        "(default: train.clip_seconds)")
    data.add_argument("--model", default=None, help="check: the tokenizer's checkpoint (default: model.spec)")
    convert = sub.add_parser("convert", help="official VideoLLaMA3 checkpoint (hub id or dir) -> transformers-native")
    convert.add_argument("src", help="hub id (e.g. DAMO-NLP-SG/VideoLLaMA3-2B) or local dir in the official layout")
    convert.add_argument("dst", help="output directory (load it with --model DST)")
    convert.add_argument("--trust-pickle", action="store_true", help="accept pickled .bin weights (they can run code)")
    schema = sub.add_parser("protocol-schema", help="print the websocket protocol's JSON Schema")
    schema.add_argument("--output", "-o", default=None, help="write it to this file instead")
    return p


def _interruptible(run, *args) -> None:
    """Run a long-lived command until it ends, Ctrl-C or SIGTERM (both normal ways to stop it)."""
    try:
        run(*args)
    except KeyboardInterrupt:
        pass


def _on_sigterm(signum, frame) -> None:  # a service manager stopping us: shut down as Ctrl-C does
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    args.overrides += [f"model.{k}={v}" for k, v in (("quant", args.global_quant), ("attn", args.global_attn)) if v]
    if args.trust_pickle:
        args.overrides.append("model.trust_pickle=true")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints every thread's stack (a stuck process says where)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:  # Ctrl-C outside a long-lived command (model loading, ask, bench, train)
        print(f"vl3live {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"vl3live {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "bench":
        from model.bench import BenchConfig, run_bench

        cfg = dataclass_from_args(BenchConfig, args)
        progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  (stdout: the JSON)
        if cfg.sessions is not None:
            from .bench_sessions import run_sessions_bench

            result = run_sessions_bench(cfg, load_config(args.config, args.overrides), progress)
        elif cfg.stream_hours is not None:
            from model.bench_stream import run_stream_bench

            result = run_stream_bench(cfg, load_config(args.config, args.overrides).session, progress)
        else:
            result = run_bench(cfg, progress=progress)
        print(json.dumps(result) if cfg.json else json.dumps(result, indent=2))
        return 0
    if args.command == "ask":
        from .ask import AskConfig, run_ask

        cfg = dataclass_from_args(AskConfig, args)
        run_ask(cfg, load_config(args.config, args.overrides))
        return 0
    if args.command == "watch":
        import asyncio

        from .watch import WatchConfig, run_watch

        cfg = dataclass_from_args(WatchConfig, args)
        _interruptible(asyncio.run, run_watch(cfg, load_config(args.config, args.overrides)))
        return 0
    if args.command == "demo":
        from model.loading import preflight
        from ui.config import DemoConfig

        cfg, config = dataclass_from_args(DemoConfig, args), load_config(args.config, args.overrides)
        preflight(config.model, cfg.model)  # before gradio and minutes of loading
        from ui.app import run_demo

        _interruptible(run_demo, cfg, config)
        return 0
    if args.command == "live":
        import asyncio

        from .local import LiveConfig, run_live

        _interruptible(asyncio.run, run_live(dataclass_from_args(LiveConfig, args),
                                             load_config(args.config, args.overrides)))
        return 0
    if args.command == "serve":
        import asyncio

        from .serve import ServeConfig, run_serve

        _interruptible(asyncio.run, run_serve(dataclass_from_args(ServeConfig, args),
                                               load_config(args.config, args.overrides)))
        return 0
    if args.command == "client":
        import asyncio

        from websockets.exceptions import InvalidStatus

        from .client import ClientConfig, ClientError, run_client

        try:
            _interruptible(asyncio.run, run_client(dataclass_from_args(ClientConfig, args)))
        except ClientError as exc:
            print(f"vl3live client: server refused: {exc}", file=sys.stderr)
            return 2
        except InvalidStatus as exc:
            body = exc.response.body.decode(errors="replace").strip()
            print(f"vl3live client: server refused the connection: HTTP {exc.response.status_code} {body}",
                  file=sys.stderr)
            return 2
        return 0
    if args.command == "convert":
        from pathlib import Path

        from model.convert import convert as convert_checkpoint

        src = Path(args.src).expanduser()
        if not src.is_dir():
            from huggingface_hub import snapshot_download

            from model.hub import resolve

            patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"] + (
                ["*.bin"] if args.trust_pickle else [])
            found = resolve(args.src, "checkpoint", "a local directory in the official layout", patterns)
            src = Path(found if found != args.src else snapshot_download(args.src, allow_patterns=patterns))
        out = convert_checkpoint(src, Path(args.dst), trust_pickle=args.trust_pickle)
        print(f"converted to {out}; load it with --model {out}", file=sys.stderr)
        return 0
    if args.command == "train":
        return _train(args)
    if args.command == "data":
        return _data(args)
    if args.command == "protocol-schema":
        from .protocol import json_schema

        text = json.dumps(json_schema(), indent=2) + "\n"
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
        return 0
    return 1


def _train(args) -> int:
    from training.trainer import merge_lora, run_train

    items = list(args.items)
    if items and items[0] == "merge-lora":
        if len(items) != 3:
            raise ValueError("usage: vl3live train merge-lora ADAPTER OUT [--base SPEC]")
        out = merge_lora(items[1], items[2], args.base, say=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"merged checkpoint: {out} (load it with --model {out})", file=sys.stderr)
        return 0
    overrides = [i if "." in i.split("=", 1)[0] else f"train.{i}" for i in items]
    config = load_config(args.train_config or args.config, args.overrides + overrides)
    result = run_train(config, resume=args.resume, say=lambda m: print(m, file=sys.stderr, flush=True))
    result.pop("trainer")
    print(json.dumps(result))
    return 0


def _data(args) -> int:
    config = load_config(args.data_config or args.config, args.overrides)
    if args.tool == "example":
        from training.data.example import write_example

        if len(args.paths) != 1:
            raise ValueError("usage: vl3live data example DIR")
        out = write_example(args.paths[0])
        print(f"wrote {out} and the images and clips it names", file=sys.stderr)
        return 0
    if args.tool == "stream-from-captions":
        from pathlib import Path

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
    from model.loading import load_processor
    from training.data.check import check_dataset

    processor = load_processor(args.model or config.model.spec)
    good, errors = check_dataset(args.paths, config, processor)
    for e in errors:
        print(e)
    layouts = ", ".join(f"{n} {layout}" for layout, n in sorted(good.items()))
    print(f"{sum(good.values())} good samples, {len(errors)} bad{f' (token layouts: {layouts})' if layouts else ''}",
          file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
