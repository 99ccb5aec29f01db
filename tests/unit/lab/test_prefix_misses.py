"""The bench's miss analysis (tokenfabric/lab/prefix_misses.py) on planned requests whose
prefixes are known: what could have hit, what did, and why not."""

from __future__ import annotations

import collections
import json

from tokenfabric.lab.prefix_misses import describe, miss_causes, request_keys, system_copies
from tokenfabric.lab.workloads import Planned


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


SYSTEM = words("sys", 64)  # 4 blocks of 16


def test_block_keys_are_the_bridges_and_share_the_common_prefix():
    planned = [Planned(0.0, SYSTEM + " " + words("a", 32), 4),
               Planned(1.0, SYSTEM + " " + words("b", 32), 4)]
    first, second = request_keys(planned, "completions")
    assert len(first) == len(second) == 6
    assert first[:4] == second[:4] and first[4] != second[4]
    chat = request_keys([Planned(0.0, SYSTEM, 4, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}])], "chat")
    assert len(chat[0]) >= 4 and chat[0][:4] != first[:4]  # the template's tokens lead


def _record(i: int, start: float, backend: str, prompt: int, cached: int,
            decision: str | None = None, handed_from: str | None = None,
            tenant: str = "app") -> dict:
    return {"id": i, "start": start, "ok": True, "backend": backend, "tenant": tenant,
            "prompt_tokens": prompt, "cached_tokens": cached, "decision": decision,
            "handoff_from": handed_from}


def test_lost_hits_are_split_into_evicted_and_served_away_by_the_bridges_decision():
    turn1 = SYSTEM + " " + words("t1", 32)              # 96 tokens, 6 blocks
    turn2 = turn1 + " " + words("t2", 32)               # 128 tokens, 8 blocks
    turn3 = turn2 + " " + words("t3", 32)               # 160 tokens, 10 blocks
    other = SYSTEM + " " + words("o", 32)
    planned = [Planned(0.0, p, 4) for p in (turn1, turn2, turn3, other, turn3)]
    keys = request_keys(planned, "completions")
    records = [
        _record(0, 0.0, "b1", 96, 0, "no_match"),        # nothing before: nothing lost
        _record(1, 1.0, "b2", 128, 0, "no_gain; blocks=8; here=0; longest=b1:6"),
        _record(2, 2.0, "b2", 160, 64, "local_longest"),  # b2 held 8 blocks: evicted
        _record(3, 3.0, "b3", 96, 0, "handoff", "b4"),   # handed to b3, holding nothing
        _record(4, 4.0, "b2", 160, 159, "local_longest", tenant="dev"),  # all it could
    ]
    got = miss_causes(records, keys)
    app = got["app"]
    assert app["requests"] == 4 and app["prompt_tokens"] == 96 + 128 + 160 + 96
    # possible: 0, 96 (b1's 6 blocks), 128 (b2's 8), 64 (the system prompt anywhere)
    assert app["possible"] == 0 + 96 + 128 + 64 and app["hits"] == 0 + 0 + 64 + 0
    assert app["lost"] == {"away:no_gain": 96, "evicted": 64, "away:handed": 64}
    assert app["requests_by_cause"] == {"away:no_gain": 1, "evicted": 1, "away:handed": 1}
    # a whole prompt held: vLLM computes its last token, so 159 of 160 is everything
    assert got["dev"]["possible"] == 159 and got["dev"]["lost"] == {}
    [app_line, dev_line] = describe(got)
    assert "misses app: hit 13.3% of possible 60.0% (4 req)" in app_line
    assert "away:no_gain 20.0 (1), evicted 13.3 (1), away:handed 13.3 (1)" in app_line
    assert dev_line.endswith("lost points (requests): -")


def test_failed_requests_and_unknown_ids_are_left_out():
    keys = request_keys([Planned(0.0, SYSTEM, 4)], "completions")
    records = [{**_record(0, 0.0, "b1", 64, 0), "ok": False}, _record(7, 1.0, "b1", 64, 0)]
    assert miss_causes(records, keys) == {}


def test_the_description_reads_causes_back_from_json():
    """The lab writes each run's causes into prefix.json and describes them from there:
    plain dicts, not Counters."""
    causes = {"devices": {"requests": 3, "prompt_tokens": 1000, "possible": 800, "hits": 600,
                          "lost": collections.Counter({"evicted": 120, "away:no_gain": 80}),
                          "requests_by_cause": collections.Counter({"evicted": 1,
                                                                    "away:no_gain": 2})}}
    again = json.loads(json.dumps(causes))
    assert describe(again) == describe(causes)
    assert "evicted 12.0 (1), away:no_gain 8.0 (2)" in describe(again)[0]


def _chat(app: str, question: str, at: float) -> Planned:
    system = words(app, 64)  # 4 blocks of the app's system prompt
    return Planned(at, question, 4, messages=[{"role": "system", "content": system},
                                              {"role": "user", "content": question}])


def test_system_prompt_copies_beyond_each_apps_first_are_counted_with_their_points():
    planned = [_chat("appA", words("q1", 40), 0.0), _chat("appA", words("q2", 40), 1.0),
               _chat("appA", words("q3", 40), 2.0), _chat("appB", words("q4", 40), 3.0),
               _chat("appB", words("q5", 40), 4.0), Planned(5.0, words("plain", 80), 4)]
    keys = request_keys(planned, "chat")
    # the app's shared blocks: its system prompt (and the template's lead), not a question
    depth = next(i for i, (a, b) in enumerate(zip(keys[0], keys[1], strict=False)) if a != b)
    assert depth >= 4
    shared = depth * 16
    prompt = 120
    records = [
        _record(0, 0.0, "b1", prompt, 0),         # appA's first: computed anywhere
        _record(1, 1.0, "b1", prompt, shared),    # found it
        _record(2, 2.0, "b2", prompt, 16),        # a copy onto b2 (one block cached)
        _record(3, 3.0, "b3", prompt, 0),         # appB's first
        _record(4, 4.0, "b4", prompt, 0),         # a copy onto b4
        _record(5, 5.0, "b4", 80, 0),             # no system prompt: never a copy
    ]
    got = system_copies(records, planned, keys)
    assert got["apps"] == 2 and got["copies"] == 2
    total = 5 * prompt + 80
    assert abs(got["points"] - ((shared - 16) + shared) / total * 100) < 1e-9
    # a run where every request after each app's first found its system prompt: none
    clean = [dict(r, cached_tokens=shared) if r["id"] in (2, 4) else r for r in records]
    assert system_copies(clean, planned, keys)["copies"] == 0
    # failed requests count for nothing
    failed = [dict(r, ok=False) if r["id"] in (2, 4) else r for r in records]
    assert system_copies(failed, planned, keys)["copies"] == 0
