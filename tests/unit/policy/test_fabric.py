"""The fabric file: examples load, and every class of error names file:line and field path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenfabric.controller.fabric import (
    add_backend,
    backend_from_host,
    load_fabric,
    next_backend_id,
    parse_fabric,
    remove_backend,
)
from tokenfabric.controller.model import SelectionMode
from tokenfabric.controller.policy.source import SpecError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

GOOD = """\
switches:
  s1: {address: "127.0.0.1:50051", device_id: 1, ports: [1, 2, 3]}
hosts:
  gpu1: {switch: s1, port: 1, address: 10.0.0.11, mac: "02:00:00:00:00:11"}
  rsp: {switch: s1, port: 2, address: 10.0.0.99, mac: "02:00:00:00:00:99"}
backends:
  b1: {host: gpu1, capacity: 4, models: [m]}
services:
  svc: {model: m, vip: 10.0.100.1, port: 8000, overflow: rsp}
"""


def errors(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_fabric(text)
    return info.value.errors


def test_examples_load():
    single = load_fabric(EXAMPLES / "fabric-single.yaml")
    assert single.services["llama"].pool == ["gpu1-llama", "gpu2-llama"]
    assert single.services["llama"].overflow.backend_id == 1023
    leaf = load_fabric(EXAMPLES / "fabric-leafspine.yaml")
    assert leaf.fabric.next_hop_port("leaf1", "leaf2") == 4
    assert leaf.fabric.next_hop_port("spine1", "leaf2") == 2
    assert leaf.services["llama"].pool == ["gpu1-llama", "gpu2-llama"]  # from the model


def test_defaults_and_derived_values():
    m = parse_fabric(GOOD)
    s = m.services["svc"]
    assert (s.service_id, s.mode, s.pool) == (1, SelectionMode.HASH, ["b1"])
    b = m.backends["b1"]
    assert (b.backend_id, b.address, b.mac, b.switch, b.port) == (
        1, "10.0.0.11", "02:00:00:00:00:11", "s1", 1)
    assert m.fabric.switches["s1"].mac == "02:54:46:00:00:01"


@pytest.mark.parametrize("old,new,want", [
    ('address: "127.0.0.1:50051"', 'address: "127.0.0.1"',
     "fabric.yaml:2: switches.s1.address: '127.0.0.1' is not host:port"),
    ("device_id: 1", "device_id: x",
     "fabric.yaml:2: switches.s1.device_id: must be an integer, got a string"),
    ("port: 1, address", "port: 9, address",
     "fabric.yaml:4: hosts.gpu1: switch 's1' has no port 9"),
    ("port: 2, address", "port: 1, address",
     "fabric.yaml:5: hosts.rsp: s1 port 1 is already used by host 'gpu1'"),
    ("switch: s1, port: 1", "switch: s2, port: 1",
     "fabric.yaml:4: hosts.gpu1: unknown switch 's2'"),
    ('mac: "02:00:00:00:00:11"', 'mac: "02:00:00:00:11"',
     "fabric.yaml:4: hosts.gpu1.mac: '02:00:00:00:11' is not a MAC address"),
    ("host: gpu1", "host: gpu9", "fabric.yaml:7: backends.b1: unknown host 'gpu9'"),
    ("capacity: 4", "capacity: 0", "fabric.yaml:7: backends.b1.capacity: must be in 1..65535"),
    ("overflow: rsp", "overflow: nobody",
     "fabric.yaml:9: services.svc.overflow: unknown host 'nobody'"),
    ("port: 8000,", "port: 8000, mode: round-robin,",
     "fabric.yaml:9: services.svc.mode: must be one of hash, p2c; got 'round-robin'"),
    ("vip: 10.0.100.1", "vip: 10.0.0.11",
     "fabric.yaml:9: services.svc: vip 10.0.0.11 is also a host's address"),
    ("port: 8000,", "port: 8000, p2c_slots: 12,",
     "fabric.yaml:9: services.svc.p2c_slots: must be a power of two, got 12"),
    ("port: 8000,", "port: 8000, colour: red,",
     "fabric.yaml:9: services.svc.colour: unknown key"),
])
def test_fabric_error_classes(old, new, want):
    assert old in GOOD
    errs = errors(GOOD.replace(old, new))
    assert len(errs) == 1 and errs[0].startswith(want), errs


def test_pool_reference_errors():
    errs = errors(GOOD.replace("overflow: rsp}", "overflow: rsp, pool: [b1, b7]}"))
    assert errs == ["fabric.yaml:9: services.svc.pool[1]: unknown backend 'b7'"]
    other = GOOD.replace("models: [m]", "models: [other]")
    errs = errors(other.replace("overflow: rsp}", "overflow: rsp, pool: [b1]}"))
    assert errs == ["fabric.yaml:9: services.svc.pool[0]: backend 'b1' does not serve model 'm'"]


def test_links_need_fabric_ips_and_real_ports():
    two = GOOD.replace("switches:\n", "switches:\n  s2: {address: \"127.0.0.1:50052\", "
                       "device_id: 2, ports: [1]}\n") + "links:\n  - [s1:3, s2:1]\n"
    errs = errors(two)
    assert any("switches.s1.fabric_ip is required" in e for e in errs), errs
    errs = errors(GOOD + "links:\n  - [s1:3, s1:2]\n")
    assert errs == ["fabric.yaml:11: links[0][1]: s1 port 2 is already used by host 'rsp'"]


def test_duplicate_ids():
    errs = errors(GOOD.replace("switches:\n", "switches:\n  s0: {address: \"a:1\", "
                               "device_id: 1}\n"))
    assert errs == ["fabric.yaml:3: switches.s1: device_id 1 is already used by switch 's0'"]


def test_runtime_registration_joins_pools_and_avoids_responder_ids():
    m = parse_fabric(GOOD)
    m.fabric.hosts["gpu2"] = m.fabric.hosts["gpu1"].__class__(
        "gpu2", "s1", 3, "10.0.0.12", "02:00:00:00:00:12")
    bid = next_backend_id(m)
    assert bid == 2
    b = backend_from_host(m.fabric, "b2", bid, "gpu2", 8, ["m"])
    add_backend(m, b)
    assert m.services["svc"].pool == ["b1", "b2"]
    with pytest.raises(ValueError, match="taken"):
        add_backend(m, backend_from_host(m.fabric, "b3", 1023, "gpu2", 8, ["m"]))
    remove_backend(m, "b1")
    assert m.services["svc"].pool == ["b2"]
