"""``vl3live demo``: the gradio live webcam demo (``ui/``) on the live engine."""

from __future__ import annotations

from .config import add_dataclass_arguments, dataclass_from_args, load_config
from .terminal import interruptible

HELP = "the gradio live webcam demo (chat, alerts, stats, DiffFP overlay)"


def add_arguments(p) -> None:
    from ui.config import DemoConfig

    add_dataclass_arguments(p, DemoConfig)


def run(args) -> int:
    from model.checkpoints.loading import preflight
    from ui.config import DemoConfig

    cfg, config = dataclass_from_args(DemoConfig, args), load_config(args.config, args.overrides)
    preflight(config.model, cfg.model)  # before gradio and minutes of loading
    from ui.app import run_demo

    interruptible(run_demo, cfg, config)
    return 0
