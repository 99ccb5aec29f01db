"""The fabric beacon: how a host agent tells its edge switch about load and usage.

Beacons are UDP datagrams to the fabric address on port BEACON_PORT. The P4
parser (p4src/include/headers.p4) reads the same layout; tests/data/beacons.json
holds golden encodings that both the agent's and the dataplane's tests check.

All fields are big-endian.

    common header, 8 bytes
      version     u8   BEACON_VERSION; any other value is dropped and counted
      type        u8   1 = LOAD, 2 = USAGE
      flags       u8   bit 0 DOWN, bit 1 DRAINING (LOAD only; 0 in USAGE)
      reserved    u8   0
      backend_id  u16  the id the controller gave the backend at registration
      seq         u16  per-sender sequence number, wraps at 65536

    LOAD body, 8 bytes
      load        u32  lower is better: expected ms to a first token (agent.load_metric
                       delay) or LOAD_FULL x occupancy (occupancy); docs/agent.md
      running     u16  requests running (saturates at 65535)
      waiting     u16  requests waiting (saturates at 65535)

    USAGE body, 12 bytes
      tenant_id          u16
      reserved           u16  0
      prompt_tokens      u32
      completion_tokens  u32
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from tokenfabric import p4names
from tokenfabric.p4names import BEACON_PORT, BEACON_VERSION, BeaconFlags, BeaconType

# The wire's numbers are token_router's (p4names, generated from defines.p4).
__all__ = ["BEACON_PORT", "BEACON_VERSION", "FABRIC_ADDRESS", "LOAD_FULL", "U16_MAX", "U32_MAX",
           "occupancy_load", "BeaconError", "BeaconFlags", "BeaconType", "LoadBeacon",
           "UsageBeacon"]

FABRIC_ADDRESS = str(ipaddress.IPv4Address(p4names.FABRIC_ADDRESS))
LOAD_FULL = 1000

_COMMON = struct.Struct("!BBBBHH")
_LOAD = struct.Struct("!IHH")
_USAGE = struct.Struct("!HHII")
U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF


def occupancy_load(running: float, waiting: float, kv_cache_usage: float,
                   capacity: int) -> int:
    """The occupancy LOAD: LOAD_FULL x (max(running/capacity, kv) + waiting/capacity),
    clamped to the beacon's u32. The agent sends it (hostagent/load.py); the controller
    works it out from a report where a switch has no load registers (OpenFlow)."""
    cap = max(1, capacity)
    kv = min(max(kv_cache_usage, 0.0), 1.0)
    value = LOAD_FULL * (max(max(0.0, running) / cap, kv) + max(0.0, waiting) / cap)
    return min(int(round(value)), U32_MAX)


class BeaconError(ValueError):
    """Bytes that are not a beacon of this version."""


def _check(name: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise BeaconError(f"{name}={value} is outside 0..{limit}")


@dataclass(frozen=True)
class LoadBeacon:
    backend_id: int
    load: int
    running: int = 0
    waiting: int = 0
    flags: BeaconFlags = BeaconFlags.NONE
    seq: int = 0

    def pack(self) -> bytes:
        _check("backend_id", self.backend_id, U16_MAX)
        _check("seq", self.seq, U16_MAX)
        _check("load", self.load, U32_MAX)
        _check("flags", int(self.flags), 0xFF)
        return _COMMON.pack(BEACON_VERSION, BeaconType.LOAD, int(self.flags), 0,
                            self.backend_id, self.seq) + _LOAD.pack(
            self.load, min(self.running, U16_MAX), min(self.waiting, U16_MAX))


@dataclass(frozen=True)
class UsageBeacon:
    backend_id: int
    tenant_id: int
    prompt_tokens: int
    completion_tokens: int
    seq: int = 0

    def pack(self) -> bytes:
        _check("backend_id", self.backend_id, U16_MAX)
        _check("tenant_id", self.tenant_id, U16_MAX)
        _check("seq", self.seq, U16_MAX)
        _check("prompt_tokens", self.prompt_tokens, U32_MAX)
        _check("completion_tokens", self.completion_tokens, U32_MAX)
        return _COMMON.pack(BEACON_VERSION, BeaconType.USAGE, 0, 0,
                            self.backend_id, self.seq) + _USAGE.pack(
            self.tenant_id, 0, self.prompt_tokens, self.completion_tokens)


def unpack(data: bytes) -> LoadBeacon | UsageBeacon:
    """Decode one beacon; raises BeaconError for anything the switch would drop."""
    if len(data) < _COMMON.size:
        raise BeaconError(f"truncated: {len(data)} bytes, the header needs {_COMMON.size}")
    version, kind, flags, _, backend_id, seq = _COMMON.unpack_from(data)
    if version != BEACON_VERSION:
        raise BeaconError(f"unknown beacon version {version}")
    body = data[_COMMON.size:]
    if kind == BeaconType.LOAD:
        if len(body) < _LOAD.size:
            raise BeaconError("truncated LOAD body")
        load, running, waiting = _LOAD.unpack_from(body)
        return LoadBeacon(backend_id, load, running, waiting, BeaconFlags(flags), seq)
    if kind == BeaconType.USAGE:
        if len(body) < _USAGE.size:
            raise BeaconError("truncated USAGE body")
        tenant_id, _, prompt, completion = _USAGE.unpack_from(body)
        return UsageBeacon(backend_id, tenant_id, prompt, completion, seq)
    raise BeaconError(f"unknown beacon type {kind}")
