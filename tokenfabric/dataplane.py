"""The names and numbers of token_router.p4 that the controller and the tests share.

docs/dataplane.md explains each table, action, counter and register; this module
holds what code needs as values: counter indexes, modes, sizes, colours.
P4Runtime names are the P4Info names (p4src/build/token_router.p4info.txtpb).
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path

P4SRC = Path(__file__).resolve().parent.parent / "p4src"
BUILD = P4SRC / "build"
TOKEN_ROUTER_JSON = BUILD / "token_router.json"
TOKEN_ROUTER_P4INFO = BUILD / "token_router.p4info.txtpb"
FORWARD_JSON = BUILD / "forward.json"
FORWARD_P4INFO = BUILD / "forward.p4info.txtpb"

MAX_TENANTS = 4096
MAX_BACKENDS = 1024
MAX_SERVICES = 256
CONN_SLOTS = 65536
NUM_CLASSES = 8
NO_BACKEND = 0xFFFF
SELECTOR_MAX_MEMBERS = 4096
MAX_PAIR_SLOTS = 256  # pair_mask is 8 bits: pair_mask + 1 slots per service


class Mode(IntEnum):
    """`mode` of set_service."""

    HASH = 0
    P2C = 1


class Color(IntEnum):
    """`color` key of meter_policy (v1model meter colours)."""

    GREEN = 0
    YELLOW = 1
    RED = 2


class DropReason(IntEnum):
    """Index of the `drops` counter."""

    TRUNCATED = 1
    BAD_IPV4_VERSION = 2
    BAD_IPV4_IHL = 3
    BAD_TCP_OFFSET = 4
    BAD_BEACON_VERSION = 5
    BAD_BEACON_TYPE = 6
    BEACON_UNAUTHORIZED = 7
    BEACON_BAD_ID = 8
    NOT_IPV4 = 9
    NO_ROUTE = 10
    TTL_EXPIRED = 11
    UNKNOWN_BACKEND = 12
    NO_BACKEND = 13
    METER_RED = 14
    PARSER_OTHER = 15
    BAD_IPV4_CHECKSUM = 16


class Event(IntEnum):
    """Index of the `events` counter."""

    PIN_NEW = 0
    PIN_HIT = 1
    PIN_COLLISION = 2
    PIN_MISS = 3
    PIN_CLEARED = 4
    BEACON_LOAD = 5
    BEACON_USAGE = 6
    SELECT_FALLBACK = 7
    METER_YELLOW = 8
    METER_RED = 9
    OVERFLOW = 10


# Tables, in pipeline order, with the actions each accepts.
TABLES: dict[str, tuple[str, ...]] = {
    "tenant_by_src": ("set_tenant", "set_tenant_trusting_dscp"),
    "tenant_by_dst": ("set_tenant", "set_tenant_trusting_dscp"),
    "dscp_class": ("set_class",),
    "roce_class": ("set_class",),
    "tunnel_term": ("decap_to_backend",),
    "vip": ("set_vip",),
    "service": ("set_service",),
    "beacon_source": ("accept_beacon",),
    "tenant_contract": ("set_contract",),
    "service_pool": ("set_pool_backend",),  # via action profile backend_selector
    "p2c_pairs": ("set_candidates",),
    "backend": ("deliver_local", "deliver_ipip"),
    "ipv4_route": ("route",),
    "class_qos": ("set_class_qos",),
    "meter_policy": ("color_remark", "color_drop"),
    "ecn_policy": ("set_ecn_threshold",),
}
ACTION_PROFILE = "backend_selector"
METER = "tenant_meter"
COUNTERS = ("tenant_admitted", "tenant_overflow", "tenant_traffic",
            "backend_conns", "backend_traffic", "class_traffic", "drops", "events",
            "ecn_marked")

