"""The bench's miss analysis (tokenfabric/lab/prefix_misses.py) on planned requests whose
prefixes are known: what could have hit, what did, and why not."""

from __future__ import annotations

import collections
import json

from tokenfabric.lab.prefix_misses import describe, miss_causes, request_keys
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
