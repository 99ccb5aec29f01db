"""What a lab run needs, checked before anything is built.

External tools and modules come from the one requirements table
(tokenfabric/requirements.py, which `tokenfabric doctor` lists too), root from
tokenfabric.doctor; the project's own components (controller, host agent, compiled
P4 program) are checked here, because a checkout can lack a branch that is not
merged yet.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tokenfabric import requirements
from tokenfabric.doctor import check_root_netns

DATAPLANES = ("auto", "bmv2", "ovs")
DATAPLANE_TITLE = {"bmv2": "BMv2 (simple_switch_grpc, token_router.p4)",
                   "ovs": "Open vSwitch (userspace datapath, OpenFlow 1.3)"}


@dataclass
class Missing:
    name: str
    how: str  # how to get it
    debian: str | None = None  # the Debian package that provides it


def _command_exists(module: str, attr: str, sub: str | None = None) -> bool:
    try:
        command = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return False
    if sub is None:
        return True
    return sub in getattr(command, "commands", {})


def p4_program() -> Path | None:
    """The compiled token_router.p4 (BMv2 JSON beside its P4Info), where the checkout has it."""
    try:
        from tokenfabric.dataplane import TOKEN_ROUTER_JSON, TOKEN_ROUTER_P4INFO
    except ImportError:
        return None
    return TOKEN_ROUTER_JSON if TOKEN_ROUTER_JSON.is_file() and \
        TOKEN_ROUTER_P4INFO.is_file() else None


def choose_dataplane(choice: str) -> tuple[str, str | None]:
    """`--dataplane` resolved: (bmv2 | ovs, a note saying why where auto chose OVS)."""
    if choice not in DATAPLANES:
        raise ValueError(f"unknown dataplane {choice!r}: one of {', '.join(DATAPLANES)}")
    if choice != "auto":
        return choice, None
    if requirements.by_name("simple_switch_grpc").present():
        return "bmv2", None
    return "ovs", ("simple_switch_grpc (BMv2) not found: using Open vSwitch with the "
                   "userspace datapath. The controller then does from the agents' reports "
                   "what token_router.p4 does in the switch (p2c, beacons, token buckets); "
                   "see docs/lab.md.")


def _openflow_missing() -> list[Missing]:
    """The controller's OpenFlow side, which a run on Open vSwitch needs."""
    missing = []
    if importlib.util.find_spec("os_ken") is None:
        missing.append(Missing("os-ken (the controller's OpenFlow library)",
                               "pip install -e '.[all]' (or tokenfabric[controller])"))
    try:
        driver = importlib.util.find_spec("tokenfabric.controller.openflow")
    except ImportError:
        driver = None
    if driver is None:
        missing.append(Missing("the controller's OpenFlow driver (controller/openflow)",
                               "a checkout that has controller/openflow (the ofdriver branch)"))
    return missing


def missing_pieces(dataplane: str = "bmv2") -> list[Missing]:
    """Everything absent that a lab run on `dataplane` (bmv2 | ovs) needs, each with how
    to get it: every tool of the requirements table the dataplane uses (both topologies
    use the same ones), root, and the project's own components."""
    missing: list[Missing] = []
    root = check_root_netns()
    if not root.present:
        missing.append(Missing(root.name, root.detail))
    missing += [Missing(r.name, f"{r.used_for}; {r.get_it()}", r.debian)
                for r in requirements.missing_for(dataplane)]
    if dataplane == "ovs":
        missing += _openflow_missing()
    if not _command_exists("tokenfabric.controller.cli", "controller_group", "run"):
        missing.append(Missing("controller (`tokenfabric controller run`)",
                               "install tokenfabric[controller] from a checkout that has "
                               "controller/cli.py (issue 4)"))
    if not _command_exists("tokenfabric.hostagent.cli", "agent_group", "run"):
        missing.append(Missing("host agent (`tokenfabric agent run`)",
                               "install tokenfabric[agent] from a checkout that has the "
                               "agent (issue 5)"))
    if not _command_exists("tokenfabric.hostagent.cli", "emulator_command"):
        missing.append(Missing("vLLM emulator (`tokenfabric vllm-emulator`)",
                               "install tokenfabric[agent] (issue 5)"))
    if dataplane == "bmv2" and p4_program() is None:
        missing.append(Missing("compiled P4 program (p4src/build/token_router.json + "
                               ".p4info.txtpb)", "a checkout with p4src/build (issue 3), or "
                               "run p4src/build.sh with p4c-bm2-ss"))
    return missing


def still_runs(missing: list[Missing]) -> str:
    """What works without the missing pieces."""
    works = ["the unit tests", "the load generator against any OpenAI-compatible server "
             "(python -m tokenfabric.lab.loadgen)", "`tokenfabric lab report` on results"]
    absent = " ".join(m.name for m in missing)
    for piece, label in (("controller", "the controller"), ("host agent", "the agent"),
                         ("emulator", "the vLLM emulator")):
        if piece not in absent:
            works.append(label)
    return "Still runs: " + ", ".join(works) + "."


def message(missing: list[Missing], what: str = "the lab") -> str:
    """One message: what is missing, how to get each piece, and what still runs."""
    lines = [f"tokenfabric lab: cannot run {what}; missing:"]
    lines += [f"  - {m.name}: {m.how}" for m in missing]
    packages = sorted({m.debian for m in missing if m.debian})
    if packages:
        lines.append(f"Install them: apt-get install -y {' '.join(packages)}")
    lines.append(still_runs(missing))
    return "\n".join(lines)
