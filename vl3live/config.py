"""The one config tree: every package's settings under one root, loaded from ``configs/*.yaml`` plus
dotted overrides (``--set section.key=value``), and CLI flags built from dataclass fields."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.config import ModelConfig, SessionConfig
from model.configtree import apply_overrides, from_dict, yaml_problem
from streamer.cluster.config import ClusterConfig
from streamer.config import AudioConfig, EngineConfig
from streamer.websocket.config import ServerConfig
from training.config import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class Config:
    """Root of the config tree (``configs/default.yaml``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    train: TrainConfig = field(default_factory=TrainConfig)



def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``configs/default.yaml`` (or ``path``) and apply dotted overrides."""
    path = Path(path) if path is not None else CONFIG_DIR / "default.yaml"
    if not path.exists() and not path.is_absolute() and (CONFIG_DIR / path).exists():
        path = CONFIG_DIR / path
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: invalid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    return from_dict(Config, data)


def add_dataclass_arguments(parser: Any, cls: type, positional: tuple[str, ...] = ()) -> None:
    """Add one CLI flag per dataclass field (``--max-new-tokens``), help text from the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        if f.name in positional:
            parser.add_argument(f.name, help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if hints[f.name] is bool:  # on by default: --no-NAME turns it off
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=default, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=default, metavar=f.name.upper(),
                                help=f"{help_text} (default: {default})")


def dataclass_from_args(cls: type, args: Any) -> Any:
    """Build ``cls`` from parsed CLI args, coercing each value to its field type."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
              and not (getattr(args, f.name) is None and f.default_factory is not dataclasses.MISSING)}
    return from_dict(cls, values, where="--")
