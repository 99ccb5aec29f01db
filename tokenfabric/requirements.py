"""The one table of external pieces: what the lab and the tools run, who needs them, and
where each comes from.

The lab's preflight (tokenfabric/lab/prereqs.py) and `tokenfabric doctor` both read it,
and scripts/setup.sh installs every Debian package it names (a unit test checks that).
Checksum offload is turned off through pyroute2 (tokenfabric/lab/offload.py), so the
`ethtool` binary is not in here: the lab runs without it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from tokenfabric.tools import find_tool

# Who needs a piece: every lab run, a lab run on one dataplane, or something else only.
LAB = "lab"
OVS = "ovs"
BMV2 = "bmv2"
REBUILD = "rebuild"  # rebuilding p4src/ only
OPTIONAL = "optional"  # the lab runs without it, with less evidence


@dataclass(frozen=True)
class Requirement:
    name: str  # an executable, or a Python module where `module` is set
    used_for: str
    needed_by: str  # LAB | OVS | BMV2 | REBUILD | OPTIONAL
    debian: str | None = None  # the Debian package that provides it
    how: str = ""  # how to get it where no Debian package does
    module: bool = False  # a Python module (importable from the project's venv)
    version_args: tuple[str, ...] = ()  # how doctor asks for its version

    def present(self) -> str | None:
        """Where it is (a path, or the module's origin); None where it is absent."""
        if self.module:
            try:
                spec = importlib.util.find_spec(self.name)
            except (ImportError, ValueError):
                return None
            return (spec.origin or self.name) if spec else None
        return find_tool(self.name)

    def get_it(self) -> str:
        """How to get it, as one phrase."""
        if self.debian:
            return f"Debian package {self.debian}"
        return self.how

    def needed_on(self, dataplane: str) -> bool:
        """Whether a lab run on `dataplane` (bmv2 | ovs) cannot work without it."""
        return self.needed_by in (LAB, dataplane)


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("mnexec", "runs every command of a Mininet host in its namespace", LAB,
                debian="mininet", version_args=("-v",)),
    Requirement("mininet", "the lab's network (Debian's python3 site-packages: the venv "
                "needs --system-site-packages)", LAB, debian="mininet", module=True),
    Requirement("ifconfig", "Mininet configures interfaces with it and refuses to start "
                "without it", LAB, debian="net-tools"),
    Requirement("ip", "links, addresses, routes and neighbours of the hosts; the host "
                "agent's VIP on loopback", LAB, debian="iproute2", version_args=("-V",)),
    Requirement("tc", "link bandwidth (HTB on every link, --bw)", LAB, debian="iproute2",
                version_args=("-V",)),
    Requirement("pyroute2", "checksum offload off on every lab interface, the data-path "
                "probe's gateway check", LAB, how="pip install -e '.[lab]' (or '.[all]')",
                module=True),
    Requirement("ovs-vsctl", "creates the lab's bridges", OVS, debian="openvswitch-switch",
                version_args=("--version",)),
    Requirement("ovsdb-tool", "creates OVS's database where there is none", OVS,
                debian="openvswitch-switch"),
    Requirement("ovsdb-server", "OVS's database (the lab starts it where not running)", OVS,
                debian="openvswitch-switch"),
    Requirement("ovs-vswitchd", "OVS's userspace datapath (the lab starts it where not "
                "running)", OVS, debian="openvswitch-switch", version_args=("--version",)),
    Requirement("ovs-ofctl", "Mininet's OVS switch class", OVS, debian="openvswitch-switch"),
    Requirement("simple_switch_grpc", "the P4 switch (BMv2 with P4Runtime)", BMV2,
                how="Ubuntu: p4lang's packages (p4lang-bmv2); elsewhere build "
                "p4lang/behavioral-model with PI into /opt/p4 (see README)",
                version_args=("--version",)),
    Requirement("p4c-bm2-ss", "rebuilding p4src/ (the compiled program is committed)",
                REBUILD, how="Ubuntu: p4lang's packages (p4lang-p4c); elsewhere build "
                "p4lang/p4c's BMv2 backend", version_args=("--version",)),
    Requirement("tcpdump", "the failover experiment's capture on the killed backend (without "
                "it: response headers only)", OPTIONAL, debian="tcpdump",
                version_args=("--version",)),
)


def by_name(name: str) -> Requirement:
    return next(r for r in REQUIREMENTS if r.name == name)


def missing_for(dataplane: str) -> list[Requirement]:
    """The requirements a lab run on `dataplane` needs that are absent here."""
    return [r for r in REQUIREMENTS if r.needed_on(dataplane) and r.present() is None]


def debian_packages() -> set[str]:
    """Every Debian package the table names."""
    return {r.debian for r in REQUIREMENTS if r.debian}
