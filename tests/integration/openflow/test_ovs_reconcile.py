"""Reconcile on a real OVS: after a controller restart, a tampered switch, or an
ovs-vswitchd restart, the driver reads flows, groups and meters back and writes only
the difference (counted in flow-mods, group-mods and meter-mods)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.integration.openflow.conftest import DPID, state_of, wait_connected
from tokenfabric.controller.drivers import openflow_context
from tokenfabric.controller.openflow.flows import translate
from tokenfabric.controller.openflow.server import OpenFlowSouthbound

pytestmark = [pytest.mark.ovs, pytest.mark.timeout(180)]


async def _fresh_session(sw, sessions_before: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while sw.stats.sessions <= sessions_before or sw.role.value == "disconnected":
        if time.monotonic() > deadline:
            raise AssertionError(f"{sw.name}: no new session within {timeout} s")
        await asyncio.sleep(0.1)
    await sw.wait_settled(timeout)
    while sw.stats.last is None or sw.stats.reconciles == 0:
        await asyncio.sleep(0.05)


async def test_controller_restart_writes_nothing(lab, southbound):
    """A second controller process (a new listener and switch object, same desired state)
    finds everything in place: zero writes. Learned pins are left alone."""
    sw = southbound["s1"]
    await wait_connected(sw)
    first = await sw.apply(state_of(southbound.model))
    total = len(translate(state_of(southbound.model),
                          openflow_context(southbound.model, "s1")).flows)
    assert first.inserted >= total  # flows + group + meter
    await southbound.stop()

    again = OpenFlowSouthbound(lab.listen)
    sw2 = again.add_switch("s1", DPID, context=lambda: openflow_context(southbound.model, "s1"))
    await sw2.apply(state_of(southbound.model))  # desired before the switch connects
    await again.start()
    try:
        await _fresh_session(sw2, 0)
        last = sw2.stats.last
        assert last.applied and last.writes == 0, last
        assert sw2.stats.updates_written == 0
        assert sw2.status()["last_reconcile"]["applied"] is True
    finally:
        await again.stop()


async def test_tampered_switch_gets_only_the_difference(lab, southbound):
    """Delete one of our flows, add a stray one and change the group behind the
    controller's back: the next reconcile writes exactly those three things back."""
    sw = await _connected(southbound)
    routes = [line for line in lab.ovs.dump_flows(lab.bridge).splitlines() if "table=2" in line
              and "nw_dst=10.0.0.11" in line]
    assert len(routes) == 1
    lab.ovs.ofctl("--strict", "del-flows", lab.bridge, "table=2,priority=33,ip,nw_dst=10.0.0.11")
    lab.ovs.ofctl("add-flow", lab.bridge, "table=2,priority=7,ip,nw_dst=192.0.2.1,actions=drop")
    lab.ovs.ofctl("mod-group", lab.bridge,
                  "group_id=1,type=select,bucket=actions=set_field:02:00:00:00:00:11->eth_dst,"
                  "output:3")
    before = (sw.stats.flow_mods, sw.stats.group_mods, sw.stats.meter_mods)
    result = await sw.reconcile()
    assert (result.inserted, result.modified, result.deleted) == (1, 1, 1), result
    after = (sw.stats.flow_mods, sw.stats.group_mods, sw.stats.meter_mods)
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (2, 1, 0)
    flows = lab.ovs.dump_flows(lab.bridge)
    assert "nw_dst=192.0.2.1" not in flows and "nw_dst=10.0.0.11 actions" in flows
    assert "resubmit(,3)" in lab.ovs.ofctl("dump-groups", lab.bridge)
    assert (await sw.reconcile()).writes == 0


async def test_ovs_restart_rewrites_what_was_lost(lab, southbound):
    """ovs-vswitchd restarts empty; the bridge reconnects and gets every flow, the group
    and the meter back (and nothing more)."""
    sw = await _connected(southbound)
    want = translate(state_of(southbound.model), openflow_context(southbound.model, "s1"))
    sessions = sw.stats.sessions
    written = sw.stats.updates_written
    await asyncio.to_thread(lab.ovs.restart_vswitchd)
    await _fresh_session(sw, sessions)
    last = sw.stats.last
    assert last.applied and last.modified == 0 and last.deleted == 0
    assert last.inserted == len(want.flows) + len(want.groups) + len(want.meters)
    assert sw.stats.updates_written - written == last.inserted
    assert "group:1" in lab.ovs.dump_flows(lab.bridge)


async def _connected(southbound):
    sw = southbound["s1"]
    await wait_connected(sw)
    assert (await sw.apply(state_of(southbound.model))).applied
    return sw
