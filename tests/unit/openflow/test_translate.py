"""The compiled state of a fabric translated into OpenFlow flows, groups and meters."""

from __future__ import annotations

import dataclasses

import pytest
from os_ken.ofproto import ofproto_v1_3 as ofp

from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.drivers import openflow_context
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.controller.model import BackendState, SelectionMode
from tokenfabric.controller.openflow import messages
from tokenfabric.controller.openflow.connection import _Datapath
from tokenfabric.controller.openflow.flows import (
    CLASSIFY,
    OVERFLOW_PRIORITY,
    PIN,
    ROUTE,
    SELECT,
    FlowSpec,
    kbits,
    translate,
)
from tokenfabric.controller.policy.schema import parse_policy

FABRIC = """
switches:
  s1: {driver: openflow, datapath_id: 66, device_id: 1, ports: [1, 3, 4, 5],
       mac: "02:00:00:00:01:00"}
hosts:
  clients: {switch: s1, port: 1, address: 10.0.1.0, prefix_len: 24, mac: "02:00:00:00:01:0a"}
  gpu1: {switch: s1, port: 3, address: 10.0.0.11, mac: "02:00:00:00:00:11"}
  gpu2: {switch: s1, port: 4, address: 10.0.0.12, mac: "02:00:00:00:00:12"}
  resp: {switch: s1, port: 5, address: 10.0.0.99, mac: "02:00:00:00:00:99"}
backends:
  b1: {id: 1, host: gpu1, capacity: 10, models: [m]}
  b2: {id: 2, host: gpu2, capacity: 10, models: [m]}
services:
  svc: {id: 1, model: m, vip: 10.0.100.1, port: 8000, pool: [b1, b2], overflow: resp,
        idle_timeout_s: 30}
"""

POLICY = """
contracts:
  gold:
    class: {service_class: low-latency-data, dscp: 18, priority_level: 20, queue: 5}
    tpm: 60000
    burst: 1000
    bandwidth: {cir: 20000, cbs: 3000, pir: 40000, pbs: 6000, exceed: remark,
                exceed_dscp: 10, violate: drop}
  plain:
    class: {service_class: standard, priority_level: 90}
    tpm: 6000
tenants:
  - {name: acme, id: 7, prefixes: [10.0.1.0/25], contract: gold}
  - {name: other, id: 8, prefixes: [10.0.1.128/25], contract: plain}
roce: {enabled: false}
"""


@pytest.fixture
def model():
    m = parse_fabric(FABRIC)
    m.policy = parse_policy(POLICY, "policy.yaml", model=m)
    return m


def of_state(model, over=frozenset()):
    ctx = openflow_context(model, "s1")
    return translate(compile_model(model)["s1"], dataclasses.replace(ctx, over_budget=over))


def flows(state, table):
    return [f for f in state.flows.values() if f.table == table]


def test_tenant_flows_carry_class_meter_and_tenant_id(model):
    st = of_state(model)
    acme = [f for f in flows(st, CLASSIFY) if ("ipv4_src", ("10.0.1.0", "255.255.255.128"))
            in f.match]
    assert len(acme) == 2  # all packets, and SYNs (the connection counter)
    for f in acme:
        assert f.meter == 7 and f.metadata == (7, 0xFFFF) and f.goto == SELECT
        assert ("set_field", "ip_dscp", 18) in f.actions and ("set_queue", 5) in f.actions
    syn = next(f for f in acme if any(k == "tcp_flags" for k, _ in f.match))
    assert syn.priority == max(f.priority for f in acme)
    other = [f for f in flows(st, CLASSIFY) if f.metadata == (8, 0xFFFF)]
    assert other and all(f.meter is None for f in other)  # no bandwidth profile: no meter
    replies = [f for f in flows(st, CLASSIFY) if any(k == "ipv4_dst" and v != "169.254.42.1"
                                                     for k, v in f.match)]
    assert {f.metadata for f in replies} == {(7, 0xFFFF), (8, 0xFFFF)}


def test_meter_drops_at_the_peak_rate_and_notes_the_missing_remark(model):
    st = of_state(model)
    assert st.meters[7].bands == ((kbits(40000), kbits(6000)),)
    assert kbits(40000) == 320 and kbits(6000) == 48
    assert any("remark" in n and "tenant 7" in n for n in st.notes)


def test_group_weights_follow_the_router(model):
    st = of_state(model)
    assert [(b.weight, b.port, b.backend_mac, b.pin) for b in st.groups[1].buckets] == [
        (1, 3, "02:00:00:00:00:11", True), (1, 4, "02:00:00:00:00:12", True)]
    model.backends["b1"].weight, model.backends["b2"].weight = 90, 30
    assert [b.weight for b in of_state(model).groups[1].buckets] == [3, 1]
    model.backends["b2"].state = BackendState.DRAINING
    assert [b.port for b in of_state(model).groups[1].buckets] == [3]


def test_p2c_service_is_a_weighted_group_too(model):
    model.services["svc"].mode = SelectionMode.P2C
    st = of_state(model)
    assert 1 in st.groups and len(st.groups[1].buckets) == 2


def test_pin_table_learns_with_the_service_idle_timeout(model):
    st = of_state(model)
    (pin,) = flows(st, PIN)
    assert ("learn_pin", 30) in pin.actions and ("output_reg0",) in pin.actions
    vip = [f for f in flows(st, SELECT) if f.group == 1]
    assert len(vip) == 1 and ("ipv4_dst", "10.0.100.1") in vip[0].match


def test_over_budget_tenant_gets_a_flow_to_the_responder(model):
    assert not [f for f in flows(of_state(model), SELECT) if f.priority == OVERFLOW_PRIORITY]
    st = of_state(model, frozenset({7}))
    (over,) = [f for f in flows(st, SELECT) if f.priority == OVERFLOW_PRIORITY]
    assert ("metadata", (7, 0xFFFF)) in over.match
    assert over.actions == (("set_field", "eth_dst", "02:00:00:00:00:99"),
                            ("set_field", "reg0", 5), ("resubmit", PIN))


def test_routes_and_beacon_drop(model):
    st = of_state(model)
    routes = {dict(f.match)["ipv4_dst"]: f for f in flows(st, ROUTE)}
    assert routes["10.0.0.11"].actions[-1] == ("output", 3)
    assert routes[("10.0.1.0", "255.255.255.0")].actions[1] == (
        "set_field", "eth_dst", "02:00:00:00:01:0a")
    beacon = next(f for f in flows(st, CLASSIFY) if ("udp_dst", 7420) in f.match)
    assert beacon.actions == () and beacon.goto is None  # dropped


def test_cookie_separates_identity_from_content():
    a = FlowSpec(2, 10, (("eth_type", 0x800),), actions=(("output", 1),))
    b = FlowSpec(2, 10, (("eth_type", 0x800),), actions=(("output", 2),))
    c = FlowSpec(2, 11, (("eth_type", 0x800),), actions=(("output", 1),))
    assert a.cookie() >> 32 == b.cookie() >> 32 and a.cookie() != b.cookie()
    assert a.cookie() >> 32 != c.cookie() >> 32
    assert a.cookie() == FlowSpec(2, 10, (("eth_type", 0x800),),
                                  actions=(("output", 1),)).cookie()


def test_every_spec_serializes_and_buckets_read_back(model):
    dp = _Datapath()
    st = of_state(model, frozenset({7}))
    for spec in st.flows.values():
        msg = messages.flow_add(dp, spec)
        msg.serialize()
        assert len(msg.buf) > 0
    for spec in st.groups.values():
        msg = messages.group_mod(dp, spec, ofp.OFPGC_ADD)
        msg.serialize()
        back = tuple(messages.bucket_of(b) for b in msg.buckets)
        assert back == spec.buckets
    for spec in st.meters.values():
        messages.meter_mod(dp, spec, ofp.OFPMC_ADD).serialize()


def test_remote_backend_is_reached_through_its_mac_over_the_link():
    fabric = """
switches:
  s1: {driver: openflow, datapath_id: 1, device_id: 1, ports: [1, 9], fabric_ip: 10.255.0.1}
  s2: {driver: openflow, datapath_id: 2, device_id: 2, ports: [1, 9], fabric_ip: 10.255.0.2}
links:
  - [s1:9, s2:9]
hosts:
  gpu1: {switch: s2, port: 1, address: 10.0.0.11, mac: "02:00:00:00:00:11"}
backends:
  b1: {id: 1, host: gpu1, models: [m]}
services:
  svc: {id: 1, model: m, vip: 10.0.100.1, port: 8000}
"""
    m = parse_fabric(fabric)
    st = translate(compile_model(m)["s1"], openflow_context(m, "s1"))
    assert [(b.port, b.backend_mac) for b in st.groups[1].buckets] == [(9, "02:00:00:00:00:11")]
    st2 = translate(compile_model(m)["s2"], openflow_context(m, "s2"))
    transit = [f for f in flows(st2, SELECT) if ("eth_dst", "02:00:00:00:00:11") in f.match]
    assert transit and transit[0].actions == (("output", 1),)
