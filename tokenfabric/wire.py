"""The REST API's wire format: every request and response body, in one module that the
controller's API (controller/api/server.py) and the host agent (hostagent/controller_api.py)
both import. Only pydantic: the agent imports it without the controller's stack.

Agent bodies (registration, report) ignore unknown fields, so that an agent newer
than the controller still registers; admin bodies forbid them, so that a typo in
an operator's request is an error and not a silent no-op. Every number has a
bound: nothing a client sends can overflow SQLite or a P4 field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, computed_field

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAC_PATTERN = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"
U16 = 65535
MAX_TOKENS = 10**9  # per usage item; a report covers about a second of one backend



def json_limits_problem(value: Any, max_depth: int, max_values: int) -> str | None:
    """None when value nests at most max_depth levels and holds at most max_values values."""
    count = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:  # iterative: the point is not to recurse on what a client sent
        item, depth = stack.pop()
        count += 1
        if count > max_values:
            return f"has more than {max_values} values"
        if isinstance(item, dict | list):
            if depth > max_depth:
                return f"nests deeper than {max_depth} levels"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


def bounded_json(max_depth: int, max_values: int) -> Callable[[Any], Any]:
    """A pydantic AfterValidator for free-form objects the controller keeps and serves."""
    def check(value: Any) -> Any:
        problem = json_limits_problem(value, max_depth, max_values)
        if problem:
            raise ValueError(problem)
        return value
    return check


Name = Annotated[str, Field(pattern=NAME_PATTERN, examples=["gpu1"])]


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError as exc:
        raise ValueError("must be an IPv4 address like 10.0.0.1") from exc


IPv4 = Annotated[str, Field(max_length=15, examples=["10.0.1.1"]), AfterValidator(_ipv4)]
ModelName = Annotated[str, Field(min_length=1, max_length=256)]
# Free-form objects the controller keeps and serves again (GET /backends): small and flat.
KeptJson = Annotated[dict[str, Any], AfterValidator(bounded_json(max_depth=4, max_values=1000))]


class AgentBody(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AdminBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- agent requests


class BackendRegistration(AgentBody):
    name: Name
    host: str = Field(min_length=1, max_length=253)
    address: IPv4
    mac: str = Field(pattern=MAC_PATTERN, examples=["02:00:00:00:01:01"])
    switch: Name
    port: int = Field(ge=0, le=511, description="the switch port the backend is cabled to")
    capacity: int = Field(ge=1, le=65535, description="requests it runs at once")
    models: list[ModelName] = Field(min_length=1, max_length=64)
    vip: IPv4
    vip_port: int = Field(ge=1, le=65535)


class TenantGrant(BaseModel):
    tenant_id: int
    name: str
    prefixes: list[str]
    tokens_per_s: float
    request_priority: int = Field(0, description="the contract's request priority "
                                  "(higher is more important); agents pass it to vLLM")
    prefix_affinity: bool = Field(False, description="the policy's opt-in to KV-cache "
                                  "prefix affinity: the bridge may hand the tenant's "
                                  "requests to the peer holding their prefix")


class RegistrationReply(BaseModel):
    backend_id: int
    tenants: list[TenantGrant]
    roce: dict[str, Any] = Field(default_factory=dict,
                                 description="the fabric's RoCEv2 class for the host's NIC "
                                             "(empty when the policy disables RoCE)")


class UsageItem(AgentBody):
    tenant_id: int = Field(ge=0, le=U16)
    model: ModelName | None = Field(
        default=None, description="absent: the backend's (first) model")
    prompt_tokens: int = Field(ge=0, le=MAX_TOKENS)
    completion_tokens: int = Field(ge=0, le=MAX_TOKENS)
    requests: int | None = Field(
        default=None, ge=0, le=MAX_TOKENS,
        description="finished requests this item covers; absent means one")


EPOCH_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
MAX_SERVICE_S = 3600.0  # a request's time in a slot beyond an hour is no measurement


class SignedUsage(AgentBody):
    """One usage record signed by the agent's key (tokenfabric/usage_signing.py)."""

    backend: Name
    epoch: str = Field(pattern=EPOCH_PATTERN, description="the agent's run: new at each start")
    seq: int = Field(ge=1, le=2**53, description="1, 2, 3, ... within the epoch")
    time_ms: int = Field(ge=0, le=10**14, description="when the agent made it, unix ms")
    tenant_id: int = Field(ge=0, le=U16)
    model: ModelName
    prompt_tokens: int = Field(ge=0, le=MAX_TOKENS)
    completion_tokens: int = Field(ge=0, le=MAX_TOKENS)
    requests: int = Field(ge=0, le=MAX_TOKENS)
    prev: str = Field(pattern=r"^([0-9a-f]{64})?$",
                      description="SHA-256 (hex) of the epoch's previous record; empty first")
    signature: str = Field(min_length=1, max_length=128, description="Ed25519, base64")


class BackendReport(AgentBody):
    report_id: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="unique per report: a retried report with the same id is counted once "
                    "(the Idempotency-Key header works too)")
    running: int = Field(ge=0, le=1_000_000)
    waiting: int = Field(ge=0, le=1_000_000)
    kv_cache_usage: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    healthy: bool
    service_s: float | None = Field(
        default=None, gt=0.0, le=MAX_SERVICE_S, allow_inf_nan=False, strict=True,
        description="a typical request's time in a slot here, s (the agent's delay model: "
                    "prefill + output tokens x time per output token, as measured): peers' "
                    "bridges price this backend's queue and speed with it (handoff cost "
                    "model). Absent: not measured yet, or an older agent")
    usage: list[UsageItem] | dict[str, UsageItem] = Field(
        default_factory=list, max_length=10_000,
        description="token usage since the last acknowledged report: a list of items, or "
                    "a mapping tenant name -> item")
    usage_total: list[UsageItem] | dict[str, UsageItem] | None = Field(
        default=None, max_length=10_000,
        description="cumulative usage since the agent started. When present the ledger "
                    "counts its growth since the last report and ignores `usage`: retries "
                    "count nothing twice and a lost report loses nothing")
    epoch: str | None = Field(
        default=None, pattern=EPOCH_PATTERN,
        description="the agent's run (new at each start): lower `usage_total` than the last "
                    "report's is refused unless the epoch changed (an audited reset)")
    records: list[SignedUsage] | None = Field(
        default=None, max_length=10_000,
        description="signed usage records; agents whose token has a public key must bill "
                    "with these (and `usage`/`usage_total` are then ignored for billing)")
    metrics: KeptJson | None = Field(default=None,
                                     description="vLLM metrics snapshot, for the views")
    rdma: KeptJson | None = Field(default=None, description="RDMA/RoCE status")

    def usage_items(self) -> list[UsageItem]:
        return _items(self.usage)

    def total_items(self) -> list[UsageItem] | None:
        return None if self.usage_total is None else _items(self.usage_total)


def _items(usage: list[UsageItem] | dict[str, UsageItem]) -> list[UsageItem]:
    return list(usage.values()) if isinstance(usage, dict) else list(usage)


class ReportReply(BaseModel):
    recorded: bool = Field(description="false: a report with this id was recorded before")
    records_added: int = Field(0, description="signed records newly recorded")
    records_duplicate: int = Field(0, description="signed records recorded before (a retry)")
    gaps: list[str] = Field(default_factory=list,
                            description="holes in the record sequence (accepted, flagged)")
    state: str
    weight: int
    draining: bool = Field(description="the operator drained this backend")
    tenants: list[TenantGrant] = Field(description="the current tenants (policy reloads "
                                                   "reach the agents this way)")


# ---------------------------------------------------------------- admin requests


class PolicyText(AdminBody):
    yaml: str = Field(max_length=10_000_000, description="the policy file's text")
    filename: str = Field(default="policy.yaml", min_length=1, max_length=255,
                          pattern=r"^[^/\x00]+$", description="named in error messages")


class PolicyCheck(BaseModel):
    valid: bool
    errors: list[str]


class PolicyApplied(BaseModel):
    applied: bool
    tenants: int
    contracts: int
    changed: dict[str, int] = Field(description="entities inserted/modified/deleted")
    switches: dict[str, str] = Field(description="per switch: applied, not connected, failed")


class ModeChange(AdminBody):
    mode: str = Field(pattern=r"^(hash|p2c)$", examples=["p2c"])


# ---------------------------------------------------------------- views


class BackendLoadView(BaseModel):
    running: int
    waiting: int
    kv_cache_usage: float
    service_s: float | None = Field(default=None, description="a typical request's time in "
                                    "a slot, as the agent last reported (null: none)")
    reports: int
    last_report_age_s: float | None


class BackendView(BaseModel):
    name: str
    backend_id: int
    host: str
    address: str
    mac: str
    switch: str
    port: int
    capacity: int
    models: list[str]
    state: str
    drained: bool
    healthy: bool | None
    weight: int
    registered: bool = Field(description="true: registered by an agent; false: fabric file")
    services: list[str]
    load: BackendLoadView
    rdma: dict[str, Any] | None
    metrics: dict[str, Any]


class ServiceView(BaseModel):
    name: str
    service_id: int
    model: str
    vip: str
    port: int
    mode: str
    pool: list[str]
    active_backends: int
    overflow: str | None


class SwitchView(BaseModel):
    name: str
    address: str
    device_id: int
    driver: str = Field("p4runtime", description="p4runtime (BMv2) or openflow (OVS)")
    features: list[str] = Field(default_factory=list,
                                description="what the switch does itself, e.g. weighted_hash, "
                                            "pinning, dsr, meters, p2c_in_switch")
    connected: bool
    status: str
    primary: bool | None
    details: dict[str, Any]


class TenantView(BaseModel):
    name: str
    tenant_id: int
    prefixes: list[str]
    contract: str
    trust_dscp: bool
    tokens_per_s: float | None


class ContractView(BaseModel):
    name: str
    service_class: str
    dscp: int
    priority_level: int
    queue: int
    tpm: int
    burst: int
    rpm: int | None
    max_parallel: int | None
    fiveqi: int | None
    bandwidth: dict[str, Any] | None
    slo: dict[str, Any]
    request_priority: int
    camara_profile: str | None
    services: list[str]


class TenantCounter(BaseModel):
    tenant_id: int
    bytes: int
    packets: int
    connections: int


class SwitchCounters(BaseModel):
    switch: str
    connected: bool
    error: str | None
    tenants: list[TenantCounter]


class LedgerRowView(BaseModel):
    minute: int
    tenant_id: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    requests: int


class CrossCheckView(BaseModel):
    """One tenant over a time range: the agents' token counts beside the switches' counters
    (the ledger's cross_check makes it; the API adds the tenant's name)."""

    model_config = ConfigDict(frozen=True)
    tenant_id: int
    tenant: str | None = None
    prompt_tokens: int
    completion_tokens: int
    requests: int
    switch_bytes: int
    switch_packets: int
    switch_connections: int
    counter_samples: int  # 0: no counter reads in the range (switch not connected?)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bytes_per_token(self) -> float | None:
        tokens = self.prompt_tokens + self.completion_tokens
        return round(self.switch_bytes / tokens, 3) if tokens and self.counter_samples else None


class BackendCheckView(BaseModel):
    switch: str
    port: int
    backends: list[str] = Field(description="the backends on this switch port")
    since: float
    until: float
    completion_tokens: int = Field(description="billed in [since, until)")
    bytes_sent: int = Field(description="received by the switch on the port (byte window)")
    bytes_needed: int = Field(description="completion_tokens x min_bytes_per_token")
    min_bytes_per_token: int
    samples: int
    fits: bool | None = Field(description="false: flagged; null: too few port samples")
    detail: str
    flagged_windows: dict[str, int] = Field(description="per backend: periodic checks that "
                                                        "flagged it so far")


class CrossCheckBackend(BaseModel):
    verdicts: int = Field(description="periodic windows that judged some billing of it")
    flagged: int = Field(description="of those, the windows that flagged it")
    first_flagged: float | None = Field(description="unix time of the first flag")


class CrossCheckSummary(BaseModel):
    checks: int
    interval_s: float
    window_s: float
    lag_s: float
    min_bytes_per_token: int
    backends: dict[str, CrossCheckBackend]


class LedgerHead(BaseModel):
    rows: int = Field(description="the journal's last row id (= its number of rows)")
    head: str = Field(description="that row's hash (SHA-256, hex)")


class StatementLine(BaseModel):
    model: str
    prompt_tokens: int
    completion_tokens: int
    requests: int
    input_per_million: str | None = Field(description="price, decimal string; null: unpriced")
    output_per_million: str | None
    amount: str | None


class StatementView(BaseModel):
    tenant: str
    tenant_id: int
    contract: str
    currency: str | None
    from_: str | None = Field(alias="from")
    to: str | None
    lines: list[StatementLine]
    total: str
    all_priced: bool


class Done(BaseModel):
    ok: bool = True
    message: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: list[Any]


class ErrorBody(BaseModel):
    error: ErrorDetail
