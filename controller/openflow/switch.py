"""One OpenFlow switch behind the same driver interface as a P4Runtime switch.

The controller hands it a DesiredState (`apply`); it keeps the last one and,
whenever a session is up, reconciles: read the switch's flows, groups and
meters, translate the desired state (controller/openflow/flows.py), and write
only the difference. A new session (OVS restart, controller restart, network)
reconciles again by itself, exactly like the P4Runtime driver.

Flows are recognised by their cookie (identity and content hashes, see
FlowSpec.cookie), so a controller that restarts reads back what it wrote
without trusting OVS to echo matches byte for byte; flows that `learn` made
(pinned connections) carry LEARNED_COOKIE and are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from tokenfabric.controller.drivers import CounterValue, DriverStats, ReconcileResult, Role
from tokenfabric.controller.entries import DesiredState
from tokenfabric.controller.openflow import messages
from tokenfabric.controller.openflow.connection import Connection, OpenFlowError
from tokenfabric.controller.openflow.flows import (
    CLASSIFY,
    FEATURES,
    LEARNED_COOKIE,
    Context,
    FlowSpec,
    OfState,
    translate,
)

log = logging.getLogger(__name__)


TENANT_TRAFFIC, TENANT_CONNS = "tenant_traffic", "tenant_admitted"  # the P4 counter names


@dataclass
class OpenFlowStats(DriverStats):
    """DriverStats and the OpenFlow messages behind updates_written."""

    flow_mods: int = 0
    group_mods: int = 0
    meter_mods: int = 0
    # prefix affinity's bound: decisions re-made from the reports, the reconciles they
    # caused, and the (service, backend, bound) keys that flipped open/closed in them
    load_rechecks: int = 0
    load_reconciles: int = 0
    steer_flips: int = 0


# At most one reconcile a second for load changes alone: the agents report about once a
# second, and each reconcile reads every flow (the learned pins too) back from OVS.
LOAD_RECHECK_MIN_S = 1.0


class OpenFlowSwitch:
    """A switch that connects to the controller's OpenFlow listener with `datapath_id`
    (a SwitchDriver; the one controller of the switch is its primary once connected)."""

    keeps_token_buckets = False  # the controller's buckets decide: set_over_budget

    def __init__(self, name: str, datapath_id: int, device_id: int = 0,
                 context: Callable[[], Context] | None = None,
                 load_recheck_min_s: float = LOAD_RECHECK_MIN_S) -> None:
        self.name = name
        self.datapath_id = datapath_id
        self.device_id = device_id
        self._context = context or Context
        self.over_budget: frozenset[int] = frozenset()
        self.connection: Connection | None = None
        self.stats = OpenFlowStats()
        self.last_error: str | None = None
        self.notes: list[str] = []
        self.pinned = 0  # learned connection flows at the last read
        self._desired: DesiredState | None = None
        self._want: OfState | None = None
        self._lock = asyncio.Lock()
        self._settled = asyncio.Event()
        self._session_task: asyncio.Task[None] | None = None
        self.load_recheck_min_s = load_recheck_min_s
        self._last_load_reconcile = -float("inf")

    # ---- the driver interface --------------------------------------------------

    @property
    def role(self) -> Role:
        if self.connection is None or self.connection.closed.is_set():
            return Role.DISCONNECTED
        return Role.PRIMARY

    @property
    def desired(self) -> DesiredState | None:
        return self._desired

    @property
    def features(self) -> list[str]:
        return list(FEATURES)

    async def start(self) -> None:
        """Nothing to dial: the switch connects to the listener (OpenFlowSouthbound)."""

    def launch(self) -> None:
        """Same as start(); the P4Runtime driver's name for starting in the background."""

    async def stop(self) -> None:
        if self._session_task is not None:
            self._session_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._session_task
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    async def apply(self, desired: DesiredState) -> ReconcileResult:
        """Remember `desired` and, when connected, write the difference."""
        self._desired = desired
        return await self.reconcile()

    async def set_over_budget(self, tenants: frozenset[int]) -> None:
        """The controller's admission decision (controller/openflow/budget.py)."""
        tenants = frozenset(tenants)
        if tenants != self.over_budget:
            self.over_budget = tenants
            if self._desired is not None:
                await self.reconcile()

    async def recheck_load_bound(self) -> bool:
        """Prefix affinity's bound from the latest reports (controller/openflow/affinity.py):
        reconcile when a (service, backend, bound) key flipped, at most once per
        `load_recheck_min_s` (a flip in between waits for the next call)."""
        if self._desired is None or self._want is None or not self._want.steering:
            return False
        if time.monotonic() - self._last_load_reconcile < self.load_recheck_min_s:
            return False
        self.stats.load_rechecks += 1
        before = self._want.steering
        if self._translate().steering == before:
            return False
        self._last_load_reconcile = time.monotonic()
        self.stats.load_reconciles += 1
        result = await self.reconcile()
        return result.applied

    def _translate(self) -> OfState:
        assert self._desired is not None
        ctx = dataclasses.replace(self._context(), over_budget=self.over_budget)
        return translate(self._desired, ctx)

    async def wait_settled(self, timeout: float = 10.0) -> Role:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        return self.role

    def status(self) -> dict[str, Any]:
        last = self.stats.last
        conn = self.connection
        return {
            "name": self.name, "address": f"dpid:{self.datapath_id:#018x}",
            "device_id": self.device_id, "role": self.role.value, "driver": "openflow",
            "features": self.features, "datapath_id": self.datapath_id,
            "peer": None if conn is None or not conn.peer else f"{conn.peer[0]}:{conn.peer[1]}",
            "sessions": self.stats.sessions, "reconciles": self.stats.reconciles,
            "updates_written": self.stats.updates_written,
            "flow_mods": self.stats.flow_mods, "group_mods": self.stats.group_mods,
            "meter_mods": self.stats.meter_mods, "pinned_connections": self.pinned,
            "over_budget_tenants": sorted(self.over_budget),
            "affinity": self._affinity_view(),
            "last_reconcile": None if last is None else last.view(),
            "last_error": self.last_error, "notes": list(self.notes),
        }

    def _affinity_view(self) -> dict[str, Any]:
        """Prefix affinity as last translated: client entries installed, the (service,
        backend, bound) keys open and over the bound, and the bound's churn."""
        want = self._want or OfState()
        keys = sorted(want.steering.items())
        return {"entries": want.affinity_entries,
                "open": [list(k) for k, open_ in keys if open_],
                "over_bound": [list(k) for k, open_ in keys if not open_],
                "load_rechecks": self.stats.load_rechecks,
                "load_reconciles": self.stats.load_reconciles,
                "steer_flips": self.stats.steer_flips}

    async def read_counters(self, name: str, indexes: Any = None,
                            cells: Collection[int] | None = None) -> dict[int, CounterValue]:
        """The P4 counters' meaning from flow statistics of the classify table:
        tenant_traffic = every tenant flow (both directions), tenant_admitted =
        packets of the tenant's SYN flows (new connections); only the tenants in `cells`
        when given."""
        if name not in (TENANT_TRAFFIC, TENANT_CONNS):
            raise KeyError(f"no counter {name!r} on an OpenFlow switch")
        want = self._want or OfState()
        by_cookie = {spec.cookie(): spec for spec in want.flows.values()
                     if spec.table == CLASSIFY and spec.metadata is not None}
        out: dict[int, list[int]] = {}
        for stat in await self._read_flows(table=CLASSIFY):
            spec = by_cookie.get(stat.cookie)
            if spec is None or spec.metadata is None:
                continue
            syn = any(k == "tcp_flags" for k, _ in spec.match)
            if name == TENANT_CONNS and not syn:
                continue
            tenant = spec.metadata[0]
            if cells is not None and tenant not in cells:
                continue
            acc = out.setdefault(tenant, [0, 0])
            acc[0] += stat.packet_count
            acc[1] += stat.byte_count
        return {t: CounterValue(p, b) for t, (p, b) in out.items()}

    async def read_port_bytes(self) -> dict[int, int]:
        """Per port: the bytes the switch received on it (OpenFlow port statistics), i.e.
        what the host on that port sent; with DSR, a backend's replies (docs/ledger.md)."""
        conn = self.connection
        if conn is None or conn.closed.is_set():
            raise OpenFlowError(f"{self.name}: not connected")
        stats = await conn.request(parser.OFPPortStatsRequest(conn.datapath, 0, ofp.OFPP_ANY))
        return {int(s.port_no): int(s.rx_bytes) for s in stats if s.port_no < ofp.OFPP_MAX}

    async def read_flow_stats(self) -> list[Any]:
        """Every flow the switch holds, as os-ken OFPFlowStats (tests and tooling)."""
        return await self._read_flows()

    # ---- sessions --------------------------------------------------------------

    def attach(self, conn: Connection) -> None:
        """A session came up (server.py): replace the old one and reconcile."""
        old, self.connection = self.connection, conn
        if old is not None:
            asyncio.get_running_loop().create_task(old.close())
        self.stats.sessions += 1
        self._settled.clear()
        self._session_task = asyncio.get_running_loop().create_task(self._on_session(conn))

    async def _on_session(self, conn: Connection) -> None:
        log.info("openflow switch %s (dpid %#x) connected from %s", self.name,
                 self.datapath_id, conn.peer)
        try:
            if self._desired is not None:
                await self.reconcile()
        finally:
            self._settled.set()
        await conn.closed.wait()
        if self.connection is conn:
            log.warning("openflow switch %s disconnected", self.name)

    # ---- reconcile -------------------------------------------------------------

    async def reconcile(self) -> ReconcileResult:
        async with self._lock:
            result = await self._reconcile_locked()
        self.stats.record(result)
        return result

    async def _reconcile_locked(self) -> ReconcileResult:
        start = time.monotonic()
        if self._desired is None:
            return ReconcileResult(self.name, False, "nothing desired yet")
        want = self._translate()
        if self._want is not None:
            self.stats.steer_flips += sum(
                1 for key, open_ in want.steering.items()
                if key in self._want.steering and self._want.steering[key] != open_)
        self._want = want
        self.notes = want.notes
        conn = self.connection
        if conn is None or conn.closed.is_set():
            return ReconcileResult(self.name, False, "disconnected")
        dp = conn.datapath
        try:
            flows = await self._read_flows()
            groups = await conn.request(parser.OFPGroupDescStatsRequest(dp))
            meters = await conn.request(parser.OFPMeterConfigStatsRequest(
                dp, meter_id=ofp.OFPM_ALL))
        except (OpenFlowError, TimeoutError) as exc:
            self.last_error = f"reading the switch: {exc}"
            raise OpenFlowError(f"{self.name}: {self.last_error}") from exc
        self.stats.reconciles += 1
        result = _Tally()

        # meters and groups first (flows point at them), then flows, then removals
        held_meters = {m.meter_id: messages.meter_of(m) for m in meters}
        held_groups = {g.group_id: messages.group_of(g) for g in groups}
        meter_writes, meter_deletes = _diff(
            held_meters, want.meters, result,
            lambda spec, cmd: messages.meter_mod(dp, spec, cmd),
            lambda mid: messages.meter_delete(dp, mid), ofp.OFPMC_ADD, ofp.OFPMC_MODIFY)
        group_writes, group_deletes = _diff(
            held_groups, want.groups, result,
            lambda spec, cmd: messages.group_mod(dp, spec, cmd),
            lambda gid: messages.group_delete(dp, gid), ofp.OFPGC_ADD, ofp.OFPGC_MODIFY)

        wanted = {spec.cookie(): spec for spec in want.flows.values()}
        wanted_idents = {c >> 32 for c in wanted}
        held_cookies: set[int] = set()
        flow_deletes = []
        self.pinned = 0
        for stat in flows:
            if stat.cookie == LEARNED_COOKIE:
                self.pinned += 1
                continue
            held_cookies.add(stat.cookie)
            if stat.cookie not in wanted and stat.cookie >> 32 not in wanted_idents:
                flow_deletes.append(messages.flow_delete(dp, stat.table_id, stat.priority,
                                                         stat.match, stat.cookie))
                result.deleted += 1
        held_idents = {c >> 32 for c in held_cookies}
        flow_writes = []
        for cookie, spec in sorted(wanted.items(), key=lambda kv: _order(kv[1])):
            if cookie in held_cookies:
                continue
            flow_writes.append(messages.flow_add(dp, spec))
            if cookie >> 32 in held_idents:
                result.modified += 1
            else:
                result.inserted += 1
        batches = 0
        ordered = (meter_writes, group_writes, flow_writes, flow_deletes, group_deletes,
                   meter_deletes)
        try:
            for batch in ordered:
                if batch:
                    await conn.write(batch)
                    batches += 1
        except (OpenFlowError, TimeoutError) as exc:
            self.last_error = str(exc)
            raise OpenFlowError(f"{self.name}: {exc}") from exc
        finally:
            self.stats.meter_mods += len(meter_writes) + len(meter_deletes)
            self.stats.group_mods += len(group_writes) + len(group_deletes)
            self.stats.flow_mods += len(flow_writes) + len(flow_deletes)
            self.stats.updates_written += sum(map(len, ordered))
        self.last_error = None
        done = ReconcileResult(
            self.name, True, inserted=result.inserted, modified=result.modified,
            deleted=result.deleted, write_rpcs=batches,
            held=len(held_cookies) + len(held_groups) + len(held_meters),
            desired=len(want.flows) + len(want.groups) + len(want.meters),
            seconds=round(time.monotonic() - start, 4))
        if done.writes:
            log.info("openflow %s: +%d ~%d -%d", self.name, done.inserted, done.modified,
                     done.deleted)
        return done

    async def _read_flows(self, table: int = ofp.OFPTT_ALL) -> list[Any]:
        conn = self.connection
        if conn is None or conn.closed.is_set():
            raise OpenFlowError(f"{self.name}: not connected")
        flows: list[Any] = await conn.request(parser.OFPFlowStatsRequest(
            conn.datapath, table_id=table, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY))
        return flows


def _order(spec: FlowSpec) -> tuple[int, int]:
    """Later tables first: a classify flow never sends packets into an empty table."""
    return (-spec.table, spec.priority)


@dataclass
class _Tally:
    """The counts of a reconcile while it diffs."""

    inserted: int = 0
    modified: int = 0
    deleted: int = 0


def _diff(held: dict[int, Any], wanted: dict[int, Any], result: _Tally,
          mod: Callable[[Any, int], Any], delete: Callable[[Any], Any], add_cmd: int,
          modify_cmd: int) -> tuple[list[Any], list[Any]]:
    """Writes (add or modify) and deletes that turn `held` into `wanted`, counted in result."""
    writes, deletes = [], []
    for key, spec in wanted.items():
        if key not in held:
            writes.append(mod(spec, add_cmd))
            result.inserted += 1
        elif held[key] != spec:
            writes.append(mod(spec, modify_cmd))
            result.modified += 1
    for key in held.keys() - wanted.keys():
        deletes.append(delete(key))
        result.deleted += 1
    return writes, deletes
