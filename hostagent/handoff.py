"""Prefix handoff: the bridge of the backend the switch chose hands a request to the peer
whose KV cache holds a markedly longer prefix of its prompt, when that pays (issue 15).

Per request of a tenant that opted in (policy `prefix_affinity`):
1. the prompt's block keys: the emulator's word tokenizer and chat template
   (hostagent/wordtok.py; exact for the emulator) or the local vLLM's own `/tokenize`,
   hashed as vLLM hashes blocks (tokenfabric/blockhash.py);
2. the fabric's prefix index (POST /api/v1/prefix-index/lookup on the controller), under a
   time budget, at most `max_lookups` at once, answers cached briefly; a slow or failed
   lookup means "serve here" -- the handoff is an optimisation, never a dependency;
3. the cost model (`decide`): hand off when a trusted peer holds at least `min_extra_blocks`
   more blocks (and `min_ratio` times as many) as this backend and
       prefill saved  >  max(0, peer's expected queueing - ours) + relay cost + min_gain,
   prefill saved = the request's own (extra cached tokens x prefill time per token) plus,
   weighted by `stall_weight`, the stall its prefill puts on the batch: a prefill step
   delays every running request of its backend, so computing P - cached_here tokens here
   stalls our running requests and P - cached_there tokens there stalls the peer's
   (saved += running_here x (P - cached_here) - running_there x (P - cached_there),
   times the prefill time per token); expected queueing from
   the peer's last reported running/waiting (plus the handoffs this agent sent it since)
   against its capacity, in units of a typical request's time here (with `peer_speed`,
   off by default: there -- its report's `service_s`, the delay model's -- and the
   peer's P - cached_there tokens at its speed against ours); relay cost = the
   measured moving average of the lookup-to-peer-head time; each extra block also
   counts `cache_weight` prefills more (`shared_cache_weight` for a shared address, an
   app server's: only a handoff brings its turns to their prefixes; see `decide`),
   scaled by this cache's eviction pressure with `cache_weight_by_eviction`;
4. the relay: the request goes to the peer agent's handoff listener (its fabric address,
   `handoff_port`), signed (`X-Tokenfabric-Handoff`: origin, tenant id, the client's
   address, time, HMAC-SHA256 over them and the body's SHA-256 with the fabric's handoff
   secret); the peer serves it
   as its own request of that tenant -- it charges the usage and never hands it on -- and
   the answer streams back through this bridge. A client that leaves aborts the relay
   connection, and the peer's bridge then aborts its vLLM;
5. the switch learns from it (hostagent/affinity_reports.py): a request served here
   because this backend holds its prefix (`local_longest`), or handed here by a peer,
   makes this backend's agent report "client -> this backend" to the controller, which
   installs it on the client's edge switch;
6. with `claim` (off by default), the backend that serves the prompt -- here, or the peer
   on receipt -- claims its blocks in the index at once (hostagent/prefix_claims.py), so
   the next bridge's lookup sees the holder before its KV report does.

Why the controller's index and not each agent subscribing to every peer's KV events: one
subscription per backend (not N x N), the index's staleness rules and memory bound apply
once, and peers' events need no route between hosts' ZMQ sockets. The price is one REST
round trip per eligible request (bounded by `lookup_timeout`, skipped for prompts shorter
than `min_blocks` and for tenants not opted in).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram

from tokenfabric.blockhash import BlockHasher
from tokenfabric.hostagent.tenants import Tenant
from tokenfabric.hostagent.wordtok import WordTokenizer, chat_words, split
from tokenfabric.wire import MAX_SERVICE_S

log = logging.getLogger(__name__)


HANDOFF_HEADER = "x-tokenfabric-handoff"
HANDOFF_FROM_HEADER = "X-Tokenfabric-Handoff-From"
HANDOFF_MS_HEADER = "X-Tokenfabric-Handoff-Ms"
LOOKUP_MS_HEADER = "X-Tokenfabric-Prefix-Lookup-Ms"
# the decision and the facts behind it (for the lab's miss analysis): "no_gain; blocks=38;
# here=30; longest=b2:38; gain=-12.3"
DECISION_HEADER = "X-Tokenfabric-Handoff-Decision"
# a holder's refusal at receipt (admit_check): 503 with this header naming the reason; the
# origin serves the request itself (decision peer_refused)
REFUSED_HEADER = "X-Tokenfabric-Handoff-Refused"
REFUSALS = ("signature", "no_gain", "busy", "slow")  # why a handoff was refused at receipt
MAX_CLOCK_SKEW_S = 30.0      # a signed handoff older (or newer) than this is refused
MAX_KEYS = 8192              # the index's lookup bound (controller/prefix_index.py)
RELAY_SMOOTHING = 0.2
MAX_SHARED = 65536           # shared client addresses remembered per agent
# decisions after which a prompt of at least min_blocks blocks is served here, so that its
# blocks are cached here afterwards (report_local: the client's affinity follows)
LOCAL_AFTER_LOOKUP = ("no_match", "short_prefix", "no_gain", "peer_busy", "lookup_failed",
                      "lookup_busy", "peer_refused")
TOKENIZERS = ("emulator", "vllm")
LOOKUP_FAILURES = ("timeout", "status", "connection", "bad_answer")  # why a lookup failed
# why a relay to a peer failed (the decision `relay_failed` is the first: the peer was not
# reached, served here); the others end a stream the client already has the head of, or
# answer it an error instead of the peer's head, so each is logged as well as counted:
# no_answer -- the peer sent no valid head; peer_closed -- its connection ended (closed
# or reset) before the end of the answer; peer_stalled -- no byte of it for the bridge's
# upstream_timeout; peer_malformed -- broken framing; client_left -- the client went away
# (the peer is aborted); client_stalled -- the client took nothing for request_timeout;
# client_unacked -- the answer was written whole, but the client's TCP had not
# acknowledged its end after the bridge's delivery_wait (cut in the network)
RELAY_FAILURES = ("connect", "no_answer", "peer_closed", "peer_stalled", "peer_malformed",
                  "client_left", "client_stalled", "client_unacked")
DECISIONS = ("handoff", "handoff_home", "no_match", "local_longest", "short_prefix",
             "peer_busy", "no_gain", "short_prompt", "lookup_failed", "lookup_busy",
             "relay_failed", "not_tokenized", "peer_refused")


class SharedClients:
    """Shared client addresses (an app server, a NAT: the bridge saw `shared_in_flight`
    of one address's requests in flight at once) and until when they count as shared.
    One per agent: its handoff weighs their requests with `shared_cache_weight`, its
    affinity reporter neither reports them nor keeps their entries."""

    def __init__(self, hold_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s, self.clock = hold_s, clock
        self._until: collections.OrderedDict[str, float] = collections.OrderedDict()

    def holds(self, client: str, now: float | None = None) -> bool:
        until = self._until.get(client)
        return until is not None and (self.clock() if now is None else now) < until

    def mark(self, client: str, now: float | None = None) -> None:
        """`client` is shared for `hold_s` from now (0: never)."""
        if self.hold_s <= 0 or not client:
            return
        self._until[client] = (self.clock() if now is None else now) + self.hold_s
        self._until.move_to_end(client)
        while len(self._until) > MAX_SHARED:
            self._until.popitem(last=False)

    def clear(self) -> int:
        """Forget every shared address; how many were held."""
        held = len(self._until)
        self._until.clear()
        return held


@dataclass
class HandoffSettings:
    """The agent's `handoff_*` keys (docs/agent.md)."""
    secret: bytes                        # shared by the fabric's agents: signs handoffs
    port: int = 8002                     # every agent's handoff listener, on its address
    tokenizer: str = "emulator"          # emulator (word tokenizer) | vllm (its /tokenize)
    block_size: int = 16                 # vLLM's GPU default; the KV events' wins when known
    hash_algo: str = "sha256"
    min_blocks: int = 4                  # prompts with fewer full blocks are never looked up
    min_extra_blocks: int = 4            # "markedly longer": at least this many more...
    min_ratio: float = 1.0               # ...and this many times our cached blocks (1.0:
                                         # the extra blocks alone; with a 30-block system
                                         # prompt a turn's 4-8 new blocks are only 1.1-1.3x)
    prefill_ms_per_token: float = 0.1    # prefill time a cached token saves (lab: 0.1)
    relay_ms: float = 3.0                # the relay's cost until measured
    min_gain_ms: float = 5.0             # net gain a handoff must promise
    stall_weight: float = 1.0            # weight of the batch's prefill stall (0: own only)
    cache_weight: float = 0.0            # value of a block cached there beyond this
                                         # request's prefill, in prefills of the block
    shared_cache_weight: float = 64.0    # the same for a shared address's requests (an
                                         # app server's: only a handoff brings them to
                                         # their prefix; see `decide`)
    cache_weight_by_eviction: bool = False  # scale both weights by this cache's eviction
                                         # pressure (evicted per stored block, lately):
                                         # a copy here evicts nothing while it has room
    max_peer_load: float = 4.0           # (running + waiting) / capacity a peer may have
    decision_header: bool = False        # answer with DECISION_HEADER (benchmarks): off,
                                         # since it tells a client where other prompts'
                                         # blocks are cached
    lookup_timeout: float = 0.05         # s: the budget of a lookup
    max_lookups: int = 32                # lookups in flight at once; more serve locally
    cache_ttl: float = 0.25              # s an index answer is reused for the same prompt
    cache_size: int = 1024
    connect_timeout: float = 0.5         # s to reach the peer's handoff listener
    load_stale_s: float = 3.0            # a peer whose load report is older is not used
    affinity_window_s: float = 30.0      # a client is re-reported at most this often (and
                                         # at most every quarter of the switch's TTL)
    affinity_queue: int = 1024           # affinity reports waiting to be sent; more dropped
    home_weight: float = 0.0             # value of keeping a shared prefix on one home, in
                                         # prefills of its blocks (0: off; see `decide`;
                                         # off by default: no hit-rate gain measured)
    home_cache_s: float = 10.0           # s a prefix group's home is remembered here
    report_local: bool = True            # affinity after any local serve of a long prompt
                                         # (not only `local_longest`): its blocks are here now
    shared_client_s: float = 300.0       # s a shared address (`shared_in_flight` requests
                                         # in flight here at once: an app server) is not
                                         # reported (0: off)
    shared_in_flight: int = 3            # 3, not 2: an open-loop replay (the lab's chat)
                                         # overlaps a conversation's turns now and then
    claim: bool = False                  # claim a prompt's blocks in the index once this
                                         # backend is chosen to serve it (served here, or
                                         # handed here): hostagent/prefix_claims.py; off:
                                         # the bench showed no clear win (prefix-cache.md)
    claim_ttl_s: float = 5.0             # s a claim lasts unless a KV report confirms it
    claim_queue: int = 256               # prompts waiting to be claimed; more dropped
    admit_check: bool = False            # sign the decision's valuation into the handoff,
                                         # and re-check it at receipt against the exact
                                         # queue here: a handoff that no longer pays is
                                         # refused (503) and the origin serves it (`admit`)
    admit_max_wait_ms: float = 0.0       # with admit_check: also refuse when the exact wait
                                         # for a slot here exceeds the origin's by more than
                                         # this (a TTFT guard the cache weight cannot buy
                                         # off; 0: off)
    peer_speed: bool = False             # price a peer's queue with its own service time
                                         # (its load report's `service_s`), and its prefill
                                         # by its speed against ours; off: both with this
                                         # backend's figures -- the bench lost hit rate and
                                         # p99 with it on (more load on the fast backends)

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"handoff tokenizer must be one of {TOKENIZERS}")
        if self.shared_in_flight < 2:
            raise ValueError("handoff shared_in_flight must be at least 2")
        if self.cache_weight < 0 or self.shared_cache_weight < 0:
            raise ValueError("handoff cache_weight and shared_cache_weight must be >= 0")
        if self.affinity_window_s < 0 or self.affinity_queue < 1:
            raise ValueError("handoff affinity_window_s must be >= 0, affinity_queue >= 1")
        if not 0 < self.claim_ttl_s <= 60 or self.claim_queue < 1:
            raise ValueError("handoff claim_ttl_s must be in (0, 60], claim_queue >= 1")
        if len(self.secret) < 16:
            raise ValueError("the handoff secret must be at least 16 bytes")


@dataclass
class Peer:
    """A holder of the prompt's prefix, as the index answered."""
    name: str
    address: str
    cached_blocks: int
    capacity: int = 1
    running: int = 0
    waiting: int = 0
    service_s: float | None = None   # its typical request's time in a slot, as reported


@dataclass
class Decision:
    decision: str                    # one of DECISIONS
    peer: Peer | None = None
    gain_ms: float = 0.0
    lookup_ms: float = 0.0
    local_blocks: int = 0
    home: bool = False               # a handoff (or a local serve) to keep the prefix's home
    prompt_blocks: int = 0
    longest: tuple[str, int] | None = None  # the longest trusted peer holder, as looked up
    shared: bool = False             # weighed as a shared address's request
    keys: list[int] | None = None    # the prompt's block keys, when worked out (its claim)
    saved_ms: float = 0.0            # a handoff's valuation: the prefill it saves...
    wait_here_ms: float = 0.0        # ...the queue it avoids here, and the queue it
    wait_there_ms: float = 0.0       # assumed at the peer (the holder re-checks it)

    def describe(self) -> str:
        """The DECISION_HEADER value: what was decided and what it was decided on."""
        name = "handoff_home" if self.decision == "handoff" and self.home else self.decision
        parts = [name, f"blocks={self.prompt_blocks}", f"here={self.local_blocks}"]
        if self.longest is not None:
            parts.append(f"longest={self.longest[0]}:{self.longest[1]}")
        if self.gain_ms:
            parts.append(f"gain={self.gain_ms:.1f}")
        if self.shared:
            parts.append("shared")
        return "; ".join(parts)


@dataclass
class LocalLoad:
    running: float
    waiting: float
    capacity: int
    expected_wait_s: float | None = None  # the delay model's, when it runs
    service_s: float = 0.7                # a typical request's time in a slot here
    service_measured: bool = False        # service_s is the delay model's measurement
                                          # (peers' figures are then comparable with it)


class HandoffMetrics:
    """Prometheus counters of one agent (GET /metrics of the agent's metrics listener)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.registry = CollectorRegistry()
        self.sent = Counter("tokenfabric_handoffs", "Requests this bridge handed to a peer.",
                            ["backend", "peer", "tenant"], registry=self.registry)
        self.received = Counter("tokenfabric_handoffs_received",
                                "Requests a peer's bridge handed to this backend.",
                                ["backend", "origin", "tenant"], registry=self.registry)
        self.decisions = Counter("tokenfabric_handoff_decisions",
                                 "Handoff decisions of this bridge, by outcome.",
                                 ["backend", "decision"], registry=self.registry)
        self.refused = Counter("tokenfabric_handoffs_refused",
                               "Handoffs refused here, by reason: signature (bad or "
                               "missing), no_gain and busy (admit_check: the exact queue "
                               "here no longer pays for it, or is over max_peer_load).",
                               ["backend", "reason"], registry=self.registry)
        self.lookup_seconds = Histogram(
            "tokenfabric_prefix_lookup_seconds", "Time of the prefix-index lookups.",
            ["backend"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1))
        self.relay_seconds = Histogram(
            "tokenfabric_handoff_added_seconds",
            "A handoff's added latency: the decision (block keys, index lookup) and the "
            "connection to the peer's handoff listener.", ["backend"],
            registry=self.registry, buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))
        self.affinity = Counter(
            "tokenfabric_affinity_reports",
            "Affinity reports (client -> this backend) for the switch, by outcome: sent, "
            "deduped (reported within the window), dropped (queue full), refused (4xx: not "
            "opted in, no edge, ...), failed (controller unreachable or 5xx), shared (a "
            "shared address: not reported), withdrawn (this backend's entry of a shared "
            "address deleted).",
            ["backend", "outcome"], registry=self.registry)
        self.claims = Counter(
            "tokenfabric_prefix_claims",
            "Prompts whose blocks this agent claimed in the prefix index for its backend "
            "(served here, or handed here), by outcome: sent, dropped (queue full), refused "
            "(4xx), failed (controller unreachable or 5xx), not_tokenized (a handed request "
            "whose block keys could not be worked out), known (every key already in the "
            "index as this backend's: no call).",
            ["backend", "outcome"], registry=self.registry)
        self.lookup_failures = Counter(
            "tokenfabric_prefix_lookup_failures",
            "Prefix-index lookups that failed (decision lookup_failed), by reason: timeout "
            "(no answer within lookup_timeout), status (the controller answered non-200), "
            "connection (refused, reset, DNS), bad_answer (not the index's JSON).",
            ["backend", "reason"], registry=self.registry)
        self.relay_failures = Counter(
            "tokenfabric_handoff_relay_failures",
            "Handoffs whose relay failed, by reason: connect (the peer not reached: served "
            "here, decision relay_failed), no_answer (no valid head from the peer: the "
            "client got a 502/504), and, after the client got the peer's head: "
            "peer_closed (its connection ended before the end of the answer), "
            "peer_stalled (no data for upstream_timeout), peer_malformed (broken "
            "framing) -- the client's stream ends with an error event -- client_left (the "
            "client went away: the peer aborted), client_stalled (the client read "
            "nothing for request_timeout), client_unacked (written whole, but its end not "
            "acknowledged by the client's TCP within delivery_wait: cut in the network).",
            ["backend", "reason"], registry=self.registry)
        for reason in LOOKUP_FAILURES:  # every reason shows, at 0 until it happens
            self.lookup_failures.labels(backend, reason)
        for reason in RELAY_FAILURES:
            self.relay_failures.labels(backend, reason)
        for reason in REFUSALS:
            self.refused.labels(backend, reason)
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def lookup_failed(self, reason: str) -> None:
        self.lookup_failures.labels(self.backend, reason).inc()
        self.counts[("lookup_failed", reason)] += 1

    def relay_failed(self, reason: str) -> None:
        self.relay_failures.labels(self.backend, reason).inc()
        self.counts[("relay_failures", reason)] += 1

    def decided(self, decision: str) -> None:
        self.decisions.labels(self.backend, decision).inc()
        self.counts[("decision", decision)] += 1

    def handed(self, peer: str, tenant: str) -> None:
        self.sent.labels(self.backend, peer, tenant).inc()
        self.counts[("sent", peer)] += 1

    def refuse(self, reason: str) -> None:
        self.refused.labels(self.backend, reason).inc()
        self.counts[("refused", reason)] += 1

    def took(self, origin: str, tenant: str) -> None:
        self.received.labels(self.backend, origin, tenant).inc()
        self.counts[("received", origin)] += 1


# -- signing ------------------------------------------------------------------------------
class Valuation(NamedTuple):
    """The origin's figures for a handoff (admit_check): the prefill it saves (cache
    weight and stall included), the queue it avoids at the origin and the one it assumed
    at the holder, and the relay's cost, all in ms."""
    saved_ms: float
    wait_here_ms: float
    wait_there_ms: float
    relay_ms: float

    def encode(self) -> str:
        return (f"saved={self.saved_ms:.1f}; here={self.wait_here_ms:.1f}; "
                f"there={self.wait_there_ms:.1f}; relay={self.relay_ms:.1f}")


class Handed(NamedTuple):
    """What a verified handoff header says: who handed it, whose it is, whose it was."""
    origin: str
    tenant_id: int
    client: str  # the client's address as the origin bridge saw it ("" unknown)
    valuation: Valuation | None = None  # signed with it, when the origin re-checks


def sign(secret: bytes, origin: str, tenant_id: int, body: bytes,
         now: float | None = None, *, client: str = "",
         valuation: Valuation | None = None) -> str:
    """The X-Tokenfabric-Handoff value of a request of `client` handed on by `origin`.
    The client's address is signed too: the receiving agent reports affinity for it; so
    is the valuation, when given: the receiving agent re-checks it (`admit`)."""
    stamp = int(time.time() if now is None else now)
    figures = "" if valuation is None else valuation.encode()
    digest = _mac(secret, origin, tenant_id, client, stamp, body, figures)
    head = f"origin={origin}; tenant={tenant_id}; client={client}; ts={stamp}; "
    return head + (f"{figures}; " if figures else "") + f"sig={digest}"


def verify(secret: bytes, value: str, body: bytes,
           now: float | None = None) -> Handed | None:
    """What a well-signed, fresh handoff header says, else None."""
    try:
        fields = dict(part.strip().split("=", 1) for part in value.split(";"))
        origin, tenant_id, stamp = fields["origin"], int(fields["tenant"]), int(fields["ts"])
        client, given = fields["client"], fields["sig"]
        valuation = None
        if "saved" in fields:
            valuation = Valuation(*(float(fields[k]) for k in
                                    ("saved", "here", "there", "relay")))
            if not all(math.isfinite(v) for v in valuation):
                return None
    except (KeyError, ValueError):
        return None
    now = time.time() if now is None else now
    if abs(now - stamp) > MAX_CLOCK_SKEW_S:
        return None
    # the valuation as sent: its exact text is what was signed
    figures = "" if valuation is None else "; ".join(
        f"{k}={fields[k]}" for k in ("saved", "here", "there", "relay"))
    if not hmac.compare_digest(given, _mac(secret, origin, tenant_id, client, stamp, body,
                                           figures)):
        return None
    return Handed(origin, tenant_id, client, valuation)


def _mac(secret: bytes, origin: str, tenant_id: int, client: str, stamp: int,
         body: bytes, figures: str = "") -> str:
    message = (f"{origin}|{tenant_id}|{client}|{stamp}|"
               f"{hashlib.sha256(body).hexdigest()}"
               + (f"|{figures}" if figures else "")).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def admit(settings: HandoffSettings, offer: Valuation, here: LocalLoad) -> str | None:
    """The holder's re-check at receipt (admit_check): None to take the handoff, else
    why not (one of REFUSALS). The origin priced this backend's queue from a load report
    up to `cache_ttl` + a report's age old, plus only its own handoffs in flight; here
    the queue is known exactly (`here`: the bridge's own requests in flight and the
    delay model's wait), so the same net gain is worked out again with it: saved minus
    the queue here beyond the origin's, minus the relay. `admit_max_wait_ms`: a queue
    here that much longer than the origin's is refused whatever the cache is worth (the
    shared cache weight prices 30-55 blocks at seconds of queue; the TTFT tail is made of
    such waits)."""
    if here.running + here.waiting > settings.max_peer_load * here.capacity:
        return "busy"
    wait_s = here.expected_wait_s if here.expected_wait_s is not None else \
        queue_wait_s(here.running, here.waiting, here.capacity, here.service_s)
    if settings.admit_max_wait_ms > 0 and \
            wait_s * 1000 - offer.wait_here_ms > settings.admit_max_wait_ms:
        return "slow"
    net = offer.saved_ms - max(0.0, wait_s * 1000 - offer.wait_here_ms) - offer.relay_ms
    return None if net >= settings.min_gain_ms else "no_gain"


# -- the cost model -----------------------------------------------------------------------
MAX_SPEED_RATIO = 8.0  # a peer's prefill priced at most 8x slower (or faster) than ours:
                       # service times also differ by the requests' mix, not speed alone


def usable_service_s(value: Any) -> float | None:
    """A holder's `service_s` in a lookup's answer, when it is a figure to price with
    (the controller validates reports; an answer from elsewhere is checked again)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and 0 < value <= MAX_SERVICE_S else None


def queue_wait_s(running: float, waiting: float, capacity: int, service_s: float) -> float:
    """Expected wait for a slot: the requests beyond the free slots, each `capacity` of
    them taking one typical request's time."""
    beyond = running + waiting - capacity + 1
    return max(0.0, beyond) / max(1, capacity) * service_s


def rendezvous(key: int, name: str) -> int:
    """Highest-random-weight score of backend `name` for the prefix ending in block `key`:
    every bridge ranks a group's holders alike without talking to the others."""
    digest = hashlib.blake2b(key.to_bytes(8, "little") + name.encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def markedly_longer(settings: HandoffSettings, longer: int, shorter: int) -> bool:
    return longer - shorter >= settings.min_extra_blocks and \
        longer >= settings.min_ratio * shorter


def home_of(keys: list[int], depth: int, holders: dict[str, int]) -> str | None:
    """The home of the prefix of `depth` blocks: of the holders of at least that many
    blocks, the one ranking highest for its last block's key."""
    if depth < 1 or depth > len(keys):
        return None
    names = [n for n, held in holders.items() if held >= depth]
    return max(names, key=lambda n: rendezvous(keys[depth - 1], n)) if names else None


def decide(settings: HandoffSettings, me: str, matches: list[dict[str, Any]],
           local: LocalLoad, relay_ms: float, pending: dict[str, int],
           block_size: int, prompt_blocks: int = 0,
           keys: list[int] | None = None, shared: bool = False,
           pressure: float | None = None) -> Decision:
    """Where the request should run: here, or a peer (see the module docstring).

    The prefix's home (with `keys` and home_weight > 0): when several backends hold
    the same longest prefix (typically an app's shared system prompt, which p2c's first
    placements copied everywhere, and a new conversation's first question), the copies
    compete for KV space with the conversations' own blocks, and under eviction pressure
    they push those out. The holders are ranked by rendezvous hash of the shared prefix;
    the first whose load allows is the prefix's home, and a handoff there is worth, on top
    of its own prefill saving, `home_weight` x the prefill of the shared blocks: what the
    copy here would cost the cache's other occupants. The other copies then age out, as
    an L7 cache-aware router's concentration would have it -- but bounded by load, since
    a home whose queue costs more than that is passed over for the next in rank.

    The cache's value (`cache_weight`; `shared_cache_weight` for a request of a shared
    address, `shared`): each block the peer holds beyond this backend is worth its
    prefill now plus that weight times it. A request served away from its prefix copies
    the whole prompt here, evicting as many blocks of other prefixes (recomputed later),
    and it costs the fabric's capacity the prefill the load's capacity estimate assumed
    saved; the greedy figure (this request's time alone) refuses a handoff to a holder
    with one more request queued even for 10-20 blocks. A shared address (an app server,
    a NAT) gets the larger weight: the switch cannot steer its conversations (one
    address, many prefixes), so a handoff is the only way any of its turns reaches its
    prefix, while a per-device client's next turn comes back by the switch's affinity.
    With `cache_weight_by_eviction`, the weight is scaled by `pressure` (this cache's
    evicted blocks per stored block, lately; None: unknown, counted full): the eviction
    the weight prices happens only in a full cache."""
    local_blocks = 0
    peers: list[Peer] = []
    for m in matches:
        if m.get("backend") == me:
            local_blocks = int(m.get("cached_blocks") or 0)
            continue
        if not m.get("trusted") or not m.get("address"):
            continue
        age = m.get("load_age_s")
        if age is None or age > settings.load_stale_s:
            continue
        peers.append(Peer(str(m["backend"]), str(m["address"]), int(m["cached_blocks"]),
                          max(1, int(m.get("capacity") or 1)), int(m.get("running") or 0),
                          int(m.get("waiting") or 0), usable_service_s(m.get("service_s"))))
    if not peers:
        return Decision("no_match" if local_blocks == 0 else "local_longest",
                        local_blocks=local_blocks, prompt_blocks=prompt_blocks)
    local_wait = local.expected_wait_s if local.expected_wait_s is not None else \
        queue_wait_s(local.running, local.waiting, local.capacity, local.service_s)
    per_block = block_size * settings.prefill_ms_per_token
    cache_weight = settings.shared_cache_weight if shared else settings.cache_weight
    if settings.cache_weight_by_eviction:
        cache_weight *= 1.0 if pressure is None else min(1.0, max(0.0, pressure))

    parts: dict[str, tuple[float, float]] = {}  # peer -> (saved ms, its queue ms)

    def speed_of(peer: Peer) -> tuple[float, float]:
        """The peer's typical request's time in a slot, and its prefill time per token as
        a multiple of ours (`peer_speed`; ours and 1 without it or its report)."""
        if not settings.peer_speed or peer.service_s is None:
            return local.service_s, 1.0
        if not local.service_measured:
            return peer.service_s, 1.0
        ratio = peer.service_s / local.service_s
        return peer.service_s, min(MAX_SPEED_RATIO, max(1 / MAX_SPEED_RATIO, ratio))

    def gain_of(peer: Peer, bonus_blocks: int) -> float:
        extra = max(0, peer.cached_blocks - local_blocks)
        busy = peer.running + peer.waiting + pending.get(peer.name, 0)
        prompt = max(prompt_blocks, peer.cached_blocks)
        service, slower = speed_of(peer)
        there = prompt - peer.cached_blocks  # the blocks the peer computes, at its speed
        stall = local.running * (prompt - local_blocks) - \
            (peer.running + pending.get(peer.name, 0)) * there * slower
        saved_ms = ((1 + cache_weight) * extra + settings.stall_weight * stall
                    + (1 - slower) * there
                    + settings.home_weight * bonus_blocks) * per_block
        peer_wait = queue_wait_s(busy, 0, peer.capacity, service)
        parts[peer.name] = (saved_ms, peer_wait * 1000)
        return saved_ms - max(0.0, peer_wait - local_wait) * 1000 - relay_ms

    def too_busy(peer: Peer) -> bool:
        busy = peer.running + peer.waiting + pending.get(peer.name, 0)
        return busy > settings.max_peer_load * peer.capacity

    # the home: holders of about the longest prefix, ranked; the first that pays is it
    home: Peer | None = None
    home_blocks = 0
    if keys and settings.home_weight > 0:
        # tied: the holders of exactly the longest prefix (an app's system prompt, for a
        # new conversation); a holder of a block more holds a conversation's own blocks,
        # and then the longest-prefix rule below applies
        depth = max([local_blocks] + [p.cached_blocks for p in peers])
        tied = [p for p in peers if p.cached_blocks == depth]
        me_tied = local_blocks == depth
        if depth >= settings.min_blocks and len(tied) + me_tied >= 2 and depth <= len(keys):
            ranked = sorted([(rendezvous(keys[depth - 1], p.name), p) for p in tied]
                            + ([(rendezvous(keys[depth - 1], me), None)] if me_tied else []),
                            key=lambda item: item[0], reverse=True)
            for _, candidate in ranked:
                if candidate is None:
                    break  # we come first: this is the home
                if not too_busy(candidate) and \
                        gain_of(candidate, depth) >= settings.min_gain_ms:
                    home, home_blocks = candidate, depth
                    break
    best: Decision | None = None
    outcome = "local_longest"
    top = max(peers, key=lambda p: p.cached_blocks)
    longest = (top.name, top.cached_blocks)
    top_gain = 0.0  # the best refused gain, for the decision's description
    for peer in peers:
        is_home = peer is home
        extra = peer.cached_blocks - local_blocks
        if extra <= 0 and not is_home:
            continue
        if not is_home and (extra < settings.min_extra_blocks
                            or peer.cached_blocks < settings.min_ratio * local_blocks):
            outcome = "short_prefix" if outcome == "local_longest" else outcome
            continue
        if too_busy(peer):
            outcome = "peer_busy"
            continue
        gain = gain_of(peer, home_blocks if is_home else 0)
        if gain < settings.min_gain_ms:
            outcome = outcome if outcome == "peer_busy" else "no_gain"
            top_gain = gain if top_gain == 0.0 else max(top_gain, gain)
            continue
        if best is None or gain > best.gain_ms:
            best = Decision("handoff", peer, gain, local_blocks=local_blocks, home=is_home,
                            saved_ms=parts[peer.name][0], wait_here_ms=local_wait * 1000,
                            wait_there_ms=parts[peer.name][1])
    if best is not None:
        best.prompt_blocks, best.longest, best.shared = prompt_blocks, longest, shared
        return best
    return Decision(outcome, local_blocks=local_blocks, gain_ms=top_gain,
                    prompt_blocks=prompt_blocks, longest=longest, shared=shared)


# -- block keys ---------------------------------------------------------------------------
def emulator_token_ids(body: dict[str, Any], tokenizer: WordTokenizer) -> list[int] | None:
    """The prompt's token ids as the emulator makes them (its word tokenizer and chat
    template), or None when the body has no prompt the emulator would take."""
    if "messages" in body:
        try:
            words = chat_words(body["messages"])
        except ValueError:
            return None
        return tokenizer.ids(words)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.ids(split(prompt))
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return list(prompt)
    return None


class _LookupCache:
    """Index answers by the prompt's last key (a chained key names the whole prefix)."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size, self.ttl = size, ttl
        self.items: collections.OrderedDict[tuple[int, int], tuple[float, list[dict]]] = \
            collections.OrderedDict()

    def get(self, keys: list[int], now: float) -> list[dict] | None:
        """The matches, unless older than the ttl."""
        item = self.items.get((len(keys), keys[-1]))
        if item is None or now - item[0] > self.ttl:
            return None
        return item[1]

    def put(self, keys: list[int], now: float, matches: list[dict]) -> None:
        self.items[(len(keys), keys[-1])] = (now, matches)
        self.items.move_to_end((len(keys), keys[-1]))
        while len(self.items) > self.size:
            self.items.popitem(last=False)


@dataclass
class Handoff:
    """One agent's handoff side: decides, and tells the bridge where to connect."""
    settings: HandoffSettings
    backend: str                                   # this agent's backend name
    session: aiohttp.ClientSession
    controller_url: str
    token: str | None
    vllm_url: str
    local_load: Callable[[], LocalLoad]
    block_size: Callable[[], int | None] = lambda: None  # the KV events' block size
    # this backend's own block keys (its KV events), when the agent follows them: a prompt
    # held here nearly whole needs no lookup, no peer can hold markedly more
    local_keys: Callable[[], Container[int] | None] = lambda: None
    # this cache's eviction pressure (KvBlockSet.eviction_pressure), when the agent
    # follows its KV events; None: unknown
    eviction_pressure: Callable[[], float | None] = lambda: None
    metrics: HandoffMetrics = field(init=False)
    pending: dict[str, int] = field(default_factory=dict)  # handoffs in flight per peer
    relay_ms: float = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = HandoffMetrics(self.backend)
        self.relay_ms = self.settings.relay_ms
        self._tokenizer = WordTokenizer(max_reverse=1)
        self._hashers: dict[int, BlockHasher] = {}
        self._cache = _LookupCache(self.settings.cache_size, self.settings.cache_ttl)
        self._lookups = 0
        # prefix groups' homes as the last lookups ranked them: the key of a shared
        # prefix's last block -> (when, the home by rendezvous among its holders)
        self._homes: collections.OrderedDict[int, tuple[float, str]] = \
            collections.OrderedDict()
        self.shared_clients = SharedClients(self.settings.shared_client_s)

    def note_shared(self, client: str, now: float | None = None) -> None:
        """`client` is a shared address: its requests are weighed with
        `shared_cache_weight` for `shared_client_s` (0: never)."""
        self.shared_clients.mark(client, now)

    def is_shared(self, client: str, now: float | None = None) -> bool:
        return self.shared_clients.holds(client, now)

    def wants(self, tenant: Tenant, body: dict | None) -> bool:
        return tenant.prefix_affinity and body is not None

    def _hasher(self) -> BlockHasher:
        size = self.block_size() or self.settings.block_size
        hasher = self._hashers.get(size)
        if hasher is None:
            hasher = self._hashers[size] = BlockHasher(size, self.settings.hash_algo)
        return hasher

    async def keys(self, body: dict[str, Any]) -> list[int] | None:
        if self.settings.tokenizer == "emulator":
            ids = emulator_token_ids(body, self._tokenizer)
        else:
            ids = await self._vllm_token_ids(body)
        if ids is None:
            return None
        size = self._hasher().block_size
        return self._hasher().keys(ids[:MAX_KEYS * size])

    async def _vllm_token_ids(self, body: dict[str, Any]) -> list[int] | None:
        """vLLM's own tokenizer: its /tokenize (one loopback call, within the budget)."""
        ask: dict[str, Any] = {k: body[k] for k in ("model", "messages", "prompt") if k in body}
        if not isinstance(ask.get("prompt", ""), str):
            return None
        try:
            async with self.session.post(
                    self.vllm_url.rstrip("/") + "/tokenize", json=ask,
                    timeout=aiohttp.ClientTimeout(total=self.settings.lookup_timeout)) as r:
                if r.status != 200:
                    return None
                tokens = (await r.json(content_type=None)).get("tokens")
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return None
        return tokens if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens) \
            else None

    async def choose(self, body: dict[str, Any], client: str = "") -> Decision:
        """The decision for one request of `client` (never raises, never waits past the
        budget)."""
        started = time.monotonic()
        shared = self.is_shared(client, started)
        keys = await self.keys(body)
        decision = Decision("not_tokenized") if keys is None else \
            await self._choose(keys, shared, started)
        decision.shared = shared
        if keys is not None and len(keys) >= self.settings.min_blocks:
            decision.keys = keys  # claimed where it is served (hostagent/prefix_claims.py)
        return self._done(decision)

    async def _choose(self, keys: list[int], shared: bool, started: float) -> Decision:
        if len(keys) < self.settings.min_blocks:
            return Decision("short_prompt", prompt_blocks=len(keys))
        held = self._held_here(keys)
        if len(keys) - held < self.settings.min_extra_blocks and \
                not self._home_elsewhere(keys, held, started):
            return Decision("local_longest", local_blocks=held, prompt_blocks=len(keys))
        matches = self._cache.get(keys, started)
        if matches is None:
            if self._lookups >= self.settings.max_lookups:
                return Decision("lookup_busy", local_blocks=held, prompt_blocks=len(keys))
            self._lookups += 1
            try:
                matches = await self._lookup(keys)
            finally:
                self._lookups -= 1
            if matches is None:
                return Decision("lookup_failed", local_blocks=held,
                                prompt_blocks=len(keys))
            self._cache.put(keys, time.monotonic(), matches)
            self.metrics.lookup_seconds.labels(self.backend).observe(
                time.monotonic() - started)
        decision = decide(self.settings, self.backend, matches, self.local_load(),
                          self.relay_ms, self.pending, self._hasher().block_size,
                          len(keys), keys, shared=shared,
                          pressure=self.eviction_pressure())
        self._learn_homes(keys, matches, max(held, decision.local_blocks), started)
        decision.lookup_ms = (time.monotonic() - started) * 1000
        return decision

    def _home_elsewhere(self, keys: list[int], held: int, now: float) -> bool:
        """Held here nearly whole -- but is the prompt just a shared prefix (an app's
        system prompt and a new question) whose home is another backend? Then a lookup is
        worth it (the home may take it). The deepest group this bridge has ranked within
        the held blocks says: none known, or held markedly beyond it (the conversation's
        own blocks are here), or its home is here: no."""
        if self.settings.home_weight <= 0:
            return False
        for depth in range(held, self.settings.min_blocks - 1, -1):
            known = self._homes.get(keys[depth - 1])
            if known is None or now - known[0] > self.settings.home_cache_s:
                continue
            if known[1] == self.backend or \
                    markedly_longer(self.settings, held, depth):
                return False
            return True
        return held < len(keys)  # a group never ranked here: ask once, learn its home

    def _learn_homes(self, keys: list[int], matches: list[dict], held: int,
                     now: float) -> None:
        """Remember the home of each prefix depth the holders in `matches` share."""
        if self.settings.home_weight <= 0:
            return
        holders = {str(m["backend"]): int(m.get("cached_blocks") or 0) for m in matches
                   if m.get("trusted") and m.get("backend") != self.backend}
        if held:
            holders[self.backend] = held
        for depth in sorted(set(holders.values()))[:16]:
            if depth < self.settings.min_blocks:
                continue
            home = home_of(keys, depth, holders)
            if home is not None:
                self._homes[keys[depth - 1]] = (now, home)
                self._homes.move_to_end(keys[depth - 1])
        while len(self._homes) > self.settings.cache_size:
            self._homes.popitem(last=False)

    def _held_here(self, keys: list[int]) -> int:
        local = self.local_keys()
        if local is None:
            return 0
        held = 0
        for key in keys:
            if key not in local:
                break
            held += 1
        return held

    def _done(self, decision: Decision) -> Decision:
        if decision.decision != "handoff":
            self.metrics.decided(decision.decision)
        return decision

    async def _lookup(self, keys: list[int]) -> list[dict] | None:
        """The index's matches, or None (the reason counted in `lookup_failures`)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        reason = "bad_answer"
        try:
            async with self.session.post(
                    self.controller_url.rstrip("/") + "/api/v1/prefix-index/lookup",
                    json={"block_hashes": keys}, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.settings.lookup_timeout)) as r:
                if r.status != 200:
                    log.debug("prefix lookup answered %d", r.status)
                    self.metrics.lookup_failed("status")
                    return None
                answer = await r.json(content_type=None)
        except TimeoutError:
            reason = "timeout"
        except aiohttp.ClientResponseError:  # a malformed answer (bad headers, JSON type)
            reason = "bad_answer"
        except aiohttp.ClientError as exc:
            log.debug("prefix lookup failed: %s", exc)
            reason = "connection"
        except ValueError:
            reason = "bad_answer"
        else:
            matches = answer.get("matches") if isinstance(answer, dict) else None
            if isinstance(matches, list):
                return [m for m in matches if isinstance(m, dict)]
        self.metrics.lookup_failed(reason)
        return None

    # -- the relay's bookkeeping ---------------------------------------------------------
    def begin(self, peer: Peer) -> None:
        self.pending[peer.name] = self.pending.get(peer.name, 0) + 1

    def end(self, peer: Peer) -> None:
        left = self.pending.get(peer.name, 0) - 1
        if left > 0:
            self.pending[peer.name] = left
        else:
            self.pending.pop(peer.name, None)

    def relayed(self, peer: Peer, tenant: Tenant, added_s: float,
                home: bool = False) -> None:
        """A handoff that added `added_s` (decision and connect) is streaming back; `home`:
        to the prefix's home (the peer held about as much as this backend)."""
        self.metrics.decided("handoff_home" if home else "handoff")
        self.metrics.handed(peer.name, tenant.name)
        self.metrics.relay_seconds.labels(self.backend).observe(added_s)
        self.relay_ms += RELAY_SMOOTHING * (added_s * 1000 - self.relay_ms)

    def failed(self) -> None:
        """The peer could not be reached: served here."""
        self.metrics.decided("relay_failed")
        self.metrics.relay_failed("connect")

    def broke(self, reason: str) -> None:
        """A relay that reached the peer ended abnormally (RELAY_FAILURES; the bridge logs
        it): the handoff stays counted as made, the failure by its reason."""
        self.metrics.relay_failed(reason)

    def header(self, tenant: Tenant, body: bytes, client: str,
               decision: Decision | None = None) -> str:
        """The signed handoff header; with admit_check, the decision's valuation in it."""
        valuation = None
        if self.settings.admit_check and decision is not None:
            valuation = Valuation(decision.saved_ms, decision.wait_here_ms,
                                  decision.wait_there_ms, self.relay_ms)
        return sign(self.settings.secret, self.backend, tenant.tenant_id, body, client=client,
                    valuation=valuation)

    def refused_by_peer(self) -> None:
        """The holder refused at receipt (admit_check): served here."""
        self.metrics.decided("peer_refused")

    def summary(self) -> dict[str, Any]:
        """For the agent's report and logs: counts by decision, sent, received, and the
        affinity reports' by outcome."""
        out: dict[str, dict[str, int]] = {"decision": {}, "sent": {}, "received": {},
                                          "affinity": {}, "lookup_failed": {}, "refused": {},
                                          "relay_failures": {}}
        for (kind, name), n in self.metrics.counts.items():
            out.setdefault(kind, {})[name] = n
        return {**out, "relay_ms": round(self.relay_ms, 3)}
