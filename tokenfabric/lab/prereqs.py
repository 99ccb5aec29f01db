"""What a lab run needs, checked before anything is built.

External pieces come from tokenfabric.doctor (BMv2, Mininet, root); the
project's own components (controller, host agent, compiled P4 program) are
checked here, because a checkout can lack a branch that is not merged yet.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from tokenfabric.doctor import check_bmv2, check_mininet, check_root_netns


@dataclass
class Missing:
    name: str
    how: str  # how to get it


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


def missing_pieces(need_mininet: bool = True) -> list[Missing]:
    """Everything absent that a lab run needs, each with how to get it."""
    missing: list[Missing] = []
    for finding in [check_root_netns(), check_bmv2(), *([check_mininet()] if need_mininet
                                                           else [])]:
        if not finding.present:
            missing.append(Missing(finding.name, finding.detail))
    if not _command_exists("controller.cli", "controller_group", "run"):
        missing.append(Missing("controller (`tokenfabric controller run`)",
                               "install tokenfabric[controller] from a checkout that has "
                               "controller/cli.py (issue 4)"))
    if not _command_exists("hostagent.cli", "agent_group", "run"):
        missing.append(Missing("host agent (`tokenfabric agent run`)",
                               "install tokenfabric[agent] from a checkout that has the "
                               "agent (issue 5)"))
    if not _command_exists("hostagent.cli", "emulator_command"):
        missing.append(Missing("vLLM emulator (`tokenfabric vllm-emulator`)",
                               "install tokenfabric[agent] (issue 5)"))
    if p4_program() is None:
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
    lines.append(still_runs(missing))
    return "\n".join(lines)
