"""The agent's configuration: section `agent:` of a YAML file (see docs/agent.md).

Loaded with tokenfabric.config.load_section (file < TOKENFABRIC_AGENT__KEY < flags), then
checked here, so a bad value is reported with its key instead of failing later.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tokenfabric.beacon import BEACON_PORT, FABRIC_ADDRESS
from tokenfabric.config import ConfigError, load_section

DEFAULTS: dict[str, Any] = {
    "name": None,                      # backend name, unique in the fabric
    "host": None,                      # host name (default: name)
    "address": None,                   # the host's fabric IPv4 address
    "mac": None,                       # the host's fabric MAC
    "switch": None,                    # edge switch name
    "port": None,                      # edge switch port number
    "capacity": 256,                   # sequences run at once (vLLM max_num_seqs)
    "load_metric": "delay",            # beacons' LOAD: delay (expected ms to a first token)
                                       # or occupancy (LOAD_FULL x busy slots / capacity)
    "models": [],                      # served models; empty: read from vLLM's /v1/models
    "vip": None,                       # the service VIP this backend serves
    "vip_port": 8000,
    "vllm_url": "http://127.0.0.1:8000",
    "controller_url": "http://127.0.0.1:8080",
    # controller replicas (docs/replicas.md): report to each of these URLs (a list, or
    # one comma-separated string); when set, controller_url is not used
    "controller_urls": None,
    "token": None,                     # Bearer token for the controller's REST API
    "token_file": None,                # or a file holding it
    "signing_key": None,               # Ed25519 private key (PEM) that signs usage records
    "bridge": True,                    # run the bridge on listen_address:listen_port
    "listen_address": None,            # default: vip
    "listen_port": None,               # default: vip_port
    "mode": "relay",                   # relay | overflow (answer 429 to everything)
    "trust_tenant_header": False,      # X-Tokenfabric-Tenant picks the tenant (labs, tests)
    "overflow_request_tokens": 512,    # tokens one retry is expected to cost (Retry-After)
    "upstream_timeout": 30.0,          # seconds to wait for vLLM's response headers
    "request_timeout": 30.0,           # seconds a client has to send its whole request
    "head_timeout": 10.0,              # ...and its request line and headers
    "max_connections": 1024,           # client connections served at once; more get 503
    "max_body_bytes": 16 * 1024 * 1024,      # one request body (413)
    "max_buffered_bytes": 64 * 1024 * 1024,  # request bodies held across connections (503)
    "max_header_bytes": 64 * 1024,     # request line and headers (431)
    "max_headers": 100,                # header lines (431)
    "beacon_target": f"{FABRIC_ADDRESS}:{BEACON_PORT}",
    "beacon_source": None,             # bind beacons to this address (default: the kernel picks)
    "beacon_interval": 0.02,
    "scrape_interval": 0.1,
    "health_interval": 0.5,
    "stale_after": 1.0,                # metrics older than this: report down
    "report_interval": 1.0,
    "shutdown_grace": 10.0,            # on exit, seconds the requests in flight may finish in
    "host_setup": False,               # VIP on lo, ARP sysctls, IP-in-IP decap (needs root)
    "decap_interface": "tfa-ipip0",
    "roce": {},                        # RoCE QoS values; the controller's may override
    "priority_scheduling": False,      # vLLM runs --scheduling-policy priority: send `priority`
    # tenant name -> request priority (higher is more important), for tenants whose
    # priority the controller does not send in its tenant list
    "tenant_priorities": {},
    "charge_step": 16,                 # charge streamed completion tokens this many at a time
    # vLLM's KV-cache events, followed into the controller's prefix index (None: not):
    # the endpoint and replay_endpoint values of vLLM's --kv-events-config, as given to it
    # (tcp://*:5557: vLLM binds, the agent connects; tcp://127.0.0.1:5557: vLLM connects,
    # the agent binds -- vLLM's rule)
    "kv_events_endpoint": None,        # e.g. tcp://127.0.0.1:5557
    "kv_events_replay_endpoint": None,  # e.g. tcp://127.0.0.1:5558 (gaps are replayed)
    "kv_events_topic": "",
    "kv_index_max_blocks": 32768,      # blocks this agent tracks and reports at most
    "kv_report_interval": 1.0,         # seconds between block-set deltas to the controller
    # FAULT INJECTION, labs only: bill this many times the completion tokens served (a
    # lying agent, for the controller's billing cross-check). 1: honest.
    "bill_factor": 1,
}


@dataclass
class AgentConfig:
    name: str
    host: str
    address: str
    mac: str
    switch: str
    port: int
    capacity: int
    load_metric: str
    models: list[str]
    vip: str
    vip_port: int
    vllm_url: str
    controller_url: str
    controller_urls: list[str]
    token: str | None
    token_file: str | None
    signing_key: str | None
    bridge: bool
    listen_address: str
    listen_port: int
    mode: str
    trust_tenant_header: bool
    overflow_request_tokens: int
    upstream_timeout: float
    request_timeout: float
    head_timeout: float
    max_connections: int
    max_body_bytes: int
    max_buffered_bytes: int
    max_header_bytes: int
    max_headers: int
    beacon_target: str
    beacon_source: str | None
    beacon_interval: float
    scrape_interval: float
    health_interval: float
    stale_after: float
    report_interval: float
    shutdown_grace: float
    host_setup: bool
    decap_interface: str
    roce: dict
    priority_scheduling: bool
    tenant_priorities: dict
    charge_step: int
    kv_events_endpoint: str | None
    kv_events_replay_endpoint: str | None
    kv_events_topic: str
    kv_index_max_blocks: int
    kv_report_interval: float
    bill_factor: float

    @property
    def beacon_addr(self) -> tuple[str, int]:
        host, _, port = self.beacon_target.rpartition(":")
        return host, int(port)

    def auth_token(self) -> str | None:
        if self.token:
            return self.token
        if self.token_file:
            return Path(self.token_file).read_text().strip()
        return None


_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


def _ipv4(key: str, value: Any) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError as exc:
        raise ConfigError(f"agent.{key}: {value!r} is not an IPv4 address") from exc


def _controller_urls(urls: Any, single: Any) -> list[str]:
    """controller_urls (a list or a comma-separated string) or else [controller_url]."""
    if urls is None or urls == "" or urls == []:
        urls = [single]
    elif isinstance(urls, str):
        urls = [u.strip() for u in urls.split(",") if u.strip()]
    if not isinstance(urls, list) or not urls:
        raise ConfigError("agent.controller_urls must be a list of http(s):// URLs")
    out: list[str] = []
    for url in urls:
        if not isinstance(url, str) or not re.match(r"^https?://[^\s/]+(/\S*)?$", url):
            raise ConfigError(f"agent.controller_urls: {url!r} is not an http(s):// URL")
        if url.rstrip("/") in out:
            raise ConfigError(f"agent.controller_urls: {url!r} is named twice")
        out.append(url.rstrip("/"))
    return out


def validate(raw: dict[str, Any]) -> AgentConfig:
    for key in ("name", "address", "mac", "switch", "port", "vip"):
        if raw.get(key) in (None, ""):
            raise ConfigError(f"agent.{key} is required")
    values = dict(raw)
    values["host"] = values["host"] or values["name"]
    values["address"] = _ipv4("address", values["address"])
    values["vip"] = _ipv4("vip", values["vip"])
    if not _MAC.match(str(values["mac"])):
        raise ConfigError(f"agent.mac: {values['mac']!r} is not a MAC address like "
                          "00:00:00:00:00:01")
    for key in ("port", "capacity", "vip_port", "overflow_request_tokens", "charge_step"):
        if not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 0:
            raise ConfigError(f"agent.{key} must be a non-negative integer")
    if values["capacity"] < 1:
        raise ConfigError("agent.capacity must be at least 1")
    for key in ("max_connections", "max_body_bytes", "max_buffered_bytes", "max_header_bytes",
                "max_headers"):
        if not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 1:
            raise ConfigError(f"agent.{key} must be a positive integer")
    if values["max_buffered_bytes"] < values["max_body_bytes"]:
        raise ConfigError("agent.max_buffered_bytes must be at least agent.max_body_bytes "
                          "(else no body of the largest allowed size could ever be held)")
    for key in ("beacon_interval", "scrape_interval", "health_interval", "stale_after",
                "report_interval", "upstream_timeout", "request_timeout", "head_timeout"):
        if not isinstance(values[key], int | float) or values[key] <= 0:
            raise ConfigError(f"agent.{key} must be a positive number of seconds")
    if not isinstance(values["shutdown_grace"], int | float) or values["shutdown_grace"] < 0:
        raise ConfigError("agent.shutdown_grace must be a number of seconds, 0 or more")
    if values["load_metric"] not in ("delay", "occupancy"):
        raise ConfigError(f"agent.load_metric must be delay or occupancy, "
                          f"not {values['load_metric']!r}")
    if values["mode"] not in ("relay", "overflow"):
        raise ConfigError("agent.mode must be relay or overflow")
    if not isinstance(values["models"], list):
        raise ConfigError("agent.models must be a list")
    priorities = values["tenant_priorities"]
    if not isinstance(priorities, dict) or any(
            isinstance(v, bool) or not isinstance(v, int) for v in priorities.values()):
        raise ConfigError("agent.tenant_priorities must map tenant names to integers")
    if not isinstance(values["priority_scheduling"], bool):
        raise ConfigError("agent.priority_scheduling must be true or false")
    for key in ("kv_events_endpoint", "kv_events_replay_endpoint"):
        if values[key] is not None and not re.match(r"^(tcp|ipc)://\S+$", str(values[key])):
            raise ConfigError(f"agent.{key}: {values[key]!r} is not a ZMQ endpoint like "
                              "tcp://127.0.0.1:5557")
    if not isinstance(values["kv_events_topic"], str):
        raise ConfigError("agent.kv_events_topic must be a string")
    if not isinstance(values["kv_index_max_blocks"], int) or \
            isinstance(values["kv_index_max_blocks"], bool) or values["kv_index_max_blocks"] < 1:
        raise ConfigError("agent.kv_index_max_blocks must be a positive integer")
    if not isinstance(values["kv_report_interval"], int | float) or \
            values["kv_report_interval"] <= 0:
        raise ConfigError("agent.kv_report_interval must be a positive number of seconds")
    if not isinstance(values["roce"], dict):
        raise ConfigError("agent.roce must be a mapping")
    values["controller_urls"] = _controller_urls(values["controller_urls"],
                                                 values["controller_url"])
    values["listen_address"] = values["listen_address"] or values["vip"]
    values["listen_port"] = values["listen_port"] or values["vip_port"]
    host, _, port = str(values["beacon_target"]).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"agent.beacon_target: {values['beacon_target']!r} is not host:port")
    factor = values["bill_factor"]
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 1 <= factor <= 100:
        raise ConfigError("agent.bill_factor must be a number in 1..100 (1: honest)")
    if values["signing_key"] is not None and not Path(str(values["signing_key"])).is_file():
        raise ConfigError(f"agent.signing_key: {values['signing_key']!r} is not a file "
                          "(make one with `tokenfabric agent keygen --key PATH`)")
    known = {f.name for f in fields(AgentConfig)}
    return AgentConfig(**{k: v for k, v in values.items() if k in known})


def load(path: str | Path | None, flags: dict[str, Any] | None = None) -> AgentConfig:
    return validate(load_section("agent", DEFAULTS, path, flags))
