"""Prefix claims, live: a real controller, two real emulators publishing KV events, two
real agents on 127.0.0.1 and 127.0.0.2 (the rig of test_handoff.py).

gpu1 is busy (both slots running long generations), so a request with a long new prompt
that lands on gpu1's bridge waits in gpu1's queue: its blocks are not cached, nor
reported, until the fillers finish. With `claim: true` gpu1's agent claims the prompt's
blocks in the controller's index at once, so a second request with the same prefix that
lands on gpu2's bridge meanwhile is handed to gpu1 -- where its prefix will be, as an L7
cache-aware router would have sent it -- and gpu1's agent claims that one too on receipt.
With `claim: false` the index knows no holder until gpu1's report, and the second
request is served on gpu2, away from its prefix (the bench's `away:local_longest`)."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.hostagent.test_handoff import CAPACITY, Rig, wait_for, words


def claim_rig(tmp_path, claim: bool) -> Rig:
    """The controller, two emulators and agents; gpu1 claims (or not), gpu2 decides with
    the cache weighed (a queued holder of 100 blocks is worth its queue)."""
    rig = Rig(tmp_path)
    try:
        rig.start({1: {"claim": claim, "home_weight": 0.0},
                   2: {"claim": claim, "home_weight": 0.0, "cache_weight": 64.0,
                       "max_peer_load": 4.0}})
    except BaseException:
        rig.stop()
        raise
    return rig


def streamed(rig: Rig, bridge: str, prompt: str, client: str) -> tuple[dict, int]:
    """A streamed completion through `bridge`'s bridge: its headers and token chunks."""
    with httpx.stream("POST", rig.bridges[bridge] + "/v1/completions", timeout=60,
                      headers={"X-Tokenfabric-Tenant": "chat", "X-Tokenfabric-Client": client},
                      json={"model": "tiny", "prompt": prompt, "max_tokens": 4,
                            "stream": True, "ignore_eos": True}) as reply:
        assert reply.status_code == 200
        chunks = sum(1 for line in reply.iter_lines()
                     if line.startswith("data: ") and line != "data: [DONE]")
        return dict(reply.headers), chunks


def gauge(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def match_of(rig: Rig, prompt: str, backend: str) -> dict | None:
    found = rig.viewer.post("/api/v1/prefix-index/lookup",
                            json={"block_hashes": rig.keys(prompt)}).json()
    return next((m for m in found["matches"] if m["backend"] == backend), None)


@pytest.mark.parametrize("claim", [True, False], ids=["claim", "no-claim"])
def test_a_prompt_queued_on_its_backend_draws_the_next_one_with_its_prefix(tmp_path, claim):
    rig = claim_rig(tmp_path, claim)
    fillers: list[subprocess.Popen] = []
    try:
        # gpu1's two slots busy for ~5 s (250 decode steps of 20 ms)
        fillers = [subprocess.Popen(
            [sys.executable, "-c", "import httpx,sys; httpx.post(sys.argv[1], timeout=60, "
             "json={'model': 'tiny', 'prompt': 'fill ' + sys.argv[2], 'max_tokens': 250, "
             "'ignore_eos': True})", rig.emulators["gpu1"].url + "/v1/completions", str(k)])
            for k in range(CAPACITY)]
        wait_for(lambda: gauge(rig.emulators["gpu1"].metrics(),
                               "vllm:num_requests_running") == CAPACITY or None,
                 "gpu1's slots filled", timeout=10)
        system = words("sysK" if claim else "sysL", 1600)  # 100 blocks
        first = system + " first question"
        second = system + " " + words("askK", 64)           # 104 blocks, 100 shared
        with ThreadPoolExecutor(2) as pool:
            landed = pool.submit(streamed, rig, "gpu1", first, "10.0.1.60")
            # gpu1's bridge served it (no holder anywhere: no_match): queued in gpu1
            wait_for(lambda: gauge(rig.emulators["gpu1"].metrics(),
                                   "vllm:num_requests_waiting") == 1 or None,
                     "the first request in gpu1's queue", timeout=10)
            if claim:
                # before any of its blocks exist, the index counts them as gpu1's, claimed
                def claimed() -> dict | None:
                    m = match_of(rig, first, "gpu1")
                    return m if m and m["claimed_blocks"] == 100 else None
                m = wait_for(claimed, "gpu1's claim in the index", timeout=3)
                assert m["trusted"] and m["cached_blocks"] == 100
            else:
                assert match_of(rig, first, "gpu1") is None
            assert gauge(rig.emulators["gpu1"].metrics(), "vllm:num_requests_waiting") == 1
            hits_before = gauge(rig.emulators["gpu1"].metrics(), "vllm:prefix_cache_hits_total")
            # the same prefix lands on gpu2's bridge while the first still waits
            follow = pool.submit(streamed, rig, "gpu2", second, "10.0.1.61")
            if claim:
                # handed to gpu1, whose agent claims its 4 further blocks on receipt
                def receipt() -> dict | None:
                    m = match_of(rig, second, "gpu1")
                    return m if m and m["cached_blocks"] == 104 else None
                wait_for(receipt, "gpu1's claim of the handed request", timeout=3)
            (first_headers, first_chunks) = landed.result(timeout=30)
            (headers, chunks) = follow.result(timeout=30)
        assert first_headers["x-tokenfabric-backend"] == "gpu1"
        assert first_headers["x-tokenfabric-handoff-decision"].startswith("no_match")
        assert first_chunks == chunks == 4
        decision = headers["x-tokenfabric-handoff-decision"]
        if claim:
            assert headers["x-tokenfabric-backend"] == "gpu1"
            assert headers["x-tokenfabric-handoff-from"] == "gpu2"
            assert re.match(r"handoff; blocks=104; here=0; longest=gpu1:100; ", decision)
            # and there it hit the first request's blocks
            hits = gauge(rig.emulators["gpu1"].metrics(), "vllm:prefix_cache_hits_total")
            assert hits - hits_before >= 1600 - 16
            assert rig.metric("gpu1", r'tokenfabric_prefix_claims_total\{.*outcome="sent"'
                              ) == 2
            # the reports confirmed the claims: nothing left pending
            def confirmed() -> dict | None:
                view = rig.viewer.get("/api/v1/prefix-index").json()["backends"]["gpu1"]
                return view if view["claimed_blocks"] == 0 else None
            view = wait_for(confirmed, "gpu1's claims confirmed by its KV reports")
            # 100 claimed by the first, 104 by the handed one (its 100 shared keys again)
            assert view["claims"] == 100 + 104 and view["claims_confirmed"] == 104
        else:
            # no holder known while the first waited: served where it landed, no hit
            assert headers["x-tokenfabric-backend"] == "gpu2"
            assert decision.startswith("no_match")
            assert rig.metric("gpu1", r"tokenfabric_prefix_claims_total") == 0
    finally:
        for proc in fillers:
            proc.kill()
            proc.wait(timeout=5)
        rig.stop()
