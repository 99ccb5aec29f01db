"""The beacon plane's compile: relay trees, which switch holds which backend, the service
edges, the multicast groups' codec, and two backends on one host in a multi-switch fabric."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.southbound.helpers import mini_pipeline
from tokenfabric.controller.beacon_plane import edge_switches, holders, listeners, relay_tree
from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.entries import Action, Exact, MulticastGroup, TableEntry
from tokenfabric.controller.fabric import load_fabric, parse_fabric
from tokenfabric.controller.policy.source import SpecError
from tokenfabric.controller.southbound import Codec, TranslationError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

# Clients on leaf1 and leaf3, backends on leaf2 (two on one host) and leaf4; two spines.
FABRIC = """\
switches:
  leaf1: {{address: "127.0.0.1:1", device_id: 1, ports: [1, 5, 6], fabric_ip: 10.255.0.1}}
  leaf2: {{address: "127.0.0.1:2", device_id: 2, ports: [1, 2, 5, 6], fabric_ip: 10.255.0.2}}
  leaf3: {{address: "127.0.0.1:3", device_id: 3, ports: [1, 5, 6], fabric_ip: 10.255.0.3}}
  leaf4: {{address: "127.0.0.1:4", device_id: 4, ports: [1, 5, 6], fabric_ip: 10.255.0.4}}
  spine1: {{address: "127.0.0.1:5", device_id: 5, ports: [1, 2, 3, 4], fabric_ip: 10.255.1.1}}
  spine2: {{address: "127.0.0.1:6", device_id: 6, ports: [1, 2, 3, 4], fabric_ip: 10.255.1.2}}
links:
  - [leaf1:5, spine1:1]
  - [leaf2:5, spine1:2]
  - [leaf3:5, spine1:3]
  - [leaf4:5, spine1:4]
  - [leaf1:6, spine2:1]
  - [leaf2:6, spine2:2]
  - [leaf3:6, spine2:3]
  - [leaf4:6, spine2:4]
hosts:
  c1: {{switch: leaf1, port: 1, address: 10.0.1.0, prefix_len: 24, mac: "02:00:00:00:01:01"}}
  c3: {{switch: leaf3, port: 1, address: 10.0.3.0, prefix_len: 24, mac: "02:00:00:00:03:01"}}
  gpu2: {{switch: leaf2, port: 1, address: 10.0.0.21, mac: "02:00:00:00:00:21"}}
  gpu4: {{switch: leaf4, port: 1, address: 10.0.0.41, mac: "02:00:00:00:00:41"}}
backends:
  llama2: {{id: 1, host: gpu2, models: [llama]}}
  qwen2: {{id: 2, host: gpu2, models: [qwen]}}
  llama4: {{id: 3, host: gpu4, models: [llama]}}
services:
  llama: {{model: llama, vip: 10.0.100.1, port: 8000, mode: p2c{llama_edges}}}
  qwen: {{model: qwen, vip: 10.0.100.2, port: 8000, mode: p2c}}
"""


def entries(state, table: str) -> list[TableEntry]:
    return sorted(e for e in state.entities.values()
                  if isinstance(e, TableEntry) and e.table == table)


def groups(state) -> list[MulticastGroup]:
    return sorted(e for e in state.entities.values() if isinstance(e, MulticastGroup))


def test_the_example_leafspine_relays_leaf2s_backends_to_leaf1_by_spine1():
    model = load_fabric(EXAMPLES / "fabric-leafspine.yaml")
    assert edge_switches(model) == ["leaf1"]
    gpu2 = model.backends["gpu2-llama"]
    tree = relay_tree(model, gpu2)
    assert {s: (h.in_port, h.out_ports) for s, h in tree.hops.items()} == {
        "leaf2": (1, (4,)), "spine1": (2, (1,)), "leaf1": (4, ())}
    assert holders(model, gpu2) == {"leaf1", "leaf2", "spine1"}
    assert holders(model, model.backends["gpu1-llama"]) == {"leaf1"}  # local to the edge
    states = compile_model(model)
    # Both backends of leaf2 leave by port 4: one group for both.
    assert groups(states["leaf2"]) == [MulticastGroup(1, ((4, 0),))]
    assert groups(states["leaf1"]) == []
    assert {dict(e.action.params)["group"] for e in entries(states["leaf2"], "beacon_source")
            if e.action.name == "relay_beacon"} == {1}
    relayed = TableEntry.of("beacon_source", {"backend_id": Exact(2), "ingress_port": Exact(4),
                                              "src_addr": Exact(0x0AFF0002)},
                            Action.of("accept_beacon"))
    assert relayed in entries(states["leaf1"], "beacon_source")
    # leaf1 hears every pool member now: it checks the beacon age (100 ms).
    service = entries(states["leaf1"], "service")[0]
    assert dict(service.action.params)["beacon_max_age_us"] == 100_000


def test_two_spines_one_tree_and_both_client_leaves_hear_every_backend():
    model = parse_fabric(FABRIC.format(llama_edges=""))
    assert edge_switches(model) == ["leaf1", "leaf3"]
    tree = relay_tree(model, model.backends["llama4"])
    # One spine carries the tree (ties broken by name), fanning out to both edges.
    assert {s: (h.in_port, h.out_ports) for s, h in tree.hops.items()} == {
        "leaf4": (1, (5,)), "spine1": (4, (1, 3)), "leaf1": (5, ()), "leaf3": (5, ())}
    states = compile_model(model)
    # Three backends' trees fan out the same way at spine1: one group.
    assert groups(states["spine1"]) == [MulticastGroup(1, ((1, 0), (3, 0)))]
    assert groups(states["spine2"]) == []
    # The relay rewrites the source to the root's fabric_ip, as every hop expects.
    root = [e for e in entries(states["leaf2"], "beacon_source")
            if dict(e.match)["backend_id"] == Exact(1)]
    assert root == [TableEntry.of("beacon_source", {
        "backend_id": Exact(1), "ingress_port": Exact(1), "src_addr": Exact(0x0A000015)},
        Action.of("relay_beacon", group=1, relay_src=0x0AFF0002))]
    assert groups(states["leaf2"]) == [MulticastGroup(1, ((5, 0),))]


def test_two_backends_on_one_host_share_one_tunnel_end():
    # Used to fail: "two different entities for ... tunnel_term".
    states = compile_model(parse_fabric(FABRIC.format(llama_edges="")))
    terms = entries(states["leaf2"], "tunnel_term")
    assert terms == [TableEntry.of("tunnel_term", {"dst_addr": Exact(0x0A000015)},
                                   Action.of("decap_to_backend", backend_id=1))]
    backends = entries(states["leaf2"], "backend")
    assert [dict(e.match)["backend_id"].value for e in backends] == [1, 2, 3]


def test_service_edges_limit_where_a_backend_is_heard():
    model = parse_fabric(FABRIC.format(llama_edges=", edges: [leaf1]"))
    assert model.services["llama"].edges == ["leaf1"]
    assert listeners(model, model.backends["llama4"]) == ["leaf1"]
    assert listeners(model, model.backends["qwen2"]) == ["leaf1", "leaf3"]  # qwen: every edge
    tree = relay_tree(model, model.backends["llama4"])
    assert set(tree.hops) == {"leaf4", "spine1", "leaf1"}
    states = compile_model(model)
    # leaf3 does not hear llama's backends: no age check there for llama (0), but for qwen.
    ages = {dict(e.action.params)["service_id"]: dict(e.action.params)["beacon_max_age_us"]
            for e in entries(states["leaf3"], "service")}
    assert ages == {1: 0, 2: 100_000}


def test_service_edges_must_name_switches():
    text = FABRIC.format(llama_edges=", edges: [leaf9, leaf1, leaf1]")
    with pytest.raises(SpecError) as info:
        parse_fabric(text)
    messages = " ".join(info.value.errors)
    assert "unknown switch 'leaf9'" in messages
    assert "switch 'leaf1' listed twice" in messages


def test_multicast_groups_round_trip_through_the_codec():
    codec = Codec(mini_pipeline().index)
    group = codec.normalize(MulticastGroup(7, ((3, 0), (1, 0))))
    assert group == MulticastGroup(7, ((1, 0), (3, 0)))
    pb = codec.encode(group)
    assert pb.packet_replication_engine_entry.multicast_group_entry.multicast_group_id == 7
    assert codec.decode(pb) == group
    for bad in (MulticastGroup(0, ()), MulticastGroup(70000, ()),
                MulticastGroup(1, ((1, 0), (1, 0))), MulticastGroup(1, ((-1, 0),))):
        with pytest.raises(TranslationError):
            codec.normalize(bad)
