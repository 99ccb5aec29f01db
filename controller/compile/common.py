"""What every stage of the compile step shares: the error, address helpers and the class plan."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tokenfabric.controller.model import Policy, TrafficClass
from tokenfabric.p4names import NUM_CLASSES

DEFAULT_CLASS = TrafficClass(service_class="standard", dscp=0, priority_level=90, queue=1)


class CompileError(ValueError):
    """The model cannot be expressed on the switches (e.g. more classes than queues)."""


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def mac(text: str | None) -> int:
    if text is None:  # a switch without `mac` that must source frames
        raise CompileError("a MAC address is needed here and none is configured")
    return int(text.replace(":", ""), 16)


@dataclass(frozen=True)
class ClassPlan:
    """The dataplane's traffic classes (tclass 0..7), read by Classify and QoS."""

    by_key: dict[tuple[int, int], int]  # (dscp, queue) -> tclass
    rows: dict[int, tuple[int, int]]  # tclass -> (dscp, queue); may have holes
    roce: int | None
    cnp: int | None

    def of(self, tc: TrafficClass) -> int:
        return self.by_key[(tc.dscp, tc.queue)]


def plan_classes(policy: Policy) -> ClassPlan:
    """tclass 0 is traffic of no tenant; 1 and 2 RoCE's; then each distinct contract class.

    A contract class keeps the tclass it had in `policy.class_ids` (the policy being
    replaced, see schema.py), so that a reload adding a class rewrites no tenant's
    entries and class counters keep their meaning; new classes take free numbers.
    """
    default = DEFAULT_CLASS
    if policy.default_contract:
        default = policy.contracts[policy.default_contract].traffic_class
    rows: dict[int, tuple[int, int]] = {0: (default.dscp, default.queue)}
    roce = cnp = None
    if policy.roce.enabled:
        rows[1] = (policy.roce.dscp, policy.roce.priority)
        rows[2] = (policy.roce.cnp_dscp, policy.roce.cnp_priority)
        roce, cnp = 1, 2
    fixed = len(rows)
    by_key: dict[tuple[int, int], int] = {rows[0]: 0}
    wanted: list[tuple[int, int]] = []
    for contract in sorted(policy.contracts.values(), key=lambda c: c.name):
        key = (contract.traffic_class.dscp, contract.traffic_class.queue)
        if key not in by_key and key not in wanted:
            wanted.append(key)
    for key in wanted:
        old = policy.class_ids.get(key)
        if old is not None and fixed <= old < NUM_CLASSES and old not in rows:
            rows[old] = key
            by_key[key] = old
    for key in wanted:
        if key not in by_key:
            free = next((t for t in range(fixed, NUM_CLASSES) if t not in rows), None)
            if free is None:
                need = fixed + len(wanted)
                raise CompileError(
                    f"{need} traffic classes (DSCP, queue) needed, the switch has "
                    f"{NUM_CLASSES} (one for traffic of no tenant"
                    f"{' and two for RoCE' if policy.roce.enabled else ''})")
            rows[free] = key
            by_key[key] = free
    return ClassPlan(by_key, rows, roce, cnp)
