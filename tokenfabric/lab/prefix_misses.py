"""Where a run's prefix-cache hits went missing (issue 15): per request, the longest
prefix any backend *could* have held (the requests served before it, by backend, no
eviction) against what the request got, and why -- served on that backend but its blocks
evicted, or served elsewhere, and then what the bridge decided (the bridge's
X-Tokenfabric-Handoff-Decision header: no_gain, peer_busy, lookup_failed, ...).

The "could" is an upper bound: a backend holds the prompt blocks of every request it
served before (the emulator caches prompt blocks only), as block keys computed the way
the bridge and the emulator compute them (hostagent/handoff.emulator_token_ids, vLLM's
chained block hashes). A request whose predecessor is still in prefill is counted as if
its blocks were there.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from tokenfabric.blockhash import BlockHasher
from tokenfabric.hostagent.handoff import emulator_token_ids
from tokenfabric.hostagent.wordtok import WordTokenizer
from tokenfabric.lab.loadgen import PlannedRequest
from tokenfabric.lab.workloads import Planned


def request_keys(planned: Sequence[Planned | PlannedRequest], endpoint: str,
                 block_size: int = 16) -> list[list[int]]:
    """Each planned request's prompt block keys, as the bridge computes them (the bench's
    Planned, or the lab's loadgen schedule)."""
    tokenizer, hasher = WordTokenizer(max_reverse=1), BlockHasher(block_size)
    out = []
    for p in planned:
        body: dict[str, Any] = {"messages": p.messages or [{"role": "user",
                                                            "content": p.prompt}]} \
            if endpoint == "chat" else {"prompt": p.prompt}
        ids = emulator_token_ids(body, tokenizer) or []
        out.append(hasher.keys(ids))
    return out


def _held(keys: list[int], stored: set[int]) -> int:
    held = 0
    for key in keys:
        if key not in stored:
            break
        held += 1
    return held


def _cause(record: dict[str, Any]) -> str:
    """The first bridge's decision, from its header ("no_gain; blocks=..." -> no_gain)."""
    value = record.get("decision")
    if not value:
        return "no_decision"
    return str(value).split(";", 1)[0].strip()


def miss_causes(records: Sequence[dict[str, Any]], keys: Sequence[list[int]],
                block_size: int = 16) -> dict[str, dict[str, Any]]:
    """Per tenant: prompt tokens, the upper bound of hits ("possible"), the hits got, and
    the tokens lost by cause -- `evicted` (served on a backend holding the longest
    possible prefix, fewer hits than that), `away:<decision>` (served where less was
    held; the decision of the bridge the switch chose; `away:handed` when a handoff
    went to a shorter holder). `records` are indexed like `keys` by their `id`."""
    stored: dict[str, set[int]] = collections.defaultdict(set)
    out: dict[str, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: r.get("start") or 0.0):
        index = record.get("id")
        if not record.get("ok") or index is None or index >= len(keys):
            continue
        prompt_keys, backend = keys[index], str(record.get("backend") or "?")
        possible = max((_held(prompt_keys, s) for s in stored.values()), default=0)
        here = _held(prompt_keys, stored[backend])
        stored[backend].update(prompt_keys)
        prompt = int(record.get("prompt_tokens") or 0)
        # vLLM computes at least the prompt's last token: a whole-prompt match hits one less
        possible_tokens = min(possible * block_size, max(0, prompt - 1))
        got = int(record.get("cached_tokens") or 0)
        tenant = out.setdefault(str(record.get("tenant")), {
            "requests": 0, "prompt_tokens": 0, "possible": 0, "hits": 0,
            "lost": collections.Counter(), "requests_by_cause": collections.Counter()})
        tenant["requests"] += 1
        tenant["prompt_tokens"] += prompt
        tenant["possible"] += possible_tokens
        tenant["hits"] += got
        lost = possible_tokens - got
        if lost <= 0:
            continue
        if here >= possible:
            cause = "evicted"
        elif record.get("handoff_from"):
            cause = "away:handed"
        else:
            cause = "away:" + _cause(record)
        tenant["lost"][cause] += lost
        tenant["requests_by_cause"][cause] += 1
    return out


def describe(causes: dict[str, dict[str, Any]]) -> list[str]:
    """Lines for the bench's report: per tenant, hits / possible / prompt and the lost
    tokens by cause, largest first, as points of the tenant's hit rate."""
    lines = []
    for tenant, t in sorted(causes.items()):
        prompt = max(1, t["prompt_tokens"])
        # Counters, or plain dicts once read back from a run's JSON (the lab's prefix.json)
        lost = ", ".join(f"{cause} {n / prompt * 100:.1f} ({t['requests_by_cause'][cause]})"
                         for cause, n in collections.Counter(t["lost"]).most_common())
        lines.append(f"      misses {tenant}: hit {t['hits'] / prompt * 100:.1f}% of "
                     f"possible {t['possible'] / prompt * 100:.1f}% ({t['requests']} req); "
                     f"lost points (requests): {lost or '-'}")
    return lines


def system_copies(records: Sequence[dict[str, Any]], planned: Sequence[Planned],
                  keys: Sequence[list[int]], block_size: int = 16) -> dict[str, Any]:
    """The chat's system prompts computed again: per app (its system message), the
    requests that found fewer cached tokens than the blocks all of the app's requests
    share (its system prompt), beyond the app's first (which no router can avoid). Each is
    a copy onto another backend (or a recompute after eviction): a one-time cost per app
    and backend, which a longer run dilutes. `points`: their uncached system-prompt tokens
    as points of the run's hit rate (all prompt tokens). `records` are indexed like
    `planned` and `keys` by their `id`."""
    apps: dict[str, list[int]] = collections.defaultdict(list)
    for index, p in enumerate(planned):
        if p.messages and p.messages[0].get("role") == "system":
            apps[p.messages[0]["content"]].append(index)
    shared: dict[int, tuple[int, int]] = {}  # request -> (its app's number, shared tokens)
    for number, members in enumerate(apps.values()):
        common = keys[members[0]] if members else []
        depth = len(common)
        for index in members[1:]:
            depth = min(depth, _held(keys[index], set(common[:depth])))
        for index in members:
            shared[index] = (number, depth * block_size)
    copies, lost, prompt = 0, 0, 0
    seen: set[int] = set()
    for record in sorted(records, key=lambda r: r.get("start") or 0.0):
        rid = record.get("id")
        if not record.get("ok") or rid is None:
            continue
        prompt += int(record.get("prompt_tokens") or 0)
        if rid not in shared or shared[rid][1] == 0:
            continue
        app, tokens = shared[rid]
        got = int(record.get("cached_tokens") or 0)
        if got < tokens and app in seen:
            copies += 1
            lost += tokens - got
        seen.add(app)
    return {"apps": len(apps), "copies": copies,
            "points": lost / prompt * 100 if prompt else 0.0}
