"""The agent extra must install beside vLLM: no P4Runtime stack, no protobuf<3.21."""

import json
import subprocess
import venv

from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO


def resolve(tmp_path, extra: str) -> dict[str, str]:
    """What `pip install -e .[extra]` would install into an empty venv: name -> version."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    report = tmp_path / "report.json"
    done = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--dry-run", "-q",
         "--ignore-installed", "--report", str(report), "-e", f"{REPO}[{extra}]"],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    installs = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}


def test_agent_extra_leaves_out_the_p4runtime_stack(tmp_path):
    resolved = resolve(tmp_path, "agent")
    assert "aiohttp" in resolved and "tokenfabric" in resolved
    assert "p4runtime-shell" not in resolved
    assert "p4runtime" not in resolved
    if "protobuf" in resolved:
        assert Version(resolved["protobuf"]) >= Version("3.21")


def test_agent_extra_declares_no_protobuf_cap():
    from importlib.metadata import requires

    for line in requires("tokenfabric") or []:
        req = Requirement(line)
        if req.marker and req.marker.evaluate({"extra": "agent"}):
            assert req.name not in {"p4runtime-shell", "p4runtime", "protobuf"}, line
