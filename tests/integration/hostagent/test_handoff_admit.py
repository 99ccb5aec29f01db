"""The holder's re-check of a handoff at receipt (`admit_check`), live: a real controller,
two emulators with KV events, two agents on 127.0.0.1 and 127.0.0.2 (the rig of
test_handoff.py).

gpu1's bridge values gpu2's cached prefix so highly (its cache weight) that it hands the
request over even though gpu2's last load report shows it busy; gpu2's bridge knows its
own queue exactly -- its slots full of requests it relays -- and, over its
`max_peer_load`, refuses at receipt (503, X-Tokenfabric-Handoff-Refused) before anything
reaches its vLLM. gpu1 serves the request itself: the stream comes back whole, charged
once, by gpu1; the counters show both sides. A valuation changed on the way is a forged
signature (403)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.hostagent.test_handoff import (
    CAPACITY,
    SECRET,
    Rig,
    completion,
    wait_for,
    words,
)
from tokenfabric.hostagent.handoff import Valuation, sign

ORIGIN = {"admit_check": True, "max_peer_load": 100.0, "cache_weight": 1000.0,
          "shared_cache_weight": 1000.0}
HOLDER = {"admit_check": True, "max_peer_load": 0.5}  # over 1 request on 2 slots: busy


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rig = Rig(tmp_path_factory.mktemp("handoff-admit"))
    try:
        rig.start({1: ORIGIN, 2: HOLDER})
        yield rig
    finally:
        rig.stop()


def _hits(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def test_an_idle_holder_takes_the_handoff_after_its_re_check(rig):
    system = words("admA", 1600)  # 100 blocks
    rig.warm("gpu2", system + " first")
    reply, events = completion(rig, system + " second", max_tokens=12)
    assert reply.headers["x-tokenfabric-backend"] == "gpu2"
    assert reply.headers["x-tokenfabric-handoff-from"] == "gpu1"
    assert len([e for e in events if e.get("choices")]) == 12
    assert rig.metric("gpu2", r'tokenfabric_handoffs_received_total\{.*origin="gpu1"') == 1
    assert rig.metric("gpu2", r'tokenfabric_handoffs_refused_total\{.*reason="(busy|no_gain)"'
                      ) == 0


def test_a_saturated_holder_refuses_at_receipt_and_the_origin_serves_it_whole(rig):
    system = words("admB", 1600)
    rig.warm("gpu2", system + " first")
    with gpu2_full(rig):
        gpu2_hits = _hits(rig.emulators["gpu2"].metrics())
        rig.sinks["gpu1"].drain()
        rig.sinks["gpu2"].drain()
        n1, n2 = len(rig.sinks["gpu1"].usage), len(rig.sinks["gpu2"].usage)
        received = rig.metric("gpu2", r"tokenfabric_handoffs_received_total")

        started = time.monotonic()
        reply, events = completion(rig, system + " second", max_tokens=12)
        took = time.monotonic() - started
        assert reply.status_code == 200
        assert reply.headers["x-tokenfabric-backend"] == "gpu1"
        assert "x-tokenfabric-handoff-from" not in reply.headers
        assert reply.headers["x-tokenfabric-handoff-decision"].startswith("peer_refused; ")
        assert len([e for e in events if e.get("choices")]) == 12  # whole, once
        [usage] = [e["usage"] for e in events if e.get("usage")]
        assert usage["completion_tokens"] == 12
        assert took < 5.0  # not queued behind gpu2's 8-s fillers
        # the refusal: counted at both ends; nothing reached gpu2's vLLM
        assert rig.metric("gpu1", r'tokenfabric_handoff_decisions_total\{.*'
                          r'decision="peer_refused"') == 1
        assert rig.metric("gpu2", r'tokenfabric_handoffs_refused_total\{.*reason="busy"') == 1
        assert rig.metric("gpu2", r"tokenfabric_handoffs_received_total") == received
        assert _hits(rig.emulators["gpu2"].metrics()) == gpu2_hits

        # charged once, by gpu1 (tenant 5), and by gpu2 not at all
        def charged() -> bool:
            got = rig.sinks["gpu1"].drain()[n1:]
            return sum(b.completion_tokens for b in got if b.tenant_id == 5) == 12
        wait_for(charged, "gpu1's USAGE beacons")
        time.sleep(0.5)
        assert [b for b in rig.sinks["gpu2"].drain()[n2:] if b.tenant_id == 5] == []


def test_a_valuation_changed_on_the_way_is_refused_as_forged(rig):
    url = f"http://127.0.0.2:{rig.handoff_port}/v1/completions"
    body = json.dumps({"model": "tiny", "prompt": "hello there", "max_tokens": 1}).encode()
    signed = sign(SECRET.encode(), "gpu1", 5, body, valuation=Valuation(10.0, 0.0, 0.0, 3.0))
    before = rig.metric("gpu2", r'tokenfabric_handoffs_refused_total\{.*reason="signature"')
    forged = re.sub(r"saved=[0-9.]+", "saved=999999.0", signed)
    assert forged != signed
    reply = httpx.post(url, content=body, timeout=10, headers={"X-Tokenfabric-Handoff": forged})
    assert reply.status_code == 403
    assert rig.metric("gpu2", r'tokenfabric_handoffs_refused_total\{.*reason="signature"'
                      ) == before + 1
    # the same header as signed: taken (gpu2 idle again; 10 ms saved pays at idle)
    wait_for(lambda: _running(rig) == 0 or None, "gpu2 idle", timeout=15)
    reply = httpx.post(url, content=body, timeout=10, headers={"X-Tokenfabric-Handoff": signed})
    assert reply.status_code == 200 and reply.headers["x-tokenfabric-backend"] == "gpu2"
    # one that no longer pays at the holder: 503 with the reason, nothing served
    poor = sign(SECRET.encode(), "gpu1", 5, body, valuation=Valuation(1.0, 0.0, 0.0, 3.0))
    reply = httpx.post(url, content=body, timeout=10, headers={"X-Tokenfabric-Handoff": poor})
    assert reply.status_code == 503
    assert reply.headers["x-tokenfabric-handoff-refused"] == "no_gain"
    assert reply.json()["error"]["type"] == "handoff_refused"


@contextlib.contextmanager
def gpu2_full(rig: Rig) -> Iterator[None]:
    """gpu2's slots busy for ~8 s with requests through gpu2's own bridge (so its bridge
    knows them exactly), of tenant plain (not opted in); the fillers ended after."""
    fillers = [subprocess.Popen(
        [sys.executable, "-c", "import httpx,sys; httpx.post(sys.argv[1], timeout=60, "
         "headers={'X-Tokenfabric-Tenant': 'plain'}, json={'model': 'tiny', 'prompt': "
         "'fill ' + sys.argv[2], 'max_tokens': 400, 'ignore_eos': True})",
         rig.bridges["gpu2"] + "/v1/completions", str(k)]) for k in range(CAPACITY)]
    try:
        wait_for(lambda: _running(rig) == CAPACITY or None, "gpu2's slots filled", timeout=10)
        yield
    finally:
        for proc in fillers:
            proc.kill()
            proc.wait(timeout=5)


def _running(rig: Rig) -> float:
    return sum(float(line.rsplit(" ", 1)[1])
               for line in rig.emulators["gpu2"].metrics().splitlines()
               if line.startswith("vllm:num_requests_running"))
