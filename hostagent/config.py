"""The agent's configuration: section `agent:` of a YAML file (see docs/agent.md).

A pydantic-settings model (tokenfabric.config: file < TOKENFABRIC_AGENT__KEY < flags):
each field is a key with its default and its check, so a bad value is reported with
its key (`agent.port: ...`) instead of failing later.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator

from tokenfabric import yamlio
from tokenfabric.beacon import BEACON_PORT, FABRIC_ADDRESS
from tokenfabric.config import ConfigError, SectionSettings, load_settings, validation_message
from tokenfabric.hostagent.handoff import HandoffSettings

_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
_ZMQ_ENDPOINT = re.compile(r"^(tcp|ipc)://\S+$")
_REQUIRED = ("name", "address", "mac", "switch", "port", "vip")


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


def _mac(value: str) -> str:
    if not _MAC.match(value):
        raise ValueError(f"{value!r} is not a MAC address like 00:00:00:00:00:01")
    return value


def _zmq_endpoint(value: str | None) -> str | None:
    if value is not None and not _ZMQ_ENDPOINT.match(value):
        raise ValueError(f"{value!r} is not a ZMQ endpoint like tcp://127.0.0.1:5557")
    return value


def _host_port(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{value!r} is not host:port")
    return value


def _metrics_listen(value: str | None) -> str | None:
    if value is None:
        return value
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return value


def _handoff(raw: dict[str, Any]) -> dict[str, Any]:
    """The `handoff` mapping, checked against HandoffSettings; the secret read from its
    file. Empty or `enabled: false`: {} (off)."""
    values = dict(raw)
    enabled = values.pop("enabled", bool(values))
    if not isinstance(enabled, bool):
        raise ValueError("handoff.enabled must be true or false")
    if not enabled:
        return {}
    secret_file = values.pop("secret_file", None)
    if secret_file is not None:
        try:
            values["secret"] = Path(str(secret_file)).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"handoff.secret_file: {exc}") from None
    elif isinstance(values.get("secret"), str):
        values["secret"] = values["secret"].encode()
    if not values.get("secret"):
        raise ValueError("handoff needs secret_file (or secret): the fabric's agents "
                         "sign handoffs with it")
    _check_handoff_keys(values)
    HandoffSettings(**values)  # its own checks (ValueError)
    return values


def _check_handoff_keys(values: Mapping[str, Any]) -> None:
    """Each key a HandoffSettings field and each value of its type (ValueError)."""
    names = {f.name for f in fields(HandoffSettings)}
    defaults = HandoffSettings(secret=b"x" * 16)
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"handoff.{key}: unknown key (known: enabled, "
                             f"secret_file, {', '.join(sorted(names))})")
        if key == "secret":
            continue
        default = getattr(defaults, key)
        wanted: tuple[type, ...] = (int, float) if isinstance(default, float) \
            else (type(default),)
        # a bool is an int to Python: only a bool setting takes one
        if isinstance(value, bool) != isinstance(default, bool) \
                or not isinstance(value, wanted):
            raise ValueError(f"handoff.{key} must be a {type(default).__name__}")
        if isinstance(value, int | float) and not math.isfinite(value):
            raise ValueError(f"handoff.{key} must be a finite number")
        if isinstance(value, int | float) and value < 0:
            raise ValueError(f"handoff.{key} must not be negative")


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings as a mapping, each value read as YAML (`0.2`, `true`,
    `emulator`): the command lines' way to set agent settings (the lab's and the bench's
    --handoff, the bench's --variant). ValueError naming the item that is not one, or a
    key given twice."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        if key in out:
            raise ValueError(f"{key} given twice")
        try:
            out[key] = yamlio.load(text)
        except yamlio.YAMLError:
            raise ValueError(f"{key}: {text!r} is not a YAML value") from None
    return out


# set by whoever starts the agents (their shared secret), never as an override
_NOT_OVERRIDES = ("enabled", "secret", "secret_file")


def handoff_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings as handoff settings over the agents' (docs/agent.md), checked
    as the config file's `handoff` keys are: ValueError for an unknown key, a value of
    the wrong type or one HandoffSettings refuses."""
    return check_handoff_overrides(parse_assignments(items))


def check_handoff_overrides(values: dict[str, Any]) -> dict[str, Any]:
    """`values` (handoff settings over the agents') as handoff_overrides checks them."""
    for key in _NOT_OVERRIDES:
        if key in values:
            raise ValueError(f"handoff.{key} is not an override (set where the agents "
                             "are started)")
    _check_handoff_keys(values)
    HandoffSettings(secret=b"x" * 16, **values)  # its own checks (ValueError)
    return values


def _controller_urls(value: Any) -> list[str]:
    """controller_urls: a list, or one comma-separated string (the environment's form)."""
    if value is None or value == "":
        return []
    urls = [u.strip() for u in value.split(",") if u.strip()] if isinstance(value, str) \
        else value
    if not isinstance(urls, list):
        raise ValueError("must be a list of http(s):// URLs")
    out: list[str] = []
    for url in urls:
        if not isinstance(url, str) or not re.match(r"^https?://[^\s/]+(/\S*)?$", url):
            raise ValueError(f"{url!r} is not an http(s):// URL")
        if url.rstrip("/") in out:
            raise ValueError(f"{url!r} is named twice")
        out.append(url.rstrip("/"))
    return out


def _signing_key(value: str | None) -> str | None:
    if value is not None and not Path(value).is_file():
        raise ValueError(f"{value!r} is not a file (make one with "
                         "`tokenfabric agent keygen --key PATH`)")
    return value


# Strict: `true` is not 1, "8" is not 8 (the environment's values are YAML, so typed).
Count = Annotated[int, Field(strict=True, ge=0)]
Positive = Annotated[int, Field(strict=True, ge=1)]
Seconds = Annotated[float, Field(strict=True, gt=0)]
IPv4 = Annotated[str, Field(strict=True), AfterValidator(_ipv4)]
Endpoint = Annotated[str | None, AfterValidator(_zmq_endpoint)]


class AgentConfig(SectionSettings):
    SECTION = "agent"

    name: str                          # backend name, unique in the fabric
    host: str = ""                     # host name (default: name)
    address: IPv4                      # the host's fabric IPv4 address
    mac: Annotated[str, AfterValidator(_mac)]  # the host's fabric MAC
    switch: str                        # edge switch name
    port: Count                        # edge switch port number
    capacity: Positive = 256           # sequences run at once (vLLM max_num_seqs)
    # beacons' LOAD: delay (expected ms to a first token) or occupancy (LOAD_FULL x busy
    # slots / capacity)
    load_metric: Literal["delay", "occupancy"] = "delay"
    models: list[str] = []             # served models; empty: read from vLLM's /v1/models
    vip: IPv4                          # the service VIP this backend serves
    vip_port: Count = 8000
    vllm_url: str = "http://127.0.0.1:8000"
    controller_url: str = "http://127.0.0.1:8080"
    # controller replicas (docs/replicas.md): report to each of these URLs (a list, or one
    # comma-separated string); when set, controller_url is not used
    controller_urls: Annotated[list[str], BeforeValidator(_controller_urls)] = []
    token: str | None = None           # Bearer token for the controller's REST API
    token_file: str | None = None      # or a file holding it
    # Ed25519 private key (PEM) that signs usage records
    signing_key: Annotated[str | None, AfterValidator(_signing_key)] = None
    bridge: bool = True                # run the bridge on listen_address:listen_port
    listen_address: str = ""           # default: vip
    listen_port: Count = 0             # default: vip_port
    mode: Literal["relay", "overflow"] = "relay"  # overflow: answer 429 to everything
    trust_tenant_header: bool = False  # X-Tokenfabric-Tenant picks the tenant (labs, tests)
    overflow_request_tokens: Count = 512  # tokens one retry is expected to cost (Retry-After)
    upstream_timeout: Seconds = 30.0   # seconds to wait for vLLM's response headers
    request_timeout: Seconds = 30.0    # seconds a client has to send its whole request
    head_timeout: Seconds = 10.0       # ...and its request line and headers
    max_connections: Positive = 1024   # client connections served at once; more get 503
    max_body_bytes: Positive = 16 * 1024 * 1024      # one request body (413)
    max_buffered_bytes: Positive = 64 * 1024 * 1024  # request bodies held across connections
    max_header_bytes: Positive = 64 * 1024  # request line and headers (431)
    max_headers: Positive = 100        # header lines (431)
    beacon_target: Annotated[str, AfterValidator(_host_port)] = \
        f"{FABRIC_ADDRESS}:{BEACON_PORT}"
    beacon_source: str | None = None   # bind beacons to this address (default: the kernel's)
    beacon_interval: Seconds = 0.02
    scrape_interval: Seconds = 0.1
    health_interval: Seconds = 0.5
    stale_after: Seconds = 1.0         # metrics older than this: report down
    report_interval: Seconds = 1.0
    # on exit, seconds the requests in flight may finish in
    shutdown_grace: Annotated[float, Field(strict=True, ge=0)] = 10.0
    host_setup: bool = False           # VIP on lo, ARP sysctls, IP-in-IP decap (needs root)
    decap_interface: str = "tfa-ipip0"
    roce: dict[str, Any] = {}          # RoCE QoS values; the controller's may override
    priority_scheduling: Annotated[bool, Field(strict=True)] = False  # vLLM's priority policy
    # tenant name -> request priority (higher is more important), for tenants whose
    # priority the controller does not send in its tenant list
    tenant_priorities: dict[str, Annotated[int, Field(strict=True)]] = {}
    charge_step: Count = 16            # charge streamed completion tokens this many at a time
    # s an answer written whole waits for the client's TCP to acknowledge its end; still
    # unacknowledged: logged and counted (tokenfabric_bridge_unacked_answers). 0: off
    delivery_wait: Annotated[float, Field(strict=True, ge=0, le=60)] = 2.0
    # vLLM's KV-cache events, followed into the controller's prefix index (None: not):
    # the endpoint and replay_endpoint values of vLLM's --kv-events-config, as given to it
    # (tcp://*:5557: vLLM binds, the agent connects; tcp://127.0.0.1:5557: vLLM connects,
    # the agent binds -- vLLM's rule)
    kv_events_endpoint: Endpoint = None         # e.g. tcp://127.0.0.1:5557
    kv_events_replay_endpoint: Endpoint = None  # e.g. tcp://127.0.0.1:5558 (gaps replayed)
    kv_events_topic: Annotated[str, Field(strict=True)] = ""
    kv_index_max_blocks: Positive = 32768  # blocks this agent tracks and reports at most
    kv_report_interval: Seconds = 1.0  # seconds between block-set deltas to the controller
    # Prefix handoff (hostagent/handoff.py, docs/prefix-cache.md): {} is off; keys are
    # HandoffSettings' (enabled, secret_file or secret, port, tokenizer, min_gain_ms, ...)
    handoff: Annotated[dict[str, Any], AfterValidator(_handoff)] = {}
    # host:port of the agent's Prometheus /metrics
    metrics_listen: Annotated[str | None, AfterValidator(_metrics_listen)] = None
    # FAULT INJECTION, labs only: bill this many times the completion tokens served (a
    # lying agent, for the controller's billing cross-check). 1: honest.
    bill_factor: Annotated[float, Field(strict=True, ge=1, le=100)] = 1

    @model_validator(mode="before")
    @classmethod
    def _identity_first(cls, values: Any) -> Any:
        """The identity keys, each named when absent or empty; derived keys left unset
        (null in a file) take their default."""
        if not isinstance(values, dict):
            return values
        for key in _REQUIRED:
            if values.get(key) in (None, ""):
                raise ValueError(f"agent.{key} is required")
        return {k: v for k, v in values.items()
                if not (v is None and k in ("host", "listen_address", "listen_port"))}

    @model_validator(mode="after")
    def _derived(self) -> AgentConfig:
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError("agent.max_buffered_bytes must be at least agent.max_body_bytes "
                             "(else no body of the largest allowed size could ever be held)")
        self.host = self.host or self.name
        self.listen_address = self.listen_address or self.vip
        self.listen_port = self.listen_port or self.vip_port
        self.controller_urls = self.controller_urls or [self.controller_url.rstrip("/")]
        return self

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


def validate(values: dict[str, Any]) -> AgentConfig:
    """An `agent:` section given as a mapping (no file, environment or flags)."""
    try:
        return AgentConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(validation_message("agent", exc)) from None


def load(path: str | Path | None, flags: dict[str, Any] | None = None) -> AgentConfig:
    return load_settings(AgentConfig, path, flags)
