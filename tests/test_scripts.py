"""The README's two quick-start commands: ``scripts/demo`` runs the demo (setting the environment up on
first use) and ``scripts/test`` is what CI runs; both on this checkout, as a user types them."""

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import wait_for_line

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_quick_start_is_the_two_scripts_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    quick = re.search(r"## Quick start\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    assert [line.split()[0] for line in quick.strip().splitlines()] == ["scripts/demo", "scripts/test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec scripts/test$", ci, re.M)
    test = (ROOT / "scripts" / "test").read_text()
    assert "-m pytest -q" in test and "python -m pytest -q" in readme  # the README's test command
    for script in ("setup", "demo", "test"):
        path = ROOT / "scripts" / script
        assert os.access(path, os.X_OK), path
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    for word in re.findall(r"\b(?:scripts|tests|configs)/[\w./-]+", ci + test):  # every file they name exists
        assert (ROOT / word.rstrip(".")).exists(), word


def test_scripts_demo_sets_up_and_serves_the_demo():
    env = {**os.environ, "VL3LIVE_VENV": sys.prefix}  # this environment: setup only checks what it has
    demo = subprocess.Popen([str(ROOT / "scripts" / "demo"), "--model", "tiny", "--port", "0"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        up, lines = wait_for_line(demo, r"demo on http://", timeout=300)
        assert up, "".join(lines[-30:])
    finally:
        demo.terminate()
        demo.wait(60)
    assert (Path(sys.prefix) / ".vl3live-setup").is_file()  # setup recorded what it installed
    assert any(line.startswith("model on cpu") for line in lines)
