"""The floors of the house, checked by parsing every import (``README.md`` "Layout of the code").

- ``model/``: the model layer; imports nothing of ours but itself, and no asyncio, sockets or servers
  (fetching a checkpoint from the hub, ``model/checkpoints/hub.py``, is loading, not serving).
- ``streamer/``: the engine floor (sources, engine, worker, bus) -> ``model``; its websocket layer
  ``streamer/websocket/`` sits on the engine, and nothing else in ``streamer`` imports it.
- ``training/`` -> ``model``.
- ``ui/`` -> ``streamer``, ``model``.
- ``vl3live/``: the commands, the top floor -> everything; nothing imports a command.
No exceptions: a lazy import inside a function counts like any other.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "streamer", "training", "ui", "vl3live")
ALLOWED = {"model": {"model"}, "streamer": {"streamer", "model"}, "training": {"training", "model"},
           "ui": {"ui", "streamer", "model"}, "vl3live": set(PACKAGES)}
NO_NETWORK = {"asyncio", "websockets", "aiohttp", "aiortc", "socket", "socketserver", "http"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``, relative ones resolved."""
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                out += [(node.lineno, f"{mod}.{a.name}" if not node.module else mod) for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def _files():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_every_import_points_down_the_floors():
    bad = []
    for path in _files():
        floor = _module(path).split(".")[0]
        for line, mod in _imports(path):
            top = mod.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line}: {mod}"
            if top in PACKAGES and top not in ALLOWED[floor]:
                bad.append(f"{where} ({floor} may import {sorted(ALLOWED[floor])})")
            if floor == "model" and top in NO_NETWORK:
                bad.append(f"{where} (model/ has no asyncio, sockets or servers)")
            if mod.startswith("streamer.websocket") and not _module(path).startswith(("streamer.websocket", "ui",
                                                                                        "vl3live")) \
                    and floor == "streamer":
                bad.append(f"{where} (the engine floor does not know the websocket layer above it)")
    assert not bad, "imports against the floors:\n" + "\n".join(bad)


def test_the_checker_sees_a_bad_import(tmp_path):
    """The rule can fail: a lazy upward import inside a function is found."""
    path = ROOT / "model" / "_probe_import.py"
    path.write_text("def f():\n    from streamer.engine import Engine\n    from . import session\n")
    try:
        assert (2, "streamer.engine") in _imports(path) and (3, "model.session") in _imports(path)
    finally:
        path.unlink()


def test_the_client_library_loads_neither_the_engine_nor_torch():
    code = ("import sys\nimport streamer.websocket.client\n"
            "bad = [m for m in ('torch', 'streamer.engine', 'streamer.worker', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_cli_parses_its_flags_without_torch():
    code = ("import sys\nfrom vl3live.__main__ import parser\nparser().parse_args(['watch', 'x.mp4'])\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr


def test_every_module_and_public_class_says_what_it_is():
    missing = []
    for path in _files():
        tree = ast.parse(path.read_text())
        if not ast.get_docstring(tree):
            missing.append(f"{path.relative_to(ROOT)} (module)")
        missing += [f"{path.relative_to(ROOT)}:{n.lineno} {n.name}" for n in tree.body
                    if isinstance(n, ast.ClassDef) and not n.name.startswith("_") and not ast.get_docstring(n)]
    assert not missing, "no docstring:\n" + "\n".join(missing)


def test_the_readme_layout_map_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout of the code", 1)[1]
    block = section.split("```", 2)[1]
    named = {line.split()[0].rstrip("/") for line in block.splitlines() if line.strip() and line.strip()[0] != "("
             and line[0] != " "}
    assert named == set(PACKAGES), named  # every package, and nothing that is not one
    assert "websocket/" in block and (ROOT / "streamer" / "websocket").is_dir()
    for name in set(re.findall(r"`((?:model|streamer|training|ui|vl3live)/[\w/]+\.py)`", section)):
        assert (ROOT / name).is_file(), f"the README's walk names {name}, which is not there"


CORE_STATE = ("streamer.core.state", "streamer.core.engine_core", "streamer.core.prep", "streamer.core.answers",
              "streamer.core.scheduler")


def test_front_ends_talk_to_the_client_never_to_the_cores_state():
    """The websocket layer, the demo, the sources and the commands import the client (``streamer.engine``,
    ``streamer.core.process``), the commands and the events: never the core or its state classes. Only the
    transports build a core (``streamer/engine.py``, ``streamer/core/process.py`` and the Ray worker,
    ``streamer/cluster/worker.py``)."""
    front = [p for p in _files() if _module(p).startswith(("streamer.websocket", "streamer.sources", "ui", "vl3live"))]
    bad = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in front for line, mod in _imports(p)
           if mod.startswith(CORE_STATE)]
    assert not bad, "front ends reach into the engine core:\n" + "\n".join(bad)
    builders = sorted(str(p.relative_to(ROOT)) for p in _files() for _, mod in _imports(p)
                      if mod.startswith("streamer.core.engine_core") and not _module(p).startswith("streamer.core.e"))
    assert builders == ["streamer/cluster/worker.py", "streamer/core/process.py", "streamer/engine.py"], builders
