"""Billing against the network on a real OVS bridge: two backends stream SSE-sized
events per token over direct server return; one bills what it streamed, the other three
times as much. The controller's port counters (OpenFlow port statistics) flag the liar
within one cross-check interval, never the honest one; REST, metric and audit say so."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.crosscheck_rig import billing_controller
from tests.integration.openflow.conftest import POLICY, VIP, VIP_PORT, model_of
from tokenfabric.controller.app import make_southbound

pytestmark = [pytest.mark.ovs, pytest.mark.timeout(240)]

TOKENS_PER_REPLY = 64
# One SSE event per token of EVENT_BYTES, as the emulator sends them (its smallest: 224).
EVENT_BYTES = 220
STREAMER = """
import socket, sys
event = (b'data: {"object":"text_completion","model":"m","choices":[{"index":0,"text":" w",'
         b'"logprobs":null,"finish_reason":null}]}').ljust(218) + b'\\n\\n'
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
served = 0
while True:
    c, _ = s.accept()
    c.recv(100)
    for _ in range(int(sys.argv[3])):
        c.sendall(event)
    c.close()
    served += 1
    open(sys.argv[4], "w").write(str(served))
"""

CLIENT = """
import socket, sys
for i in range(int(sys.argv[3])):
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    c.sendall(b"GET"); got = 0
    while (chunk := c.recv(65536)):
        got += len(chunk)
    c.close()
"""


@pytest.fixture
async def billing(lab, tmp_path):
    # a budget the bills never exhaust (an empty bucket sends new connections elsewhere)
    model = model_of(policy=POLICY.replace("tpm: 60000", "tpm: 600000000").replace(
        "burst: 1000", "burst: 100000000"))
    southbound = make_southbound(model, 1, lab.listen)
    async with billing_controller(model, southbound, tmp_path / "ledger.db", ("b1", "b2"),
                                  EVENT_BYTES) as (ctl, client):
        served = {}
        for host, backend in (("gpu1", "b1"), ("gpu2", "b2")):
            served[backend] = tmp_path / f"{host}.served"
            lab.box.run(["ip", "addr", "add", f"{VIP}/32", "dev", "lo"], ns=lab.ns[host])
            lab.box.popen([sys.executable, "-c", STREAMER, VIP, str(VIP_PORT),
                           str(TOKENS_PER_REPLY), str(served[backend])], ns=lab.ns[host])
        yield ctl, client, served


def count(path: Path) -> int:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return int(path.read_text())
    return 0


async def test_the_lying_backend_is_flagged_the_honest_one_is_not(lab, billing):
    ctl, client, served = billing
    deadline = time.monotonic() + 30
    while not ((ctl.southbound["s1"].status().get("last_reconcile") or {}).get("applied")
               and all(str(ctl.model.backends[b].state) == "active" for b in ("b1", "b2"))):
        assert time.monotonic() < deadline, "s1 not programmed with b1 and b2 active"
        await asyncio.sleep(0.2)
    # the ports are sampled from before any traffic (as in a controller that has been
    # running): a verdict needs a sample before the byte window
    while not ctl.ledger.port_growth(time.time() - 0.5, time.time()).get(("s1", 4)):
        assert time.monotonic() < deadline + ctl.crosscheck.lag_s + 10, "no port samples"
        await asyncio.sleep(0.2)
    await asyncio.sleep(ctl.crosscheck.lag_s + ctl.crosscheck.window_s)
    traffic_started = time.time()
    reported = {"b1": 0, "b2": 0}
    flagged_at: float | None = None
    lied_at: float | None = None
    checks_seen = 0
    for _ in range(12):  # bounded: 12 rounds of traffic, reports and checks
        argv = ["ip", "netns", "exec", lab.ns["client"], sys.executable, "-c", CLIENT, VIP,
                str(VIP_PORT), "10"]
        done = await asyncio.to_thread(subprocess.run, argv, timeout=60, capture_output=True,
                                       text=True)
        assert done.returncode == 0, done.stderr[-1500:]
        for backend, factor in (("b1", 1), ("b2", 3)):  # b2's agent bills 3x
            done = count(served[backend])
            tokens = (done - reported[backend]) * TOKENS_PER_REPLY * factor
            reported[backend] = done
            r = await client.post(f"/backends/{backend}/report", json={
                "running": 0, "waiting": 0, "kv_cache_usage": 0.1, "healthy": True,
                "usage": [{"tenant_id": 7, "prompt_tokens": 1, "completion_tokens": tokens}]})
            assert r.status_code == 200, r.text
            if factor == 3 and tokens and lied_at is None:
                lied_at = time.time()  # the lie is in the ledger from now on
        await asyncio.sleep(1.0)
        checks_seen = max(checks_seen, len(ctl.billing_checks))
        flagged_at = ctl.crosscheck.first_flagged.get("b2")
        if flagged_at is not None and time.time() - flagged_at > 2 * 4.0:
            break
    assert reported["b1"] > 0 and reported["b2"] > 0, reported
    assert flagged_at is not None and lied_at is not None
    # within one interval (and the settle time of the port samples, and the run loop's
    # 1 s tick) of the lie
    settle = ctl.crosscheck.settle_s(ctl.counter_interval_s)
    assert flagged_at - lied_at <= ctl.crosscheck.interval_s + settle + 1.0, \
        flagged_at - lied_at
    assert ctl.crosscheck.flags.get("b1", 0) == 0, ctl.crosscheck.flags
    assert isinstance((await client.get("/ledger/crosscheck/backends")).json(), list)
    since = traffic_started  # the whole run: one verdict per port
    ranged = (await client.get("/ledger/crosscheck/backends",
                               params={"since": since, "until": time.time() - 2})).json()
    verdicts = {v["backends"][0]: v["fits"] for v in ranged if v["backends"][0] in ("b1", "b2")}
    assert verdicts == {"b1": True, "b2": False}, ranged
    b2 = next(v for v in ranged if v["backends"] == ["b2"])
    assert b2["flagged_windows"]["b2"] >= 1 and b2["bytes_needed"] > b2["bytes_sent"]
    metrics = (await client.get(client.base_url.copy_with(path="/metrics"))).text
    assert 'tokenfabric_controller_billing_flagged_windows_total{backend="b2"}' in metrics
    audit = (await client.get("/audit")).json()
    assert any(e["action"] == "billing-flagged" and "b2" in e["detail"] for e in audit)
    print(json.dumps({"lie_to_flag_s": round(flagged_at - lied_at, 2),
                      "flags": ctl.crosscheck.flags, "served": {k: count(p) for k, p in
                                                                served.items()}}))
