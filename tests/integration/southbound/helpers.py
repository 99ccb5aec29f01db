"""The test program (data/mini.p4) and desired states for it."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from p4.v1 import p4runtime_pb2

from tokenfabric.controller.entries import (
    Action,
    DesiredState,
    Exact,
    GroupRef,
    Lpm,
    MeterConfig,
    ProfileGroup,
    ProfileMember,
    Range,
    TableEntry,
    Ternary,
)
from tokenfabric.controller.southbound import Codec, Pipeline, load_p4info, pipeline_cookie

DATA = Path(__file__).parent / "data"
P4INFO = DATA / "mini.p4info.txtpb"
BMV2_JSON = DATA / "mini.json"


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def mini_pipeline(variant: bytes = b"") -> Pipeline:
    """The mini program; `variant` makes a different program (another cookie)."""
    p4info = load_p4info(P4INFO)
    device_config = (BMV2_JSON.read_bytes() if BMV2_JSON.exists()
                     else b'{"program": "mini.p4 (not compiled here)"}') + variant
    return Pipeline(p4info, device_config, pipeline_cookie(device_config, p4info))


def mini_state(tenants: int = 4, backends: int = 3, weights: tuple[int, ...] = (),
               dscp: int = 10) -> DesiredState:
    """Tenants classified by /24, a QoS rule and meter per tenant, one weighted VIP group."""
    state = DesiredState()
    for t in range(1, tenants + 1):
        state.add(TableEntry.of("classify", {"hdr.ipv4.src_addr": Lpm(ip(f"10.{t}.0.0"), 16)},
                                Action.of("set_tenant", tenant=t)))
        state.add(TableEntry.of("qos", {"meta.tenant": Ternary(t, 0xFFFF),
                                        "meta.l4_port": Range(8000, 8999)},
                                Action.of("set_dscp", dscp=dscp), priority=10))
        state.add(MeterConfig("tenant_meter", t, cir=125_000 * t, cburst=10_000,
                              pir=250_000 * t, pburst=20_000))
    members = []
    for b in range(1, backends + 1):
        state.add(ProfileMember("backend_selector", b,
                                Action.of("forward", port=b, dst_mac=0x02_00_00_00_00_00 + b)))
        members.append((b, weights[b - 1] if b <= len(weights) else 1))
    state.add(ProfileGroup("backend_selector", 1, tuple(members)))
    state.add(TableEntry.of("select_backend", {"hdr.ipv4.dst_addr": Exact(ip("10.0.0.100"))},
                            GroupRef(1)))
    state.add(TableEntry.of("routes", {"hdr.ipv4.dst_addr": Lpm(ip("192.168.0.0"), 16)},
                            Action.of("route", port=7)))
    return state


def normalized(state: DesiredState, pipeline: Pipeline) -> DesiredState:
    codec = Codec(pipeline.index)
    out = DesiredState()
    for entity in state.entities.values():
        out.add(codec.normalize(entity))
    return out


def held_on_fake(server, pipeline: Pipeline) -> DesiredState:  # noqa: ANN001
    """What a fake server stores, decoded independently of the client under test."""
    codec = Codec(pipeline.index)
    out = DesiredState()
    s = server.state
    pbs = [p4runtime_pb2.Entity(table_entry=e) for e in s.tables.values()]
    pbs += [p4runtime_pb2.Entity(action_profile_member=m) for m in s.members.values()]
    pbs += [p4runtime_pb2.Entity(action_profile_group=g) for g in s.groups.values()]
    for (meter_id, index), config in s.meters.items():
        pb = p4runtime_pb2.Entity()
        pb.meter_entry.meter_id = meter_id
        pb.meter_entry.index.index = index
        pb.meter_entry.config.CopyFrom(config)
        pbs.append(pb)
    for group in s.multicast.values():
        pb = p4runtime_pb2.Entity()
        pb.packet_replication_engine_entry.multicast_group_entry.CopyFrom(group)
        pbs.append(pb)
    for pb in pbs:
        entity = codec.decode(pb)
        if entity is not None:  # a meter cell without config
            out.add(entity)
    return out
