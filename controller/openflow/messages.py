"""Specs (controller/openflow/flows.py) to os-ken OpenFlow 1.3 messages, and back.

`flow_mod`, `group_mod`, `meter_mod` build the writes; `bucket_of` and
`meter_of` read a switch's group and meter descriptions back into specs, so
that the reconciler compares like with like (flows are compared by cookie).
"""

from __future__ import annotations

from typing import Any

from os_ken.ofproto import nicira_ext
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from tokenfabric.controller.openflow.flows import (
    LEARNED_COOKIE,
    PIN,
    PIN_PRIORITY,
    SELECT,
    Bucket,
    FlowSpec,
    GroupSpec,
    MeterSpec,
)

PIN_PORT_REG = "reg0"  # holds the output port while `learn` copies it into the pin


def learn_pin(idle_s: int) -> Any:
    """Learn a 5-tuple flow in table SELECT that rewrites to the eth_dst and outputs on
    the port (reg0) this packet carries now: the connection's pin."""
    specs = [
        parser.NXFlowSpecMatch(src=0x0800, dst=("eth_type_nxm", 0), n_bits=16),
        parser.NXFlowSpecMatch(src=6, dst=("ip_proto_nxm", 0), n_bits=8),
        parser.NXFlowSpecMatch(src=("ipv4_src_nxm", 0), dst=("ipv4_src_nxm", 0), n_bits=32),
        parser.NXFlowSpecMatch(src=("ipv4_dst_nxm", 0), dst=("ipv4_dst_nxm", 0), n_bits=32),
        parser.NXFlowSpecMatch(src=("tcp_src_nxm", 0), dst=("tcp_src_nxm", 0), n_bits=16),
        parser.NXFlowSpecMatch(src=("tcp_dst_nxm", 0), dst=("tcp_dst_nxm", 0), n_bits=16),
        parser.NXFlowSpecLoad(src=("eth_dst_nxm", 0), dst=("eth_dst_nxm", 0), n_bits=48),
        parser.NXFlowSpecOutput(src=(PIN_PORT_REG, 0), n_bits=32),
    ]
    return parser.NXActionLearn(table_id=SELECT, specs=specs, idle_timeout=idle_s,
                                priority=PIN_PRIORITY, cookie=LEARNED_COOKIE)


def output_reg0() -> Any:
    return parser.NXActionOutputReg(ofs_nbits=nicira_ext.ofs_nbits(0, 31), src=PIN_PORT_REG,
                                    max_len=0xFFFF)


def _actions(dp: Any, spec: FlowSpec) -> list[Any]:
    out: list[Any] = []
    for action in spec.actions:
        kind = action[0]
        if kind == "output":
            out.append(parser.OFPActionOutput(action[1]))
        elif kind == "set_field":
            out.append(parser.OFPActionSetField(**{action[1]: action[2]}))
        elif kind == "set_queue":
            out.append(parser.OFPActionSetQueue(action[1]))
        elif kind == "resubmit":
            out.append(parser.NXActionResubmitTable(table_id=action[1]))
        elif kind == "learn_pin":
            out.append(learn_pin(action[1]))
        elif kind == "output_reg0":
            out.append(output_reg0())
        else:
            raise ValueError(f"unknown action {action!r}")
    if spec.group is not None:
        out.append(parser.OFPActionGroup(spec.group))
    return out


def _instructions(dp: Any, spec: FlowSpec) -> list[Any]:
    inst: list[Any] = []
    if spec.meter is not None:
        inst.append(parser.OFPInstructionMeter(spec.meter))
    actions = _actions(dp, spec)
    if actions:
        inst.append(parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions))
    if spec.metadata is not None:
        inst.append(parser.OFPInstructionWriteMetadata(*spec.metadata))
    if spec.goto is not None:
        inst.append(parser.OFPInstructionGotoTable(spec.goto))
    return inst


def flow_add(dp: Any, spec: FlowSpec) -> Any:
    """An add; it also replaces a flow of the same table, priority and match
    (OpenFlow keeps that flow's counters unless told to reset them)."""
    return parser.OFPFlowMod(dp, cookie=spec.cookie(), table_id=spec.table,
                             command=ofp.OFPFC_ADD, priority=spec.priority,
                             match=parser.OFPMatch(**dict(spec.match)),
                             instructions=_instructions(dp, spec))


def flow_delete(dp: Any, table: int, priority: int, match: Any, cookie: int) -> Any:
    return parser.OFPFlowMod(dp, cookie=cookie, cookie_mask=0xFFFFFFFFFFFFFFFF,
                             table_id=table, command=ofp.OFPFC_DELETE_STRICT,
                             priority=priority, match=match, out_port=ofp.OFPP_ANY,
                             out_group=ofp.OFPG_ANY)


def _bucket(dp: Any, b: Bucket) -> Any:
    actions: list[Any] = [parser.OFPActionSetField(eth_dst=b.backend_mac)]
    if b.pin:
        actions += [parser.OFPActionSetField(**{PIN_PORT_REG: b.port}),
                    parser.NXActionResubmitTable(table_id=PIN)]
    else:
        actions.append(parser.OFPActionOutput(b.port))
    return parser.OFPBucket(weight=b.weight, watch_port=ofp.OFPP_ANY,
                            watch_group=ofp.OFPG_ANY, actions=actions)


def group_mod(dp: Any, spec: GroupSpec, command: int) -> Any:
    return parser.OFPGroupMod(dp, command=command, type_=ofp.OFPGT_SELECT,
                              group_id=spec.group_id,
                              buckets=[_bucket(dp, b) for b in spec.buckets])


def group_delete(dp: Any, group_id: int) -> Any:
    return parser.OFPGroupMod(dp, command=ofp.OFPGC_DELETE, group_id=group_id)


def meter_mod(dp: Any, spec: MeterSpec, command: int) -> Any:
    bands = [parser.OFPMeterBandDrop(rate=rate, burst_size=burst) for rate, burst in spec.bands]
    return parser.OFPMeterMod(dp, command=command,
                              flags=ofp.OFPMF_KBPS | ofp.OFPMF_BURST | ofp.OFPMF_STATS,
                              meter_id=spec.meter_id, bands=bands)


def meter_delete(dp: Any, meter_id: int) -> Any:
    return parser.OFPMeterMod(dp, command=ofp.OFPMC_DELETE, meter_id=meter_id)


# ---- reading back -------------------------------------------------------------


def bucket_of(bucket: Any) -> Bucket | None:
    """A held bucket as a spec; None when it is not one of ours."""
    mac = port = None
    pin = False
    for action in bucket.actions:
        if isinstance(action, parser.NXActionResubmitTable) and action.table_id == PIN:
            pin = True
        elif isinstance(action, parser.OFPActionSetField) and action.key == "eth_dst":
            mac = action.value
        elif isinstance(action, parser.OFPActionSetField) and action.key == PIN_PORT_REG:
            port = action.value
        elif isinstance(action, parser.OFPActionOutput):
            port = action.port
    if mac is None or port is None:
        return None
    return Bucket(bucket.weight, mac, port, pin)


def group_of(desc: Any) -> GroupSpec | None:
    if desc.type != ofp.OFPGT_SELECT:
        return None
    buckets = [bucket_of(b) for b in desc.buckets]
    if any(b is None for b in buckets):
        return None
    return GroupSpec(desc.group_id, tuple(buckets))  # type: ignore[arg-type]


def meter_of(config: Any) -> MeterSpec:
    return MeterSpec(config.meter_id,
                     tuple((b.rate, b.burst_size) for b in config.bands
                           if isinstance(b, parser.OFPMeterBandDrop)))
