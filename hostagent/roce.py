"""RoCEv2 QoS on the host: the NIC side of the fabric's lossless class.

From the policy's values (defaults: RoCE on DSCP 26 and priority 3 with PFC, CNPs on DSCP
48 and priority 6, ECN on for DCQCN), for each RDMA device and its network device:

    dcb app replace dev NETDEV dscp-prio 26:3 48:6      DSCP -> priority (trust DSCP)
    dcb pfc set dev NETDEV prio-pfc 0:off .. 3:on ..    PFC on the lossless priority only
    echo 1  > /sys/class/net/NETDEV/ecn/roce_np/enable/3    ECN: notification point
    echo 1  > /sys/class/net/NETDEV/ecn/roce_rp/enable/3    ECN: reaction point (DCQCN)
    echo 48 > /sys/class/net/NETDEV/ecn/roce_np/cnp_dscp    CNP DSCP
    echo 6  > /sys/class/net/NETDEV/ecn/roce_np/cnp_802p_prio  CNP priority
    echo 104 > /sys/kernel/config/rdma_cm/RDMADEV/ports/1/default_roce_tos  RoCE ToS (DSCP<<2)

`dcb` is iproute2's; the ecn/ files are the mlx5 driver's sysfs; the rdma_cm configfs
is the kernel's (mounted under /sys/kernel/config). Without an RDMA device nothing is
applied and the agent says so in its reports.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


SYS_INFINIBAND = Path("/sys/class/infiniband")


@dataclass(frozen=True)
class RoceQos:
    dscp: int = 26
    priority: int = 3
    cnp_dscp: int = 48
    cnp_priority: int = 6
    ecn: bool = True
    pfc: bool = True

    @classmethod
    def from_dict(cls, values: dict) -> RoceQos:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown RoCE setting(s): {', '.join(unknown)}")
        qos = cls(**values)
        for name in ("dscp", "cnp_dscp"):
            if not 0 <= getattr(qos, name) <= 63:
                raise ValueError(f"{name} must be 0..63")
        for name in ("priority", "cnp_priority"):
            if not 0 <= getattr(qos, name) <= 7:
                raise ValueError(f"{name} must be 0..7")
        return qos


def rdma_devices(root: Path = SYS_INFINIBAND) -> dict[str, list[str]]:
    """RDMA device -> its network devices (empty where none exists, as on this machine)."""
    found: dict[str, list[str]] = {}
    if not root.is_dir():
        return found
    for dev in sorted(root.iterdir()):
        nets = dev / "device" / "net"
        found[dev.name] = sorted(p.name for p in nets.iterdir()) if nets.is_dir() else []
    return found


def commands(qos: RoceQos, netdev: str, rdma_dev: str) -> list[list[str]]:
    """The exact commands, as argv lists (sysfs writes through `sh -c`)."""
    def write(value: int, path: str) -> list[str]:
        return ["sh", "-c", f"echo {value} > {path}"]

    cmds = [["dcb", "app", "replace", "dev", netdev, "dscp-prio",
             f"{qos.dscp}:{qos.priority}", f"{qos.cnp_dscp}:{qos.cnp_priority}"]]
    if qos.pfc:
        prio = " ".join(f"{p}:{'on' if p == qos.priority else 'off'}" for p in range(8))
        cmds.append(["dcb", "pfc", "set", "dev", netdev, "prio-pfc", *prio.split()])
    ecn = f"/sys/class/net/{netdev}/ecn"
    if qos.ecn:
        cmds.append(write(1, f"{ecn}/roce_np/enable/{qos.priority}"))
        cmds.append(write(1, f"{ecn}/roce_rp/enable/{qos.priority}"))
    cmds.append(write(qos.cnp_dscp, f"{ecn}/roce_np/cnp_dscp"))
    cmds.append(write(qos.cnp_priority, f"{ecn}/roce_np/cnp_802p_prio"))
    cmds.append(write(qos.dscp << 2,
                      f"/sys/kernel/config/rdma_cm/{rdma_dev}/ports/1/default_roce_tos"))
    return cmds


def render(cmds: list[list[str]]) -> str:
    return "\n".join(shlex.join(c) for c in cmds)


def apply(qos: RoceQos, devices: dict[str, list[str]] | None = None) -> dict:
    """Apply on every RDMA device (found, or given); returns the status the agent reports."""
    devices = rdma_devices() if devices is None else devices
    if not devices:
        message = f"no RDMA device ({SYS_INFINIBAND} is empty or absent): RoCE QoS not applied"
        log.info(message)
        return {"present": False, "devices": [], "message": message}
    failures = []
    for rdma_dev, netdevs in devices.items():
        for netdev in netdevs:
            for argv in commands(qos, netdev, rdma_dev):
                done = subprocess.run(argv, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    failures.append(f"{shlex.join(argv)}: {done.stderr.strip()}")
    for failure in failures:
        log.error("RoCE QoS: %s", failure)
    return {"present": True, "devices": sorted(devices), "failures": failures,
            "message": "applied" if not failures else f"{len(failures)} command(s) failed"}
