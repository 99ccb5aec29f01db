"""`tokenfabric doctor`: which external pieces are here, their versions, and who needs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from tokenfabric import exitcodes
from tokenfabric.requirements import (
    BMV2,
    LAB,
    OPTIONAL,
    OVS,
    REBUILD,
    REQUIREMENTS,
    Requirement,
    by_name,
)
from tokenfabric.tools import find_tool, tool_env

VLLM_VENV = Path(os.environ.get("TOKENFABRIC_VLLM_VENV",
                                Path.home() / ".cache" / "tokenfabric" / "vllm-venv"))


@dataclass
class Finding:
    name: str
    present: bool
    version: str
    detail: str
    needed_by: str
    main_job: bool  # the lab experiment cannot run without it


def _run(argv: list[str], timeout: float = 10) -> str:
    """Combined output of a short command, or '' where it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=tool_env(), check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def _first_version(text: str) -> str:
    match = re.search(r"\d+\.\d+(\.\d+)?([.\-+~][0-9A-Za-z.\-+~]*)?", text)
    return match.group(0) if match else (text.splitlines()[0] if text else "")


def lab_dataplane() -> str:
    """The dataplane `lab run --dataplane auto` takes here (tokenfabric/lab/prereqs.py)."""
    return "bmv2" if by_name("simple_switch_grpc").present() else "ovs"


def check_requirement(req: Requirement, dataplane: str) -> Finding:
    """One row of the requirements table, as found here; `main_job` where a lab run on
    `dataplane` cannot work without it."""
    where = req.present()
    scope = {LAB: "every lab run", OVS: "lab runs on Open vSwitch",
             BMV2: "lab runs on BMv2", REBUILD: "rebuilding p4src/",
             OPTIONAL: "optional"}[req.needed_by]
    needed_by = f"{req.used_for} ({scope})" + (f"; from Debian package {req.debian}"
                                                if req.debian else "")
    main_job = req.needed_on(dataplane)
    if where is None:
        detail = "not found" + ("" if req.module else " on PATH or in /opt/p4/bin")
        detail += f"; {req.get_it()}"
        if req.needed_by == BMV2 and dataplane == "ovs":
            detail += "; the lab runs on Open vSwitch instead (--dataplane auto)"
        return Finding(req.name, False, "", detail, needed_by, main_job)
    version = _first_version(_run([where, *req.version_args])) if req.version_args else ""
    if req.name == "ovs-vsctl":
        running = _run([where, "--timeout=2", "show"], timeout=5)
        if "ovs_version" not in running and "Bridge" not in running:
            where += (" (OVS not running: `tokenfabric lab run --dataplane ovs` starts "
                      "it; or `service openvswitch-switch start`)")
    return Finding(req.name, True, version, where, needed_by, main_job)


def check_root_netns() -> Finding:
    if os.geteuid() != 0:
        return Finding("root+netns", False, "", "not root: run the lab with sudo",
                       "lab experiments and every test that builds veths", True)
    if not find_tool("unshare"):
        return Finding("root+netns", False, "", "root, but no `unshare` to test network "
                       "namespaces with: Debian package util-linux",
                       "lab experiments and every test that builds veths", True)
    # A transient namespace that vanishes with the child: nothing to clean up.
    ok = subprocess.run(
        ["unshare", "--net", "true"], capture_output=True, check=False).returncode == 0
    return Finding("root+netns", bool(ok), "", "root; network namespaces work" if ok else
                   "root, but `unshare --net` failed: no network namespaces here",
                   "lab experiments and every test that builds veths", True)


def check_vllm(url: str) -> Finding:
    """A reachable vLLM (or emulator) at `url`; the built-in emulator otherwise serves the lab."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=2) as reply:
            models = [m.get("id") for m in json.load(reply).get("data", [])]
        return Finding("vllm", True, "", f"{url} serves {', '.join(models) or 'no model'}",
                       "a real backend (lab experiment e)", False)
    except (OSError, ValueError, urllib.error.URLError):
        pass
    python = VLLM_VENV / "bin" / "python"
    if python.exists():
        version = _run([str(python), "-c", "import vllm; print(vllm.__version__)"], timeout=60)
        return Finding("vllm", True, _first_version(version),
                       f"not serving at {url}; installed in {VLLM_VENV}",
                       "a real backend (lab experiment e)", False)
    return Finding("vllm", False, "", f"nothing at {url} and no venv at {VLLM_VENV}; "
                   "the built-in emulator (`tokenfabric vllm-emulator`) stands in",
                   "a real backend (lab experiment e)", False)


def check_rdma() -> Finding:
    devices = sorted(p.name for p in Path("/sys/class/infiniband").glob("*"))
    return Finding("rdma", bool(devices), "", ", ".join(devices) if devices else
                   "no RDMA device: host RoCE set-up is reported and skipped",
                   "host-side RoCE QoS (PFC, ECN, DSCP maps)", False)


def run_checks(vllm_url: str) -> list[Finding]:
    dataplane = lab_dataplane()
    return ([check_requirement(r, dataplane) for r in REQUIREMENTS]
            + [check_root_netns(), check_rdma(), check_vllm(vllm_url)])


@click.command("doctor")
@click.option("--vllm-url", default="http://127.0.0.1:8000", show_default=True,
              envvar="TOKENFABRIC_VLLM_URL", help="Where to look for a running vLLM.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(vllm_url: str, as_json: bool) -> None:
    """Check every external piece of the lab (tokenfabric/requirements.py: the table the
    lab's preflight checks), root, vLLM and RDMA.

    Exits 0 only when everything the main job (a lab experiment on the dataplane
    `--dataplane auto` takes here) needs is present.
    """
    findings = run_checks(vllm_url)
    if as_json:
        click.echo(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for f in findings:
            mark = "ok " if f.present else ("MISSING" if f.main_job else "absent")
            version = f" {f.version}" if f.version else ""
            click.echo(f"[{mark:7}] {f.name}{version}: {f.detail}")
            click.echo(f"{'':10}needed by: {f.needed_by}")
    missing = [f.name for f in findings if f.main_job and not f.present]
    if missing:
        if not as_json:
            packages = sorted({r.debian for r in REQUIREMENTS if r.name in missing and r.debian})
            click.echo(f"\nThe lab cannot run: missing {', '.join(missing)}. "
                       "The unit tests, the controller, the agent and the emulator still run.")
            if packages:
                click.echo(f"Install: apt-get install -y {' '.join(packages)}")
        raise SystemExit(exitcodes.MISSING)
    if not as_json:
        click.echo("\nEverything the lab needs is here.")
