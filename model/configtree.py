"""The config-tree machinery: dataclass fields that carry their help, built from YAML mappings.

Each package declares its own settings as dataclasses next to the code they configure (``model/config.py``,
``streamer/config.py``, ``streamer/websocket/config.py``, ``training/config.py``, ``ui/config.py``); the
command package joins them into one tree (``vl3live/config.py``), loaded from one YAML with dotted
overrides. Every field is documented once, in ``setting(help)``; the CLI builds its flags from it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any

import yaml


def setting(text: str, **kw: Any) -> Any:
    """A dataclass field with its help text (the one place a setting is documented)."""
    return field(metadata={"help": text}, **kw)


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type ``tp`` (dataclasses recurse)."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # CLI: comma separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # Optional[X]: X's own message
            raise ValueError(errors[0] + (" (or null)" if type(None) in args else ""))
        raise ValueError(f"{where}: cannot read {value!r} as {tp}")
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or cls.__name__}")
    prefix = where if where in ("", "--") else f"{where}."
    kwargs = {k: _convert(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item}: the value is not valid YAML ({yaml_problem(exc)})") from None
    return data


def yaml_problem(exc: yaml.YAMLError) -> str:
    return " ".join(str(getattr(exc, "problem", None) or exc).split())
