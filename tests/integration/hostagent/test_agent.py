"""`tokenfabric agent run` as a process, against a recording controller, an emulated vLLM
process and a UDP socket standing in for the switch."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.hostagent.conftest import (
    TOKEN,
    env_without_config,
    free_port,
    wait_for,
    wait_http,
)
from tokenfabric import beacon, yamlio
from tokenfabric.beacon import BeaconFlags, LoadBeacon, UsageBeacon


def start_agent(tmp_path, controller_stub, beacon_trap, emulator, capacity, load_metric):
    port = free_port()
    config = {"agent": {
        "name": "gpu1", "address": "10.0.0.11", "mac": "00:00:00:00:00:11", "switch": "s1",
        "port": 3, "vip": "10.100.0.1", "vip_port": 8000, "capacity": capacity,
        "load_metric": load_metric, "vllm_url": emulator.url,
        "controller_url": controller_stub.url, "token": TOKEN,
        "listen_address": "127.0.0.1", "listen_port": port,
        "beacon_target": f"127.0.0.1:{beacon_trap.port}", "report_interval": 0.3,
        "health_interval": 0.2}}
    path = tmp_path / "agent.yaml"
    path.write_text(yamlio.dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "tokenfabric.cli", "agent", "run",
                             "--config", str(path)], env=env_without_config(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise
    return proc, port


@contextlib.contextmanager
def running_agent(*args):
    proc, port = start_agent(*args)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def agent_process(tmp_path, controller_stub, beacon_trap, emulator_factory):
    emulator = emulator_factory("--speed", "10", "--model", "tiny", "--max-num-seqs", "8")
    with running_agent(tmp_path, controller_stub, beacon_trap, emulator, 8,
                       "occupancy") as (proc, port):
        yield proc, port, emulator


def loads(packets) -> list[LoadBeacon]:
    return [m for m in (beacon.unpack(p) for _, p in packets) if isinstance(m, LoadBeacon)]


def test_agent_registers_beacons_reports_and_deregisters(agent_process, controller_stub,
                                                         beacon_trap):
    proc, port, emulator = agent_process

    # Registration, with the token.
    wait_for(lambda: controller_stub.of("POST", "/backends"), 10, "registration")
    _, _, body, auth = controller_stub.of("POST", "/backends")[0]
    assert auth == f"Bearer {TOKEN}"
    assert body == {"name": "gpu1", "host": "gpu1", "address": "10.0.0.11",
                    "mac": "00:00:00:00:00:11", "switch": "s1", "port": 3, "capacity": 8,
                    "models": ["tiny"], "vip": "10.100.0.1", "vip_port": 8000}

    # LOAD beacons every ~20 ms, for backend 7, not down, sequence numbers counting up.
    wait_for(lambda: beacon_trap.collect(0.1), 5, "a first beacon")
    window = loads(beacon_trap.collect(1.0))
    assert 25 <= len(window) <= 60, len(window)
    assert {b.backend_id for b in window} == {7}
    assert not any(b.flags & BeaconFlags.DOWN for b in window[-5:])
    seqs = [b.seq for b in window]
    assert all((b - a) % 65536 >= 1 for a, b in zip(seqs, seqs[1:], strict=False))

    # A request through the bridge from gold's address: a USAGE beacon with its tokens.
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport, timeout=10) as client:
        reply = client.post(f"http://127.0.0.1:{port}/v1/completions", json={
            "model": "tiny", "prompt": "tokens for gold", "max_tokens": 9})
    assert reply.headers["connection"] == "close"
    assert reply.headers["x-tokenfabric-backend"] == "gpu1"
    usage = reply.json()["usage"]
    # Charged in steps: the estimated prompt when the request starts, the rest at its end;
    # in all, the exact figures of `usage`, except that an estimate above the real prompt
    # ("tokens for gold": 15 bytes -> 4, the emulator counts 3 words) is not refunded.
    usage_beacons: list[UsageBeacon] = []

    def all_charged():
        usage_beacons.extend(m for _, p in beacon_trap.collect(0.2)
                             if isinstance(m := beacon.unpack(p), UsageBeacon))
        return sum(b.completion_tokens for b in usage_beacons) >= 9

    wait_for(all_charged, 5, "USAGE beacons for the whole request")
    assert {(b.backend_id, b.tenant_id) for b in usage_beacons} == {(7, 11)}
    assert len(usage_beacons) == 2
    assert (usage_beacons[0].prompt_tokens, usage_beacons[0].completion_tokens) == (4, 0)
    assert sum(b.prompt_tokens for b in usage_beacons) == max(4, usage["prompt_tokens"])
    assert sum(b.completion_tokens for b in usage_beacons) == 9

    # The reports carry state and the usage, per tenant.
    def report_with_usage():
        return [c[2] for c in controller_stub.of("POST", "/report")
                if c[2]["usage"].get("gold")]

    report = wait_for(report_with_usage, 5, "a report with gold's usage")[0]
    assert report["usage"]["gold"]["completion_tokens"] == 9
    assert report["usage"]["gold"]["tenant_id"] == 11
    assert report["healthy"] is True and report["metrics"]["names"] == "current"
    assert report["rdma"]["present"] in (False, True) and report["rdma"]["message"]
    assert controller_stub.of("POST", "/report")[0][3] == f"Bearer {TOKEN}"
    # Acknowledged usage is not sent twice; the totals keep it.
    later = wait_for(lambda: [c[2] for c in controller_stub.of("POST", "/report")
                              if c[2]["seq"] > report["seq"]], 5, "a later report")[0]
    assert "gold" not in later["usage"]
    assert later["usage_total"]["gold"]["completion_tokens"] == 9

    # A long request running: the load shows it (1 of 8 sequences -> 125).
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json={
                "model": "tiny", "prompt": "x", "max_tokens": 3000, "stream": True}) as stream:
            lines = stream.iter_lines()  # held: a dropped iterator closes the response
            next(lines)
            busy = wait_for(lambda: [b for b in loads(beacon_trap.collect(0.1))
                                     if b.running >= 1], 5, "a busy LOAD beacon")
    assert busy[0].load >= 125

    # vLLM's /health fails: DOWN in the beacons and unhealthy in the reports; then back up.
    emulator.fault("503")
    wait_for(lambda: [b for b in loads(beacon_trap.collect(0.1)) if b.flags & BeaconFlags.DOWN],
             5, "a DOWN beacon")
    wait_for(lambda: [c for c in controller_stub.of("POST", "/report")
                      if c[2]["healthy"] is False], 5, "an unhealthy report")
    emulator.fault("none")
    wait_for(lambda: (w := loads(beacon_trap.collect(0.2))) and not any(
        b.flags & BeaconFlags.DOWN for b in w), 5, "beacons without DOWN")

    # The controller's report answer: new tenants and drain this backend.
    controller_stub.report_answer = {"draining": True, "tenants": [
        {"tenant_id": 13, "name": "silver", "prefixes": ["127.0.0.4/32"], "tokens_per_s": 50}]}
    wait_for(lambda: [b for b in loads(beacon_trap.collect(0.1))
                      if b.flags & BeaconFlags.DRAINING], 5, "a DRAINING beacon")
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.4"),
                      timeout=10) as client:
        client.post(f"http://127.0.0.1:{port}/v1/completions",
                    json={"model": "tiny", "prompt": "silver", "max_tokens": 2})
    silver: list[UsageBeacon] = []
    wait_for(lambda: silver.extend(m for _, p in beacon_trap.collect(0.2)
                                   if isinstance(m := beacon.unpack(p), UsageBeacon))
             or sum(b.completion_tokens for b in silver) >= 2, 5, "silver's USAGE beacons")
    assert {b.tenant_id for b in silver} == {13}
    assert sum(b.completion_tokens for b in silver) == 2
    controller_stub.report_answer = {"draining": False}
    wait_for(lambda: (w := loads(beacon_trap.collect(0.2))) and not any(
        b.flags & BeaconFlags.DRAINING for b in w), 5, "beacons without DRAINING")

    # The controller forgets the backend: the agent registers again.
    controller_stub.report_status = 404
    wait_for(lambda: len(controller_stub.of("POST", "/backends")) >= 2, 5, "re-registration")
    controller_stub.report_status = 200

    # SIGTERM: a clean exit that deregisters.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0, proc.stderr.read()
    assert controller_stub.of("DELETE", "/backends/gpu1")


def test_agent_waits_for_the_controller_and_sends_no_beacons_before(tmp_path, beacon_trap,
                                                                    emulator):
    config = {"agent": {
        "name": "gpu2", "address": "10.0.0.12", "mac": "00:00:00:00:00:12", "switch": "s1",
        "port": 4, "vip": "10.100.0.1", "vllm_url": emulator.url,
        "controller_url": f"http://127.0.0.1:{free_port()}", "bridge": False,
        "beacon_target": f"127.0.0.1:{beacon_trap.port}"}}
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "tokenfabric.cli", "agent", "run",
                             "--config", str(path)], env=env_without_config(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        assert proc.poll() is None            # still trying, not crashed
        assert beacon_trap.collect(0.5) == []  # no backend id yet, so no beacons
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "registration failed" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_delay_load_is_the_wait_for_a_free_slot(tmp_path, controller_stub, beacon_trap,
                                                emulator_factory):
    """load_metric delay: LOAD is the expected ms to a first token. With the only slot held
    by a long request it is that request's remaining decode time, far above an idle LOAD."""
    emulator = emulator_factory("--speed", "10", "--model", "tiny", "--max-num-seqs", "1")
    with running_agent(tmp_path, controller_stub, beacon_trap, emulator, 1, "delay") as (_, port):
        idle = wait_for(lambda: loads(beacon_trap.collect(0.1)), 10, "an idle LOAD beacon")
        with httpx.Client(timeout=60) as client:
            # A short request teaches the agent this backend's time per output token.
            client.post(f"http://127.0.0.1:{port}/v1/completions", json={
                "model": "tiny", "prompt": "x", "max_tokens": 50, "stream": True})
            beacon_trap.collect(0.1)  # only beacons from now on
            with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json={
                    "model": "tiny", "prompt": "x", "max_tokens": 3000,
                    "stream": True}) as stream:
                lines = stream.iter_lines()  # held: a dropped iterator closes the response
                next(lines)
                busy = wait_for(lambda: [b for b in loads(beacon_trap.collect(0.1))
                                         if b.running >= 1], 5, "a busy LOAD beacon")
                later = wait_for(lambda: [b for b in loads(beacon_trap.collect(0.3))
                                          if b.running >= 1], 5, "a later LOAD beacon")
    assert busy[0].load > 10 * max(1, idle[-1].load)
    assert later[-1].load < busy[0].load  # the request's remaining time shrinks as it runs
