"""Experiment `prefix` in the Mininet lab (issue 15 item 7): its parts beside the runner.

The modes, workload, figures and baseline evidence are tokenfabric/lab/prefix.py's (shared
with bench/bench_prefix_handoff.py); here is what the lab adds:

- the emulators' evicting KV cache and KV events, and the agents that follow them, with
  the handoff configured (the fabric's shared secret in a file; listeners on each
  backend's fabric address, peers reached through the switch);
- per-device client addresses: the devices tenant's client host holds 10.0.1.1-126 (the
  chat generator's /25, one address per conversation; the fabric routes the /24 to it), the
  app-server tenant sends everything from its host's one address; on leafspine both client
  hosts hang on leaf 1, so that leaf is the clients' edge and gets the affinity entries;
- the workload per client host (`client_workloads`), its times scaled to a share of the
  emulators' capacity exactly as prefix.at_load scales the bench's: the chat split by
  tenant; the replayed trace from the app server's one address (a trace names no
  clients: a front end replaying its log); the prefix-free prompts alternated between the
  two hosts (devices round robin over their addresses);
- the L7 routers of the L7 modes on the router host, one port each;
- the figures of one run (hit rate from the emulators' prefix-cache counters, read over the
  management network before and after; the routers' evidence), the switches' affinity
  tables read back over P4Runtime after a handoff mode (`read_switch_affinity`), and over
  repeated runs the 90% bootstrap intervals of hit rate and TTFT p99 (`intervals`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from tokenfabric.hostagent.config import handoff_overrides as agent_handoff_overrides
from tokenfabric.lab import prefix, prefix_misses
from tokenfabric.lab.experiments import EMULATOR_PREFILL_MS_PER_TOKEN, Experiment
from tokenfabric.lab.loadgen import Workload
from tokenfabric.lab.loadgen import plan as loadgen_plan
from tokenfabric.lab.plan import EMULATOR_PORT, LabHost, LabPlan
from tokenfabric.lab.workloads import ChatTenant, plan_chat

if TYPE_CHECKING:
    from tokenfabric.lab.network import LabNetwork

HANDOFF_PORT = 8002
AGENT_METRICS_PORT = 9102  # the agents' /metrics, on their management address
KV_EVENTS = "tcp://127.0.0.1:5557"         # in each backend's own namespace
KV_REPLAY = "tcp://127.0.0.1:5558"
# the L7 routers share the router host: one HTTP port and one Prometheus port each
ROUTER_PORTS = {"vllm-cache_aware": 8000, "vllm-power_of_two": 8003, "sglang-cache_aware": 8004}
ROUTER_METRICS_PORTS = {"vllm-cache_aware": 29001, "vllm-power_of_two": 29002,
                        "sglang-cache_aware": 29003}
# handoff keys the lab's wiring sets and an override must not: the listeners' port, and
# the decision header its clients read for the miss analysis
LAB_HANDOFF_KEYS = ("port", "decision_header")
DEVICE_PREFIX_LEN = 25  # the devices tenant's conversations come from a /25 of its /24
SWITCH_MODE = "p2c"     # every mode of the experiment runs the switch's p2c under it


def is_prefix(exp: Experiment) -> bool:
    return exp.kv_cache_tokens is not None


def emulator_args(exp: Experiment) -> list[str]:
    """The emulator flags that give it vLLM's evicting prefix cache and KV events."""
    assert exp.kv_cache_tokens is not None
    return ["--kv-cache-tokens", str(exp.kv_cache_tokens), "--max-model-len", "8192",
            "--kv-events-config", json.dumps({"enable_kv_cache_events": True,
                                              "endpoint": KV_EVENTS,
                                              "replay_endpoint": KV_REPLAY})]


def handoff_overrides(items: Iterable[str]) -> dict[str, Any]:
    """The lab's `--handoff KEY=VALUE` items as agent handoff settings: checked as the
    agent's config file's (hostagent.config.handoff_overrides), less the keys the lab's
    wiring sets (LAB_HANDOFF_KEYS). ValueError naming the bad item."""
    values = agent_handoff_overrides(items)
    for key in LAB_HANDOFF_KEYS:
        if key in values:
            raise ValueError(f"handoff.{key} is set by the lab, not an override")
    return values


def handoff_line(handoff: Mapping[str, Any]) -> str:
    """summary.md's record of the agents' handoff settings over the defaults."""
    if not handoff:
        return "agents' handoff settings: the defaults (no --handoff)"
    return "agents' handoff settings over the defaults: " + ", ".join(
        f"{k}={json.dumps(v)}" for k, v in handoff.items())


def agent_settings(secret_file: Path, host: LabHost | None = None,
                   handoff: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The agent keys of the experiment: follow the KV events, hand off (docs/agent.md);
    Prometheus metrics on the host's management address, where the runner reads each
    run's handoff decisions (`handoff_decisions`); `handoff`: settings over the agent's
    defaults and the lab's (`--handoff`, checked by hostagent.config.handoff_overrides;
    not the lab's wiring: LAB_HANDOFF_KEYS)."""
    metrics = {"metrics_listen": f"{host.mgmt_ip}:{AGENT_METRICS_PORT}"} \
        if host is not None and host.mgmt_ip else {}
    return {**metrics, "kv_events_endpoint": KV_EVENTS, "kv_events_replay_endpoint": KV_REPLAY,
            "kv_report_interval": 0.25, "report_interval": 0.25,
            "handoff": {"secret_file": str(secret_file), "port": HANDOFF_PORT,
                        "prefill_ms_per_token": EMULATOR_PREFILL_MS_PER_TOKEN,
                        # the lab's own clients read the bridge's decision per request
                        # (the miss analysis, `misses`); off by default (hostagent)
                        "decision_header": True,
                        **(handoff or {})}}


def _tenant_hosts(plan: LabPlan) -> dict[str, LabHost]:
    return {str(h.tenant): h for h in plan.by_role("client")}


def _chat_tenants(plan: LabPlan) -> list[ChatTenant]:
    hosts = _tenant_hosts(plan)
    devices = hosts[prefix.DEVICES].ip.rsplit(".", 1)[0] + f".0/{DEVICE_PREFIX_LEN}"
    return [ChatTenant(prefix.DEVICES, clients=devices),
            ChatTenant(prefix.APP_SERVER, app_server=hosts[prefix.APP_SERVER].ip)]


def device_addresses(plan: LabPlan) -> dict[str, list[str]]:
    """Client host -> the extra addresses it must hold (the per-device clients)."""
    hosts = _tenant_hosts(plan)
    out: dict[str, list[str]] = {}
    for tenant in _chat_tenants(plan):
        if tenant.clients is not None:
            host = hosts[tenant.name]
            out[host.name] = [a for a in tenant.addresses() if a != host.ip]
    return out


def add_device_addresses(net: LabNetwork) -> int:
    """Put the per-device addresses on the client hosts' interfaces; how many were added."""
    added = 0
    for name, addresses in device_addresses(net.plan).items():
        node = net.host(name)
        intf = node.defaultIntf().name
        for address in addresses:
            node.cmd(f"ip addr add {address}/24 dev {intf} 2>&1")
        held = node.cmd(f"ip -4 -o addr show dev {intf}")
        missing = [a for a in addresses if f" {a}/" not in held]
        if missing:
            raise RuntimeError(f"{name}: could not add {len(missing)} client addresses, "
                               f"e.g. {missing[0]}")
        added += len(addresses)
    return added


def chat_specs(exp: Experiment, plan: LabPlan, load: float, seed: int = 1
               ) -> dict[str, dict[str, Any]]:
    """Client host -> its ChatSpec (as a dict for the loadgen): the bench's chat
    (prefix.chat_spec) with the lab's addresses, times scaled so that both hosts together
    offer `load` x the capacity of prefix.capacity_rps; each host its own tenant, half the
    conversations, its own seed."""
    tenants = _chat_tenants(plan)
    base = dataclasses.replace(prefix.chat_spec(exp.duration * 3, seed), tenants=tenants)
    planned = plan_chat(base)
    span = max(p.offset for p in planned) - min(p.offset for p in planned)
    rate = len(planned) / max(span, 1e-9)
    factor = rate / (load * prefix.capacity_rps(planned, exp.speeds))  # time stretch
    hosts = _tenant_hosts(plan)
    out = {}
    for i, tenant in enumerate(tenants):
        spec = dataclasses.replace(
            base, tenants=[tenant], seed=seed * 100 + i, duration=exp.duration,
            conversations_per_s=base.conversations_per_s / factor / len(tenants),
            think_s=base.think_s * factor)
        out[hosts[tenant.name].name] = dataclasses.asdict(spec)
    return out


def client_workloads(exp: Experiment, plan: LabPlan, load: float, seed: int = 1
                     ) -> dict[str, dict[str, Any]]:
    """Client host -> the loadgen Workload fields of its share of `exp.workload` at `load`
    x capacity; a host without a share is left out."""
    if exp.workload == "chat":
        return {host: {"chat": spec, "endpoint": "chat"}
                for host, spec in chat_specs(exp, plan, load, seed).items()}
    hosts = _tenant_hosts(plan)
    app = hosts[prefix.APP_SERVER]
    if exp.workload == "trace":
        planned = prefix.trace_workload(exp.duration, exp.speeds, load,
                                        exp.trace_path or prefix.SAMPLE_TRACE)
        rows = [dataclasses.replace(p, tenant=prefix.APP_SERVER, source_ip=app.ip)
                for p in planned]
        return {app.name: {"requests": [dataclasses.asdict(r) for r in rows],
                           "endpoint": "completions"}}
    if exp.workload != "free":
        raise ValueError(f"unknown workload {exp.workload!r}")
    devices = hosts[prefix.DEVICES]
    addresses = _chat_tenants(plan)[0].addresses()
    shares: dict[str, list[dict[str, Any]]] = {devices.name: [], app.name: []}
    for i, p in enumerate(prefix.prefix_free_workload(exp.duration, exp.speeds, load,
                                                      seed=seed + 2)):
        if i % 2:
            row = dataclasses.replace(p, tenant=prefix.APP_SERVER, source_ip=app.ip)
        else:
            row = dataclasses.replace(p, tenant=prefix.DEVICES,
                                      source_ip=addresses[(i // 2) % len(addresses)])
        shares[app.name if i % 2 else devices.name].append(dataclasses.asdict(row))
    return {host: {"requests": rows, "endpoint": "completions"}
            for host, rows in shares.items() if rows}


def _read_switches(plan: LabPlan, entities: list[Any], timeout: float) -> dict[str, list[Any]]:
    """One P4Runtime Read of `entities` from each BMv2 switch of the plan (a Read needs
    no mastership, so the controller stays primary): switch -> the entities it answered."""
    import grpc
    from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

    out: dict[str, list[Any]] = {}
    for sw in plan.switches.values():
        if sw.driver != "p4runtime" or not sw.grpc_port:
            continue
        request = p4runtime_pb2.ReadRequest(device_id=sw.device_id, entities=entities)
        with grpc.insecure_channel(f"127.0.0.1:{sw.grpc_port}") as channel:
            stub = p4runtime_pb2_grpc.P4RuntimeStub(channel)
            out[sw.name] = [found for response in stub.Read(request, timeout=timeout)
                            for found in response.entities]
    return out


def read_switch_affinity(plan: LabPlan, timeout: float = 10.0
                         ) -> dict[str, list[dict[str, Any]]]:
    """Each BMv2 switch's `affinity` table as the switch holds it (a wildcard Read):
    switch -> [{client, backend_id}]. The check that the entries sit on the clients'
    edge."""
    from p4.v1 import p4runtime_pb2

    from tokenfabric.p4names import IDS

    entity = p4runtime_pb2.Entity()
    entity.table_entry.table_id = IDS["affinity"]
    out: dict[str, list[dict[str, Any]]] = {}
    for name, found in _read_switches(plan, [entity], timeout).items():
        rows: list[dict[str, Any]] = []
        for f in found:
            entry = f.table_entry
            # key: service_id (field 1), client (field 2); steer_affinity's backend_id is
            # its first parameter
            client = next(m.exact.value for m in entry.match if m.field_id == 2)
            params = {p.param_id: p.value for p in entry.action.action.params}
            rows.append({"client": str(ipaddress.IPv4Address(int.from_bytes(client, "big"))),
                         "backend_id": int.from_bytes(params.get(1, b"\0"), "big")})
        out[name] = rows
    return out


def read_switch_steering(plan: LabPlan, timeout: float = 10.0) -> dict[str, dict[str, int]]:
    """Each BMv2 switch's Select outcomes for clients with an affinity entry, from its
    `events` counter (the AFFINITY and AFFINITY_OVER_BOUND cells, docs/dataplane.md):
    switch -> {"steered": new connections the entry sent to its backend, "over_bound":
    those whose backend was over the load bound, so P2C chose}; and the connection
    table's misses: "pin_collisions" (a new connection whose two slots live ones held:
    all its packets take Select's stateless choice, its P2C pair slot's first candidate,
    which a change of the eligible backends moves -- before session 10 the weighted
    hash, which a weight change moved: a stream broken mid-way with no bridge seeing
    it), "pin_misses" (packets of such connections, and packets whose pin is gone, such
    as a closing connection's after its close grace). Cumulative packets; the runner
    takes the difference over a run."""
    from p4.v1 import p4runtime_pb2

    from tokenfabric.p4names import IDS, Event

    cells = {int(Event.AFFINITY): "steered", int(Event.AFFINITY_OVER_BOUND): "over_bound",
             int(Event.PIN_COLLISION): "pin_collisions", int(Event.PIN_MISS): "pin_misses"}
    entities = []
    for index in cells:
        entity = p4runtime_pb2.Entity()
        entity.counter_entry.counter_id = IDS["events"]
        entity.counter_entry.index.index = index
        entities.append(entity)
    out: dict[str, dict[str, int]] = {}
    for name, found in _read_switches(plan, entities, timeout).items():
        counts = dict.fromkeys(cells.values(), 0)
        for f in found:
            counts[cells[f.counter_entry.index.index]] = f.counter_entry.data.packet_count
        out[name] = counts
    return out


def read_ovs_affinity(plan: LabPlan, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """Each OVS switch's prefix affinity as the bridge holds it (`ovs-ofctl dump-flows`,
    docs/openflow.md): switch -> {"clients": the client addresses of its table-1 affinity
    flows, "steered": packets of table STEER's steering flows (new connections sent to
    an entry's backend, cumulative; a flow withdrawn over the bound takes its count
    along, so a run's difference can undercount)}. Connections that fell back over the
    bound are not counted here: OVS undercounts the rules a packet passes before a
    select group's recirculation."""
    from tokenfabric.lab.ovs import ofctl

    return {sw.name: ovs_affinity_of(ofctl("dump-flows", sw.name, timeout=timeout))
            for sw in plan.switches.values() if sw.driver == "openflow"}


def ovs_affinity_of(dump: str) -> dict[str, Any]:
    """read_ovs_affinity's figures from one bridge's `ovs-ofctl dump-flows` text (parsed
    by the Open vSwitch project's own flow library)."""
    from ovs.flow.ofp import OFPFlow

    from tokenfabric.controller.openflow.flows import (
        AFFINITY_PRIORITY,
        SELECT,
        STEER,
        STEER_OPEN_PRIORITY,
    )

    clients, steered = [], 0
    for line in dump.splitlines():
        if "actions=" not in line:
            continue  # the reply's header line
        flow = OFPFlow(line)
        table, prio = flow.info.get("table", 0), flow.match.get("priority")
        if table == SELECT and prio == AFFINITY_PRIORITY and "nw_src" in flow.match:
            clients.append(str(flow.match["nw_src"].ip))
        elif table == STEER and prio == STEER_OPEN_PRIORITY:
            steered += int(flow.info.get("n_packets", 0))
    return {"clients": sorted(clients), "steered": steered}


def steering_change(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
                    ) -> dict[str, dict[str, int]]:
    """A run's share of read_switch_steering's cumulative counts, per switch."""
    return {sw: {k: v - before.get(sw, {}).get(k, 0) for k, v in counts.items()}
            for sw, counts in after.items()}


def router_url(plan: LabPlan, mode: str) -> str:
    [host] = plan.by_role("router")
    return f"http://{host.ip}:{ROUTER_PORTS[mode]}"


def router_argv(plan: LabPlan, mode: str, binary: str) -> list[str]:
    workers = [f"http://{b.ip}:{EMULATOR_PORT}" for b in plan.by_role("backend")]
    return prefix.router_command(mode, binary, "0.0.0.0", ROUTER_PORTS[mode], workers,
                                 ROUTER_METRICS_PORTS[mode])


def emulator_metrics(plan: LabPlan) -> dict[str, str]:
    """Each backend's emulator /metrics, over the management network."""
    out = {}
    for host in plan.by_role("backend"):
        out[host.name] = httpx.get(f"http://{host.mgmt_ip}:{EMULATOR_PORT}/metrics",
                                   timeout=10).text
    return out


def handoff_decisions(plan: LabPlan) -> dict[str, float]:
    """The bridges' handoff decisions so far (tokenfabric_handoff_decisions_total by
    decision: handoff, or why it served locally; `lookup_failed:REASON` splits the failed
    lookups by reason), summed over the backends; a backend
    whose agent does not answer counts nothing."""
    texts = []
    for host in plan.by_role("backend"):
        try:
            texts.append(httpx.get(f"http://{host.mgmt_ip}:{AGENT_METRICS_PORT}/metrics",
                                   timeout=5).text)
        except httpx.HTTPError:
            continue
    out = prefix.metric_sums(texts, "tokenfabric_handoff_decisions_total", "decision")
    # lookup_failed split by reason: timeout, status, connection, bad_answer
    failed = prefix.metric_sums(texts, "tokenfabric_prefix_lookup_failures_total", "reason")
    return {**out, **{f"lookup_failed:{reason}": n for reason, n in failed.items()}}


def handoff_paths(plan: LabPlan, records: list[dict[str, Any]]) -> dict[str, int]:
    """Answered handoffs by where the relay went: between backends on one switch, or
    across the fabric (on leafspine: leaf, spine, another leaf)."""
    out = {"same_switch": 0, "across_fabric": 0}
    for r in records:
        origin, peer = plan.hosts.get(r.get("handoff_from") or ""), \
            plan.hosts.get(r.get("backend") or "")
        if r.get("ok") and origin is not None and peer is not None:
            out["same_switch" if origin.switch == peer.switch else "across_fabric"] += 1
    return out


def misses(loads: dict[str, Workload], records: dict[str, list[dict[str, Any]]]
           ) -> dict[str, dict[str, Any]]:
    """Per tenant, where the run's prefix-cache hits went missing (prefix_misses: the
    hits any backend could have given, those got, the lost tokens by cause -- evicted, or
    served away from the longest holder and the first bridge's decision). `loads` and
    `records`: per client host, its workload and its records (ids count per host)."""
    keys: list[list[int]] = []
    merged: list[dict[str, Any]] = []
    for host, workload in loads.items():
        base = len(keys)
        keys += prefix_misses.request_keys(loadgen_plan(workload), workload.endpoint)
        merged += [{**r, "id": base + r["id"]} for r in records.get(host, [])
                   if isinstance(r.get("id"), int)]
    return prefix_misses.miss_causes(merged, keys)


def withdraw_affinity(api: httpx.Client, agent_token: str) -> int:
    """Withdraw every affinity entry the controller holds (GET /affinity, then DELETE
    /backends/{name}/affinity as the agents), so that a mode does not start with the
    previous mode's entries: they name the backends of another round's conversations,
    whose caches reset_caches empties. `api`: a client of the controller's /api/v1 with a
    viewer's (or admin's) token. How many were withdrawn; RuntimeError on a refusal."""
    view = api.get("/affinity")
    view.raise_for_status()
    withdrawn = 0
    for entries in view.json()["switches"].values():
        for e in entries:
            reply = api.request("DELETE", f"/backends/{e['backend']}/affinity",
                                json={"service": e["service"], "client": e["client"]},
                                headers={"Authorization": f"Bearer {agent_token}"})
            if reply.status_code >= 400:
                raise RuntimeError(f"withdrawing {e['client']} -> {e['backend']}: "
                                   f"{reply.status_code} {reply.text[:200]}")
            # one fact on several edges is listed per switch: gone with its first row
            withdrawn += bool(reply.json().get("withdrawn"))
    return withdrawn


def reset_caches(plan: LabPlan, timeout: float = 60.0) -> None:
    """Every emulator's prefix cache emptied before a mode (vLLM's /reset_prefix_cache,
    409 while requests still hold blocks), then a moment for the index to hear of it."""
    for host in plan.by_role("backend"):
        url = f"http://{host.mgmt_ip}:{EMULATOR_PORT}/reset_prefix_cache"
        deadline = time.monotonic() + timeout
        while httpx.post(url, timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{host.name}'s emulator stayed busy: cache not reset")
            time.sleep(0.5)
    time.sleep(1.0)


def run_figures(mode: str, records: list[dict[str, Any]], before: dict[str, str],
                after: dict[str, str], duration: float, router_log: str | None,
                router_startup_log: str | None = None) -> dict[str, Any]:
    """One mode's figures (prefix.mode_figures) with the hit rate from the emulators'
    counters and, for an L7 mode, whether its router did what it claims (`router_log`:
    its log during the run; `router_startup_log`: its whole log, start-up included)."""
    hits = prefix.hit_rate({n: prefix.prefix_counters(t) for n, t in before.items()},
                           {n: prefix.prefix_counters(t) for n, t in after.items()})
    figures = prefix.mode_figures(records, hits, duration)
    figures["mode"] = mode
    figures["valid"], figures["evidence"] = True, "the fabric's own mode"
    if mode in prefix.L7_MODES:
        renders = sum(prefix.token_calls(after[n], e) - prefix.token_calls(before.get(n, ""), e)
                      for n in after for e in ("/v1/completions/render",
                                               "/v1/chat/completions/render"))
        figures["valid"], figures["evidence"] = prefix.baseline_evidence(
            mode, router_log or "", renders, len(records), router_startup_log)
    return figures


def affinity_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The controller's affinity table over a run (GET /api/v1/affinity): entries the
    agents' reports installed or refreshed, and those in the switches at its end."""
    out: dict[str, Any] = {k: after["stats"].get(k, 0) - before["stats"].get(k, 0)
                           for k in after.get("stats", {})}
    out["entries_at_end"] = sum(len(v) for v in after.get("switches", {}).values())
    return out


def _fmt(value: Any, digits: int = 1, pct: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:.{digits}f}%" if pct else f"{value:,.{digits}f}"


def _label(f: dict[str, Any]) -> str:
    return f["mode"] + (f" (run {f['repeat'] + 1})" if f.get("repeat") else "")


def markdown(figures: list[dict[str, Any]], kv_tokens: int | None,
             workload: str = "chat") -> str:
    """The per-run table of the experiment, and a validity line per L7 baseline."""
    lines = [f"\nprefix experiment, workload {workload}, KV cache {kv_tokens} tokens per "
             "backend:\n",
             "| mode | ok/requests | hit rate | TTFT p50 / p99 ms | goodput rps | handed off "
             "(devices / app server) | added ms p50 / p99 | baseline valid |",
             "|---|---|---|---|---|---|---|---|"]
    for f in figures:
        t = f.get("tenants", {})
        dev, app = t.get(prefix.DEVICES, {}), t.get(prefix.APP_SERVER, {})
        handed = "–" if f["mode"] not in prefix.HANDOFF_MODES else (
            f"{_fmt(f['handoff_share'], 0, True)} ({_fmt(dev.get('handoff_share'), 0, True)}"
            f" / {_fmt(app.get('handoff_share'), 0, True)})")
        lines.append(
            f"| {_label(f)} | {f['ok']}/{f['requests']} | {_fmt(f['hit_rate'], 1, True)} | "
            f"{_fmt(f['ttft_p50_ms'], 0)} / {_fmt(f['ttft_p99_ms'], 0)} | "
            f"{_fmt(f['goodput_rps'], 2)} | {handed} | "
            f"{_fmt(f['handoff_added_ms_p50'])} / {_fmt(f['handoff_added_ms_p99'])} | "
            f"{'yes' if f['valid'] else 'NO'} |")
    for f in figures:
        if f["mode"] in prefix.HANDOFF_MODES and f.get("affinity") is not None:
            a = f["affinity"]
            lines.append(f"\n- {_label(f)}: the controller's affinity table got "
                         f"{a.get('installed', 0)} entries installed and "
                         f"{a.get('refreshed', 0)} refreshed from the agents' reports; "
                         f"{a['entries_at_end']} at the end of the run")
        paths = f.get("handoff_paths")
        if f["mode"] in prefix.HANDOFF_MODES and paths and sum(paths.values()):
            lines.append(f"\n- {_label(f)}: handoffs between backends on one switch "
                         f"{paths['same_switch']}, across the fabric {paths['across_fabric']}")
        if f["mode"] in prefix.HANDOFF_MODES and f.get("decisions"):
            lines.append(f"\n- {_label(f)}: the bridges' handoff decisions: " + ", ".join(
                f"{k} {v:.0f}" for k, v in sorted(f["decisions"].items())))
        if f["mode"] in prefix.HANDOFF_MODES and f.get("switch_affinity_note"):
            lines.append(f"\n- {_label(f)}: {f['switch_affinity_note']}")
        if f["mode"] in prefix.HANDOFF_MODES and f.get("ovs_steered") is not None:
            lines.append(f"\n- {_label(f)}: OVS: " + ", ".join(
                f"{sw} {n} new connections steered by affinity flows"
                for sw, n in sorted(f["ovs_steered"].items())) + "; the controller's bound: "
                + ", ".join(f"{sw} {json.dumps(b)}" for sw, b in sorted(
                    (f.get("ovs_bound") or {}).items())))
        held = f.get("switch_affinity")
        if f["mode"] in prefix.HANDOFF_MODES and held is not None:
            lines.append(f"\n- {_label(f)}: read back from the switches at "
                         "the end of the run: " + ", ".join(
                             f"{sw} {n} affinity entries" for sw, n in sorted(held.items())))
        steering = f.get("switch_steering")
        if f["mode"] in prefix.HANDOFF_MODES and steering:
            # the switches that met such a connection; a run without any says so (a
            # trace's one shared address gets no entry, so no switch steers)
            counted = [f"{sw} steered {c['steered']}, over the bound {c['over_bound']}"
                       for sw, c in sorted(steering.items())
                       if c["steered"] or c["over_bound"]]
            lines.append(f"\n- {_label(f)}: new connections of clients with an entry, by "
                         "the switches' events counters: " + (", ".join(counted) or
                         "none on any switch (0 steered, 0 over the bound)"))
            lines.append(f"\n- {_label(f)}: the connection tables' misses: " + ", ".join(
                f"{sw} {c.get('pin_collisions', 0)} new connections collided (stateless), "
                f"{c.get('pin_misses', 0)} unpinned packets"
                for sw, c in sorted(steering.items())))
        if f["mode"] in prefix.L7_MODES:
            lines.append(f"\n- baseline {_label(f)}: {'valid' if f['valid'] else 'INVALID'}: "
                         f"{f['evidence']}")
        for line in prefix_misses.describe(f.get("misses") or {}):
            lines.append(f"\n- {_label(f)}: {line.strip()}")
    return "\n".join(lines) + "\n"


def bootstrap_interval(groups: list[np.ndarray], statistic: Any, confidence: float = 0.9,
                       resamples: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """A two-level bootstrap (percentile method) of `statistic` over repeated runs: each
    resample draws the runs with replacement, then each drawn run's rows with
    replacement, and pools them. Rows of one run share its cache state, so resampling
    runs as well keeps the interval from counting one run's luck as precision. None
    when there is nothing to resample."""
    groups = [g for g in groups if len(g)]
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(groups), len(groups))
        pooled = np.concatenate([groups[i][rng.integers(0, len(groups[i]), len(groups[i]))]
                                 for i in drawn])
        values.append(statistic(pooled))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def ratio_interval(groups: list[np.ndarray], baseline: list[np.ndarray], statistic: Any,
                   confidence: float = 0.9, resamples: int = 1000, seed: int = 0
                   ) -> tuple[float, float] | None:
    """statistic(groups) / statistic(baseline): its interval by the two-level bootstrap of
    `bootstrap_interval`, each side resampled on its own."""
    groups, baseline = [g for g in groups if len(g)], [g for g in baseline if len(g)]
    if not groups or not baseline:
        return None
    rng = np.random.default_rng(seed)

    def draw(sample: list[np.ndarray]) -> float:
        drawn = rng.integers(0, len(sample), len(sample))
        return float(statistic(np.concatenate(
            [sample[i][rng.integers(0, len(sample[i]), len(sample[i]))] for i in drawn])))

    ratios = [draw(groups) / max(draw(baseline), 1e-12) for _ in range(resamples)]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def _ttft_ms(records: list[dict[str, Any]]) -> np.ndarray:
    return np.array([r["ttft"] * 1000 for r in records
                     if r.get("ok") and r.get("ttft") is not None], dtype=float)


def _cached_prompt(records: list[dict[str, Any]]) -> np.ndarray:
    """(cached, prompt) tokens per answered request, from its usage (vLLM's
    prompt_tokens_details.cached_tokens); empty when no usage said."""
    rows = [(r.get("cached_tokens") or 0, r["prompt_tokens"]) for r in records
            if r.get("ok") and r.get("prompt_tokens")]
    if not any(r.get("cached_tokens") is not None for r in records):
        return np.empty((0, 2))
    return np.array(rows, dtype=float).reshape(-1, 2)


def _p99(values: np.ndarray) -> float:
    return float(np.percentile(values, 99))


def _usage_hit_rate(rows: np.ndarray) -> float:
    return float(rows[:, 0].sum() / max(rows[:, 1].sum(), 1e-12))


def intervals(runs: dict[str, list[tuple[dict[str, Any], list[dict[str, Any]]]]],
              confidence: float = 0.9) -> dict[str, dict[str, Any]]:
    """Per mode, over its repeated runs ((figures, request records) each): the hit rate
    (the emulators' counters, mean over runs; and from the requests' usage, pooled, with
    its bootstrap interval), TTFT p50 and p99 of the pooled requests with p99's interval,
    goodput and handoff share as means over runs."""
    def mean(done: list[tuple[dict[str, Any], Any]], key: str) -> float | None:
        values = [f[key] for f, _ in done if f.get(key) is not None]
        return float(np.mean(values)) if values else None

    out: dict[str, dict[str, Any]] = {}
    ttft_groups = {mode: [_ttft_ms(records) for _, records in done]
                   for mode, done in runs.items()}
    for mode, done in runs.items():
        ttfts = ttft_groups[mode]
        usage = [_cached_prompt(records) for _, records in done]
        pooled = np.concatenate(ttfts) if ttfts else np.empty(0)
        pooled_usage = np.concatenate(usage) if usage else np.empty((0, 2))

        out[mode] = {
            "runs": len(done), "hit_rate": mean(done, "hit_rate"),
            "hit_rate_usage": _usage_hit_rate(pooled_usage) if len(pooled_usage) else None,
            "hit_rate_usage_ci": bootstrap_interval(usage, _usage_hit_rate, confidence),
            "ttft_p50_ms": float(np.percentile(pooled, 50)) if len(pooled) else None,
            "ttft_p99_ms": _p99(pooled) if len(pooled) else None,
            "ttft_p99_ci": bootstrap_interval(ttfts, _p99, confidence),
            "goodput_rps": mean(done, "goodput_rps"),
            "handoff_share": mean(done, "handoff_share"),
            "valid": all(f.get("valid", True) for f, _ in done)}
    # the fabric's handoff mode's p99 against every other mode's (the issue's targets:
    # <= 0.8x the best L7 router's; prefix-free within 1.05x of p2c's)
    for ours in (m for m in prefix.HANDOFF_MODES if m in runs):
        mine = out[ours]["ttft_p99_ms"]
        out[ours]["p99_ratio"] = {
            other: {"ratio": mine / theirs["ttft_p99_ms"],
                    "ci": ratio_interval(ttft_groups[ours], ttft_groups[other], _p99,
                                         confidence)}
            for other, theirs in out.items() if other != ours and mine is not None
            and theirs.get("ttft_p99_ms")}
    return out


def intervals_markdown(stats: dict[str, dict[str, Any]], confidence: float = 0.9) -> str:
    """The per-mode table over repeated runs, with the bootstrap intervals."""
    pct = f"{confidence:.0%}"

    def ci(pair: Any, digits: int, as_pct: bool = False) -> str:
        if pair is None:
            return ""
        low, high = pair
        return f" [{_fmt(low, digits, as_pct)}..{_fmt(high, digits, as_pct)}]"

    lines = [f"\nover repeated runs (runs pooled; {pct} two-level bootstrap intervals: "
             "runs, then requests within each run):\n",
             f"| mode | runs | hit rate (counters, mean) | hit rate (usage) [{pct}] | "
             f"TTFT p50 ms | TTFT p99 ms [{pct}] | goodput rps (mean) | handed off (mean) "
             "| baselines valid |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, s in stats.items():
        lines.append(
            f"| {mode} | {s['runs']} | {_fmt(s['hit_rate'], 1, True)} | "
            f"{_fmt(s['hit_rate_usage'], 1, True)}{ci(s['hit_rate_usage_ci'], 1, True)} | "
            f"{_fmt(s['ttft_p50_ms'], 0)} | {_fmt(s['ttft_p99_ms'], 0)}"
            f"{ci(s['ttft_p99_ci'], 0)} | {_fmt(s['goodput_rps'], 2)} | "
            f"{'–' if mode not in prefix.HANDOFF_MODES else _fmt(s['handoff_share'], 0, True)}"
            f" | {'yes' if s['valid'] else 'NO'} |")
    for mode, s in stats.items():
        for other, r in s.get("p99_ratio", {}).items():
            lines.append(f"\n- TTFT p99 {mode} / {other}: {r['ratio']:.2f}"
                         f"{ci(r['ci'], 2)}")
    return "\n".join(lines) + "\n"
