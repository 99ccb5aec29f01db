"""Prefix affinity on OpenFlow edges: the controller's entries translated into flows,
select.p4's load bound decided at the controller from the reports, expiry, and churn."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tests.unit.openflow.test_translate import FABRIC, POLICY
from tokenfabric.beacon import LOAD_FULL
from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.drivers import openflow_context
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.controller.model import AffinityPolicy, BackendState
from tokenfabric.controller.openflow import messages
from tokenfabric.controller.openflow.affinity import pair_bests, within_bound
from tokenfabric.controller.openflow.connection import _Datapath
from tokenfabric.controller.openflow.flows import (
    AFFINITY_PRIORITY,
    OVERFLOW_PRIORITY,
    PIN,
    SELECT,
    STEER,
    STEER_FALLBACK_PRIORITY,
    STEER_OPEN_PRIORITY,
    translate,
)
from tokenfabric.controller.openflow.switch import OpenFlowSwitch
from tokenfabric.controller.policy.schema import parse_policy
from tokenfabric.controller.routing import load_score
from tokenfabric.p4names import NO_BACKEND

B1_MAC, B2_MAC = "02:00:00:00:00:11", "02:00:00:00:00:12"
BOUND = 125  # the default 1.25
CONN_COST = LOAD_FULL // 10  # capacity 10: the service's default conn_cost


@pytest.fixture
def model():
    m = parse_fabric(FABRIC)
    m.policy = parse_policy(POLICY, "policy.yaml", model=m)
    m.policy.service_affinity["svc"] = AffinityPolicy(enabled=True)
    return m


def of_state(model, over=frozenset()):
    ctx = openflow_context(model, "s1")
    return translate(compile_model(model)["s1"], dataclasses.replace(ctx, over_budget=over))


def load(model, backend: str, running: int, waiting: int = 0) -> None:
    model.backends[backend].load.running = running
    model.backends[backend].load.waiting = waiting


def steer_flows(st):
    return sorted((f for f in st.flows.values() if f.table == STEER),
                  key=lambda f: -f.priority)


def test_an_entry_jumps_to_a_per_backend_flow_that_steers_like_a_bucket(model):
    before = of_state(model)
    model.affinity.learn("s1", "svc", "10.0.1.7", "b2", 0, 60)
    after = of_state(model)
    assert set(before.flows.items()) < set(after.flows.items())  # nothing else moved
    assert after.groups == before.groups
    (client,) = [f for f in after.flows.values()
                 if f.table == SELECT and f.priority == AFFINITY_PRIORITY]
    assert client.table == SELECT and client.goto == STEER
    assert ("ipv4_src", "10.0.1.7") in client.match and ("tcp_dst", 8000) in client.match
    assert client.actions == (("set_field", "reg1", BOUND << 16 | 2),)
    assert OVERFLOW_PRIORITY > AFFINITY_PRIORITY > 100  # an over-budget tenant overflows
    open_, fallback = steer_flows(after)
    assert open_.priority == STEER_OPEN_PRIORITY and ("reg1", BOUND << 16 | 2) in open_.match
    assert open_.actions == (("set_field", "eth_dst", B2_MAC), ("set_field", "reg0", 4),
                             ("resubmit", PIN))  # PIN learns the pin: the connection stays
    assert fallback.priority == STEER_FALLBACK_PRIORITY and fallback.group == 1
    assert after.steering == {(1, 2, BOUND): True} and after.affinity_entries == 1
    assert not [n for n in after.notes if "affinity" in n]


def test_every_affinity_spec_serializes():
    m = parse_fabric(FABRIC)
    m.policy = parse_policy(POLICY, "policy.yaml", model=m)
    m.policy.service_affinity["svc"] = AffinityPolicy(enabled=True)
    m.affinity.learn("s1", "svc", "10.0.1.7", "b2", 0, 60)
    dp = _Datapath()
    for spec in of_state(m).flows.values():
        if spec.table in (SELECT, STEER):
            msg = messages.flow_add(dp, spec)
            msg.serialize()
            assert len(msg.buf) > 0


def test_the_bound_is_select_p4s_rule_on_the_reports(model):
    """score x 100 <= best_pair x 125 + conn_cost x 100, scores from the reports."""
    model.affinity.learn("s1", "svc", "10.0.1.7", "b2", 0, 60)
    load(model, "b1", 1)  # 100
    load(model, "b2", 2)  # 200: 20,000 <= 100 x 125 + 10,000
    assert of_state(model).steering == {(1, 2, BOUND): True}
    load(model, "b2", 3)  # 300: 30,000 > 22,500 -> over the bound
    st = of_state(model)
    assert st.steering == {(1, 2, BOUND): False}
    (fallback,) = steer_flows(st)  # the client's flow stays; STEER sends it to the group
    assert fallback.group == 1
    assert [f for f in st.flows.values() if f.table == SELECT and f.priority == AFFINITY_PRIORITY]
    load(model, "b1", 0)
    load(model, "b2", 1)  # an idle pool still honours one connection's cost
    assert of_state(model).steering == {(1, 2, BOUND): True}
    load(model, "b2", 10, waiting=5)
    assert load_score(model.backends["b2"]) == 1500
    assert of_state(model).steering == {(1, 2, BOUND): False}


def test_a_tenant_bound_gets_its_own_key(model):
    model.policy.tenants["acme"].affinity = AffinityPolicy(enabled=True, bound=3.0)
    model.affinity.learn("s1", "svc", "10.0.1.7", "b2", 0, 60)  # acme: bound 3
    model.affinity.learn("s1", "svc", "10.0.1.200", "b2", 0, 60)  # other: the service's
    load(model, "b1", 1)
    load(model, "b2", 3)  # 30,000 <= 100 x 300 + 10,000, not <= 100 x 125 + 10,000
    assert of_state(model).steering == {(1, 2, 300): True, (1, 2, BOUND): False}


def test_the_majority_of_pairs_decides():
    scores = {1: 0, 2: 100, 3: 900, 4: 1000}
    pairs = [(a, b) for a in scores for b in scores if a != b]
    bests = pair_bests(pairs, scores)
    assert bests == sorted([0] * 6 + [100] * 4 + [900] * 2)
    # backend 4 at 1000 against bests {0:6, 100:4, 900:2}: holds for 2 of 12 pairs
    assert not within_bound(1000, bests, 125, 100)
    # 225 x 100 <= 100 x 125 + 100 x 100: holds for the 6 pairs whose best is 100 or 900,
    # half of them; at 226 only for the 2 whose best is 900
    assert within_bound(225, bests, 125, 100)
    assert not within_bound(226, bests, 125, 100)
    assert pair_bests([(3, NO_BACKEND)], scores) == [900]
    assert within_bound(5000, [], 125, 100)  # no pairs: nothing to compare with


def test_expired_drained_and_withdrawn_entries_leave_no_flow(model):
    model.affinity.learn("s1", "svc", "10.0.1.7", "b2", 0, 60)
    model.affinity.learn("s1", "svc", "10.0.1.8", "b1", 30, 60)
    assert of_state(model).affinity_entries == 2
    model.affinity.sweep(61)  # the first expired
    st = of_state(model)
    assert st.affinity_entries == 1 and list(st.steering) == [(1, 1, BOUND)]
    assert not [f for f in st.flows.values() if ("ipv4_src", "10.0.1.7") in f.match]
    model.backends["b1"].state = BackendState.DRAINING  # the compile drops it
    st = of_state(model)
    assert st.affinity_entries == 0 and not steer_flows(st)
    model.backends["b1"].state = BackendState.ACTIVE
    model.affinity.withdraw("svc", "10.0.1.8", "b1")
    assert of_state(model).affinity_entries == 0


def test_a_bound_crossing_moves_one_flow_whatever_the_number_of_clients(model):
    for i in range(1, 101):
        model.affinity.learn("s1", "svc", f"10.0.1.{i}", "b2", 0, 60)
    load(model, "b1", 1)
    under = of_state(model)
    load(model, "b2", 9)
    over = of_state(model)
    changed = set(under.flows.items()) ^ set(over.flows.items())
    assert under.affinity_entries == over.affinity_entries == 100
    assert [spec.table for _, spec in changed] == [STEER]  # the one open flow went


def test_recheck_reconciles_only_on_a_flip_and_at_most_once_a_second(model):
    """The driver without a session: it translates but writes nothing ("disconnected");
    the counters show what a connected one would have reconciled."""
    model.affinity.learn("s1", "svc", "10.0.1.7", "b2", 0, 60)
    sw = OpenFlowSwitch("s1", 66, 1, context=lambda: openflow_context(model, "s1"),
                        load_recheck_min_s=0.2)

    async def run() -> None:
        assert not await sw.recheck_load_bound()  # nothing applied yet
        await sw.apply(compile_model(model)["s1"])
        assert sw.status()["affinity"]["open"] == [[1, 2, BOUND]]
        load(model, "b1", 1)
        load(model, "b2", 2)  # still within
        await sw.recheck_load_bound()
        assert sw.stats.load_reconciles == 0 and sw.stats.load_rechecks == 1
        load(model, "b2", 9)  # over: a flip
        await sw.recheck_load_bound()
        assert sw.stats.load_reconciles == 1 and sw.stats.steer_flips == 1
        assert sw.status()["affinity"]["over_bound"] == [[1, 2, BOUND]]
        load(model, "b2", 0)  # back within at once: held until the interval passed
        await sw.recheck_load_bound()
        assert sw.stats.load_reconciles == 1
        await asyncio.sleep(0.25)
        await sw.recheck_load_bound()
        assert sw.stats.load_reconciles == 2 and sw.stats.steer_flips == 2
        assert sw.status()["affinity"]["open"] == [[1, 2, BOUND]]

    asyncio.run(run())
