"""The controller's affinity table: TTL, LRU on a full switch, tenant and edge lookups."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tokenfabric.controller.affinity import (
    TABLE_CAPACITY,
    AffinityTable,
    TenantLookup,
    edge_switches,
)
from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.entries import Action, DesiredState, TableEntry
from tokenfabric.controller.fabric import load_fabric
from tokenfabric.controller.model import AffinityPolicy, BackendState, Tenant
from tokenfabric.p4names import TABLE_SIZES, Tables

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def ip(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def test_capacity_is_the_switch_tables_size_at_most() -> None:
    assert AffinityTable().capacity == TABLE_CAPACITY == TABLE_SIZES[Tables.AFFINITY]
    with pytest.raises(ValueError, match="1..4096"):
        AffinityTable(capacity=TABLE_CAPACITY + 1)


def test_ttl_sweep_and_refresh() -> None:
    t = AffinityTable()
    t.learn("s1", "llama", "10.0.1.7", "gpu1", now=0, ttl_s=10)
    t.learn("s1", "llama", "10.0.1.8", "gpu1", now=5, ttl_s=10)
    assert t.sweep(9.9) == 0
    assert t.sweep(10) == 1 and [c for _, c, _ in t.entries("s1")] == ["10.0.1.8"]
    t.learn("s1", "llama", "10.0.1.8", "gpu2", now=12, ttl_s=10)  # refreshed, new backend
    assert t.sweep(20) == 0 and t.entries("s1")[0][2].backend == "gpu2"
    assert t.sweep(22) == 1 and len(t) == 0
    assert (t.stats["installed"], t.stats["refreshed"], t.stats["expired"]) == (2, 1, 2)


def test_a_full_switch_evicts_its_least_recently_reported_only() -> None:
    t = AffinityTable(capacity=2)
    t.learn("s1", "llama", "a", "gpu1", 0, 60)
    t.learn("s1", "llama", "b", "gpu1", 1, 60)
    t.learn("s2", "llama", "z", "gpu1", 2, 60)
    t.learn("s1", "llama", "a", "gpu1", 3, 60)  # a is now the most recent on s1
    assert t.learn("s1", "llama", "c", "gpu1", 4, 60) == 1
    assert [c for _, c, _ in t.entries("s1")] == ["a", "c"]
    assert [c for _, c, _ in t.entries("s2")] == ["z"]  # another switch's room is its own
    assert t.stats["evicted"] == 1


def test_tenant_lookup_is_longest_prefix() -> None:
    wide = Tenant("wide", 1, ["10.0.0.0/16"], "c")
    narrow = Tenant("narrow", 2, ["10.0.1.128/25", "192.168.0.0/24"], "c")
    lookup = TenantLookup({"wide": wide, "narrow": narrow})
    assert lookup.find(ip("10.0.1.200")) is narrow
    assert lookup.find(ip("10.0.1.7")) is wide
    assert lookup.find(ip("192.168.0.9")) is narrow
    assert lookup.find(ip("172.16.0.1")) is None


def test_the_edge_is_the_leaf_the_clients_prefix_hangs_on() -> None:
    model = load_fabric(EXAMPLES / "fabric-leafspine.yaml")
    assert edge_switches(model.fabric, ip("10.0.1.50")) == ["leaf1"]
    assert edge_switches(model.fabric, ip("172.16.0.1")) == []  # unknown on several switches
    single = load_fabric(EXAMPLES / "fabric-single.yaml")
    assert edge_switches(single.fabric, ip("172.16.0.1")) == ["s1"]


def test_compile_writes_the_fact_on_the_edge_only_while_the_backend_is_active() -> None:
    model = load_fabric(EXAMPLES / "fabric-leafspine.yaml")
    model.policy.service_affinity["llama"] = AffinityPolicy(enabled=True, bound=2.0)
    model.affinity.learn("leaf1", "llama", "10.0.1.50", "gpu2-llama", 0, 60)
    states = compile_model(model)
    assert affinity_params(states["leaf1"]) == [{"backend_id": 2, "bound_percent": 200}]
    assert all(affinity_params(states[sw]) == [] for sw in states if sw != "leaf1")
    model.backends["gpu2-llama"].state = BackendState.DRAINING
    assert affinity_params(compile_model(model)["leaf1"]) == []


def affinity_params(state: DesiredState) -> list[dict[str, int]]:
    return [dict(e.action.params) for e in state.entities.values()
            if isinstance(e, TableEntry) and e.table == Tables.AFFINITY
            and isinstance(e.action, Action)]
