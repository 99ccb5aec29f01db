import json
from pathlib import Path

import pytest

from tokenfabric import beacon
from tokenfabric.beacon import BeaconError, BeaconFlags, LoadBeacon, UsageBeacon

GOLDEN = json.loads((Path(__file__).parent.parent / "data" / "beacons.json").read_text())


@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_golden_bytes_encode_and_decode(case):
    cls = {"LoadBeacon": LoadBeacon, "UsageBeacon": UsageBeacon}[case["type"]]
    fields = dict(case["fields"])
    if cls is LoadBeacon:
        fields["flags"] = BeaconFlags(fields["flags"])
    message = cls(**fields)
    assert message.pack().hex() == case["hex"]
    assert beacon.unpack(bytes.fromhex(case["hex"])) == message


def test_layout_is_big_endian_with_version_first():
    raw = LoadBeacon(backend_id=0x0102, load=0x0A0B0C0D, running=5, waiting=6, seq=7).pack()
    assert raw == bytes([1, 1, 0, 0, 1, 2, 0, 7, 0x0A, 0x0B, 0x0C, 0x0D, 0, 5, 0, 6])


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x01", "truncated"),
    (bytes([2, 1, 0, 0, 0, 1, 0, 0]) + bytes(8), "version 2"),
    (bytes([1, 9, 0, 0, 0, 1, 0, 0]) + bytes(8), "type 9"),
    (bytes([1, 2, 0, 0, 0, 1, 0, 0]) + bytes(4), "truncated USAGE"),
])
def test_malformed_beacons_are_rejected(raw, message):
    with pytest.raises(BeaconError, match=message):
        beacon.unpack(raw)


def test_out_of_range_fields_are_rejected():
    with pytest.raises(BeaconError, match="backend_id"):
        LoadBeacon(backend_id=70000, load=1).pack()
    with pytest.raises(BeaconError, match="prompt_tokens"):
        UsageBeacon(backend_id=1, tenant_id=1, prompt_tokens=-1, completion_tokens=0).pack()


def test_counts_saturate_instead_of_wrapping():
    raw = LoadBeacon(backend_id=1, load=5, running=100_000, waiting=70_000).pack()
    decoded = beacon.unpack(raw)
    assert (decoded.running, decoded.waiting) == (0xFFFF, 0xFFFF)
