"""`tokenfabric doctor`: which external pieces are here, their versions, and who needs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from tokenfabric import exitcodes
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


def _tool(name: str, version_args: list[str], needed_by: str, main_job: bool,
          hint: str) -> Finding:
    path = find_tool(name)
    if not path:
        return Finding(name, False, "", f"not found on PATH or in /opt/p4/bin; {hint}",
                       needed_by, main_job)
    return Finding(name, True, _first_version(_run([path, *version_args])), path,
                   needed_by, main_job)


def check_bmv2() -> Finding:
    return _tool("simple_switch_grpc", ["--version"],
                 "lab experiments and the dataplane packet tests (P4 switch)", True,
                 "Ubuntu: p4lang's packages; elsewhere build p4lang/behavioral-model "
                 "with PI into /opt/p4 (see README)")


def check_p4c() -> Finding:
    return _tool("p4c-bm2-ss", ["--version"],
                 "rebuilding p4src/ (the compiled program is committed)", False,
                 "Ubuntu: p4lang's packages; elsewhere build p4lang/p4c's BMv2 backend")


def check_mininet() -> Finding:
    mn = _tool("mn", ["--version"], "lab experiments (hosts and links)", True,
               "Debian/Ubuntu: apt-get install mininet")
    mnexec = find_tool("mnexec")
    if mn.present and not mnexec:
        mn.present, mn.detail = False, "mn found but mnexec is missing: reinstall mininet"
    elif mn.present:
        mn.detail = f"{mn.detail}, {mnexec}"
    return mn


def check_ovs() -> Finding:
    found = _tool("ovs-vsctl", ["--version"],
                  "Mininet's default switches and the OpenFlow southbound", False,
                  "Debian/Ubuntu: apt-get install openvswitch-switch")
    if found.present:
        found.name = "openvswitch"
        running = _run([found.detail, "--timeout=2", "show"], timeout=5)
        if "ovs_version" not in running and "Bridge" not in running:
            found.detail += (" (not running: `tokenfabric lab run --dataplane ovs` starts "
                             "it; or `service openvswitch-switch start`)")
    else:
        found.name = "openvswitch"
    return found


def check_root_netns() -> Finding:
    if os.geteuid() != 0:
        return Finding("root+netns", False, "", "not root: run the lab with sudo",
                       "lab experiments and every test that builds veths", True)
    # A transient namespace that vanishes with the child: nothing to clean up.
    ok = find_tool("unshare") and subprocess.run(
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


CHECKS: list[Callable[[], Finding]] = [check_bmv2, check_p4c, check_mininet, check_ovs,
                                       check_root_netns, check_rdma]


def run_checks(vllm_url: str) -> list[Finding]:
    findings = [check() for check in CHECKS] + [check_vllm(vllm_url)]
    by_name = {f.name: f for f in findings}
    bmv2, ovs = by_name["simple_switch_grpc"], by_name["openvswitch"]
    ovs_tools = all(find_tool(t) for t in ("ovs-vsctl", "ovs-vswitchd", "ovsdb-server"))
    if not bmv2.present and ovs_tools:
        # `lab run --dataplane auto` takes Open vSwitch then (docs/lab.md)
        bmv2.main_job = False
        bmv2.detail += "; the lab runs on Open vSwitch instead (--dataplane auto)"
        ovs.main_job = True
    return findings


@click.command("doctor")
@click.option("--vllm-url", default="http://127.0.0.1:8000", show_default=True,
              envvar="TOKENFABRIC_VLLM_URL", help="Where to look for a running vLLM.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(vllm_url: str, as_json: bool) -> None:
    """Check BMv2, p4c, Mininet, Open vSwitch, root, vLLM and RDMA.

    Exits 0 only when everything the main job (a lab experiment) needs is present.
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
            click.echo(f"\nThe lab cannot run: missing {', '.join(missing)}. "
                       "The unit tests, the controller, the agent and the emulator still run.")
        raise SystemExit(exitcodes.MISSING)
    if not as_json:
        click.echo("\nEverything the lab needs is here.")
