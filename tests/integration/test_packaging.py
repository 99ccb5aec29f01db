"""The project installs as one package, `tokenfabric`: the controller and the agent are its
subpackages, never top-level `controller`/`hostagent` packages beside vLLM's."""

import shutil
import subprocess
import sys
import venv
from pathlib import Path

from tests.conftest import REPO


def test_the_wheel_installs_only_tokenfabric(tmp_path: Path) -> None:
    # Built from a copy: setuptools' build/ folder would otherwise carry stale modules over.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "results", "*.egg-info", "__pycache__", ".*_cache"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("tokenfabric-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                               capture_output=True, text=True, timeout=600, check=False)
    assert installed.returncode == 0, installed.stderr[-2000:]
    shown = subprocess.run([python, "-m", "pip", "show", "-f", "tokenfabric"],
                           capture_output=True, text=True, timeout=120, check=True).stdout
    files = [line.strip() for line in shown.split("Files:", 1)[1].splitlines() if line.strip()]
    tops = {f.split("/", 1)[0] for f in files if "/" in f}
    assert "controller" not in tops and "hostagent" not in tops, sorted(tops)
    for expected in ("tokenfabric/controller/app.py", "tokenfabric/hostagent/bridge.py",
                     "tokenfabric/controller/compile/select.py", "tokenfabric/py.typed"):
        assert expected in files, expected
    # Importable under the new names only (no dependencies installed: a module that imports
    # nothing outside the standard library stands for the package).
    probe = subprocess.run(
        [python, "-c", "import tokenfabric.hostagent, tokenfabric.controller, importlib.util;"
         "print(importlib.util.find_spec('controller'), importlib.util.find_spec('hostagent'))"],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split() == ["None", "None"]
