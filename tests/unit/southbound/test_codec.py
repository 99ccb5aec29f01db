"""Entities <-> P4Runtime protobuf through the P4Info of tests/.../data/mini.p4."""

from __future__ import annotations

import pytest

from tests.integration.southbound.helpers import ip, mini_pipeline
from tokenfabric.controller.entries import (
    Action,
    Exact,
    GroupRef,
    Lpm,
    MemberRef,
    MeterConfig,
    ProfileGroup,
    ProfileMember,
    Range,
    TableEntry,
    Ternary,
)
from tokenfabric.controller.southbound import Codec, TranslationError, decode_int, encode_int


@pytest.fixture(scope="module")
def codec():
    return Codec(mini_pipeline().index)


@pytest.mark.parametrize(("value", "width", "expected"), [
    (0, 9, b"\x00"), (1, 9, b"\x01"), (255, 9, b"\xff"), (256, 9, b"\x01\x00"),
    (511, 9, b"\x01\xff"), (0x0A000001, 32, b"\x0a\x00\x00\x01"), (5, 48, b"\x05"),
])
def test_canonical_bytestrings(value, width, expected):
    assert encode_int(value, width) == expected
    assert decode_int(expected) == value


@pytest.mark.parametrize(("value", "width"), [(512, 9), (-1, 8), (2**48, 48)])
def test_values_that_do_not_fit_are_refused(value, width):
    with pytest.raises(TranslationError, match="does not fit|expected an int"):
        encode_int(value, width)


def test_every_kind_round_trips(codec):
    entities = [
        TableEntry.of("classify", {"hdr.ipv4.src_addr": Lpm(ip("10.1.0.0"), 16)},
                      Action.of("set_tenant", tenant=3)),
        TableEntry.of("qos", {"meta.tenant": Ternary(3, 0xFF), "meta.l4_port": Range(80, 90),
                              "hdr.ipv4.protocol": Exact(6)},
                      Action.of("set_dscp", dscp=46), priority=5),
        TableEntry.of("select_backend", {"hdr.ipv4.dst_addr": Exact(ip("10.0.0.100"))},
                      GroupRef(4)),
        TableEntry.of("select_backend", {"hdr.ipv4.dst_addr": Exact(ip("10.0.0.101"))},
                      MemberRef(2)),
        ProfileMember("backend_selector", 2, Action.of("forward", port=3, dst_mac=0xAABB)),
        ProfileGroup("backend_selector", 4, ((2, 3), (1, 1)), max_size=8),
        MeterConfig("tenant_meter", 4095, cir=1000, cburst=100, pir=2000, pburst=200),
    ]
    for entity in entities:
        canonical = codec.normalize(entity)
        assert codec.decode(codec.encode(canonical)) == canonical


def test_short_names_become_full_names_and_members_sorted(codec):
    group = codec.normalize(ProfileGroup("backend_selector", 4, ((9, 1), (2, 3))))
    assert group == ProfileGroup("MiniIngress.backend_selector", 4, ((2, 3), (9, 1)))
    entry = codec.normalize(TableEntry.of("MiniIngress.routes",
                                          {"hdr.ipv4.dst_addr": Lpm(ip("10.0.0.0"), 8)},
                                          Action.of("MiniIngress.route", port=1)))
    assert entry.table == "MiniIngress.routes" and entry.action.name == "MiniIngress.route"


def test_canonical_form_of_matches(codec):
    entry = codec.normalize(TableEntry.of(
        "qos", {"meta.tenant": Ternary(0x1234, 0xFF00), "meta.l4_port": Range(0, 0xFFFF),
                "hdr.ipv4.protocol": Exact(17)}, Action.of("set_dscp", dscp=1), priority=1))
    # value masked, full range left out (a don't-care), optional kept
    assert dict(entry.match) == {"meta.tenant": Ternary(0x1200, 0xFF00),
                                 "hdr.ipv4.protocol": Exact(17)}
    pb = codec.encode(entry).table_entry
    assert sorted(m.WhichOneof("field_match_type") for m in pb.match) == ["optional", "ternary"]
    lpm = codec.normalize(TableEntry.of("classify", {"hdr.ipv4.src_addr": Lpm(ip("10.1.2.3"),
                                                                              16)},
                                        Action.of("drop")))
    assert lpm.match == (("hdr.ipv4.src_addr", Lpm(ip("10.1.0.0"), 16)),)
    assert codec.encode(lpm).table_entry.match[0].lpm.value == b"\x0a\x01\x00\x00"
    default_route = codec.normalize(TableEntry.of("routes", {"hdr.ipv4.dst_addr": Lpm(0, 0)},
                                                  Action.of("drop")))
    assert default_route.match == ()  # /0 is a don't-care, left out on the wire
    wildcard = codec.normalize(TableEntry.of("qos", {"meta.tenant": Ternary(5, 0)},
                                             Action.of("NoAction"), priority=1))
    assert wildcard.match == ()


@pytest.mark.parametrize(("entity", "message"), [
    (TableEntry.of("nosuch", {}, Action.of("drop")), "unknown table 'nosuch'"),
    (TableEntry.of("routes", {"hdr.ipv4.src_addr": Lpm(0, 8)}, Action.of("drop")),
     "no match field 'hdr.ipv4.src_addr'.*hdr.ipv4.dst_addr"),
    (TableEntry.of("routes", {"hdr.ipv4.dst_addr": Exact(1)}, Action.of("drop")),
     "is lpm"),
    (TableEntry.of("routes", {"hdr.ipv4.dst_addr": Lpm(0, 33)}, Action.of("drop")),
     "prefix length 33"),
    (TableEntry.of("select_backend", {}, GroupRef(1)), "exact match field .* missing"),
    (TableEntry.of("qos", {"meta.tenant": Ternary(1, 1)}, Action.of("NoAction")),
     "needs a priority"),
    (TableEntry.of("routes", {"hdr.ipv4.dst_addr": Lpm(0, 8)}, Action.of("drop"), 3),
     "takes no priority"),
    (TableEntry.of("routes", {"hdr.ipv4.dst_addr": Lpm(0, 8)}, Action.of("set_dscp", dscp=1)),
     "not an action of table"),
    (TableEntry.of("routes", {"hdr.ipv4.dst_addr": Lpm(0, 8)}, Action.of("route")),
     r"takes parameters \['port'\]"),
    (TableEntry.of("routes", {"hdr.ipv4.dst_addr": Lpm(0, 8)}, Action.of("route", port=512)),
     "param port: 512 does not fit in 9 bits"),
    (TableEntry.of("routes", {"hdr.ipv4.dst_addr": Lpm(0, 8)}, GroupRef(1)),
     "has no action profile"),
    (TableEntry.of("select_backend", {"hdr.ipv4.dst_addr": Exact(1)}, Action.of("drop")),
     "use GroupRef or MemberRef"),
    (TableEntry.of("qos", {"meta.l4_port": Range(9, 3)}, Action.of("NoAction"), 1),
     "range low 9 > high 3"),
    (ProfileGroup("backend_selector", 1, ((1, 1), (1, 2))), "lists a member twice"),
    (ProfileGroup("backend_selector", 1, ((1, 0),)), "weight must be >= 1"),
    (ProfileMember("backend_selector", 0, Action.of("drop")), "member_id must be"),
    (MeterConfig("tenant_meter", 4096, 1, 1, 1, 1), "index 4096 not in 0..4095"),
    (MeterConfig("tenant_meter", 1, 10, 1, 5, 1), "pir 5 < cir 10"),
])
def test_bad_entities_are_named(codec, entity, message):
    with pytest.raises(TranslationError, match=message) as caught:
        codec.normalize(entity)
    assert "(in " in str(caught.value)  # the message names the offending entity


def test_a_file_that_is_not_a_p4info_is_named(tmp_path):
    from tokenfabric.controller.southbound import PipelineError, load_p4info

    bad = tmp_path / "broken.p4info.txtpb"
    bad.write_text("tables { preamble { id: nope } }\n")
    with pytest.raises(PipelineError, match="broken.p4info.txtpb: not a P4Info"):
        load_p4info(bad)
