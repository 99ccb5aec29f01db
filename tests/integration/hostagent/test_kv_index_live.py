"""The whole chain, live: the emulator publishes vLLM's KV events on ZMQ, the real host
agent (tokenfabric agent run) follows them, and a real controller process keeps the
prefix index, read over REST: stores, evictions, lookups, memory figures, staleness."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.api.conftest import ADMIN, AGENT, VIEWER
from tests.integration.api.conftest import TINY_FABRIC as FABRIC
from tests.integration.hostagent.conftest import (
    env_without_config,
    free_port,
    start_emulator,
    stop_process,
)
from tests.integration.hostagent.conftest import wait_for as wait_until
from tokenfabric import yamlio
from tokenfabric.blockhash import BlockHasher


def wait_for(check, what: str, timeout: float = 30.0):
    """The conftest's wait_for, an HTTP error (a controller still starting) counting as not yet."""
    def attempt():
        try:
            return check()
        except httpx.HTTPError:
            return None
    return wait_until(attempt, timeout, what)


def start_controller(tmp_path, api_port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tokenfabric.cli", "controller", "run",
         "--fabric", str(tmp_path / "fabric.yaml"), "--tokens", str(tmp_path / "tokens.yaml"),
         "--ledger", str(tmp_path / "l.db"), "--listen", f"127.0.0.1:{api_port}"],
        stdout=open(tmp_path / "controller.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT)


def start_controller_and_agent(tmp_path, vllm_url: str, endpoint: str, replay: str,
                               started: list[subprocess.Popen], sink: socket.socket
                               ) -> tuple[httpx.Client, subprocess.Popen]:
    """A controller process and an agent process following `vllm_url`'s KV events."""
    (tmp_path / "fabric.yaml").write_text(FABRIC)
    (tmp_path / "tokens.yaml").write_text(yamlio.dump(
        {ADMIN: {"name": "ops", "role": "admin"}, AGENT: {"name": "agents", "role": "agent",
                                                 "backends": ["*"]},
         VIEWER: {"name": "grafana", "role": "viewer"}}))
    api_port = free_port()
    started.append(start_controller(tmp_path, api_port))
    (tmp_path / "agent.yaml").write_text(yamlio.dump({"agent": {
        "name": "gpu2", "address": "10.0.0.12", "mac": "02:00:00:00:00:12", "switch": "s1",
        "port": 4, "vip": "10.0.100.1", "vip_port": 8000, "capacity": 8,
        "vllm_url": vllm_url, "controller_url": f"http://127.0.0.1:{api_port}",
        "token": AGENT, "listen_address": "127.0.0.1", "listen_port": free_port(),
        "beacon_target": f"127.0.0.1:{sink.getsockname()[1]}", "report_interval": 0.3,
        "kv_events_endpoint": endpoint, "kv_events_replay_endpoint": replay,
        "kv_report_interval": 0.2}}))
    agent = subprocess.Popen(
        [sys.executable, "-m", "tokenfabric.cli", "agent", "run", "--config",
         str(tmp_path / "agent.yaml")], env=env_without_config(),
        stdout=open(tmp_path / "agent.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    started.append(agent)
    viewer = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10,
                          headers={"Authorization": f"Bearer {VIEWER}"})
    wait_for(lambda: viewer.get("/api/v1/backends/gpu2").status_code == 200, "registration")
    return viewer, agent


def warm_up(vllm: httpx.Client, viewer: httpx.Client, model: str, words: int = 40) -> None:
    """Until the index holds a block: vLLM's PUB connects to the agent's bound SUB with
    ZMQ's retries, and what it publishes before that is lost (the replay socket brings
    it back once a later batch shows the gap)."""
    def indexed() -> bool:
        backend = viewer.get("/api/v1/prefix-index").json()["backends"].get("gpu2")
        return bool(backend and backend["blocks"])

    for n in range(60):
        prompt = " ".join(f"warm{n}w{i}" for i in range(words))
        assert vllm.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                  "max_tokens": 1}).status_code == 200
        if indexed():
            return
        time.sleep(0.25)
    raise AssertionError("no block reached the index")


@pytest.fixture
def chain(tmp_path):
    started: list[subprocess.Popen] = []
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # stands in for the switch
    sink.bind(("127.0.0.1", 0))
    try:
        endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        emulator = start_emulator(
            "--speed", "10", "--model", "tiny", "--kv-cache-tokens", "1024", "--kv-events-config",
            json.dumps({"enable_kv_cache_events": True, "endpoint": endpoint,
                        "replay_endpoint": replay}))
        started.append(emulator.proc)
        viewer, agent = start_controller_and_agent(tmp_path, emulator.url, endpoint, replay,
                                                   started, sink)
        yield viewer, emulator, agent, started
    finally:
        for proc in reversed(started):
            stop_process(proc)
        sink.close()


def test_emulator_events_reach_the_controllers_index_with_evictions(chain):
    viewer, emulator, agent, _ = chain
    hasher = BlockHasher(16)
    vllm = httpx.Client(base_url=emulator.url, timeout=20)
    warm_up(vllm, viewer, "tiny")

    def keys_of(prompt: str) -> list[int]:
        return hasher.keys(vllm.post("/tokenize", json={"prompt": prompt}).json()["tokens"])

    def lookup(keys: list[int]) -> dict:
        reply = viewer.post("/api/v1/prefix-index/lookup", json={"block_hashes": keys})
        assert reply.status_code == 200
        return reply.json()

    system = " ".join(f"rule{i}" for i in range(200))     # 12 blocks
    first = keys_of(system + " question one")
    assert vllm.post("/v1/completions", json={"model": "tiny", "prompt": system + " question one",
                                              "max_tokens": 2}).status_code == 200
    found = wait_for(lambda: lookup(first)["best"] == "gpu2" and lookup(first), "the index")
    [match] = found["matches"]
    assert match["cached_blocks"] == 12 and match["cached_tokens"] == 192 and match["trusted"]
    summary = viewer.get("/api/v1/prefix-index").json()
    assert summary["backends"]["gpu2"]["blocks"] >= 12  # and the warm-up's
    assert summary["backends"]["gpu2"]["synced"] and summary["backends"]["gpu2"]["block_size"] == 16
    assert summary["memory_bound_bytes"] == (summary["max_blocks_per_backend"]
                                             + summary["max_claimed_blocks_per_backend"]) * \
        summary["max_backends"] * 320

    # 64 blocks of cache: three other long prompts push the first one out, tail first
    for tag in "xyz":
        other = " ".join(f"{tag}{i}" for i in range(400))
        assert vllm.post("/v1/completions", json={"model": "tiny", "prompt": other,
                                                  "max_tokens": 2}).status_code == 200
    wait_for(lambda: not lookup(first)["matches"], "the eviction in the index")
    views = viewer.get("/api/v1/prefix-index").json()["backends"]["gpu2"]
    assert 0 < views["blocks"] <= 64 and views["synced"]

    # bad requests are 4xx, never 500; agents' routes need the agent role
    assert viewer.post("/api/v1/prefix-index/lookup", json={"block_hashes": [-1]}
                       ).status_code == 422
    assert viewer.post("/api/v1/prefix-index/lookup", json={"block_hashes": [1] * 9000}
                       ).status_code == 422
    assert viewer.post("/api/v1/prefix-index/lookup", content=b"[").status_code == 422
    report = {"epoch": 0, "version": 0, "base": -1, "full": True, "stored": [1], "removed": [],
              "count": 1, "checksum": 1}
    assert viewer.post("/api/v1/backends/gpu2/kv", json=report).status_code == 403
    agent_client = httpx.Client(base_url=viewer.base_url, timeout=10,
                                headers={"Authorization": f"Bearer {AGENT}"})
    assert agent_client.post("/api/v1/backends/nobody/kv", json=report).status_code == 404
    assert agent_client.post("/api/v1/backends/gpu2/kv",
                             json={**report, "stored": ["x"]}).status_code == 422

    # the agent stops: its entries stay, shown untrusted once its last report is too old
    stop_process(agent)
    wait_for(lambda: viewer.get("/api/v1/backends/gpu2").status_code == 404 or
             not viewer.get("/api/v1/prefix-index").json()["backends"].get("gpu2"),
             "deregistration to drop the backend's index entries")


def test_a_restarted_controller_gets_the_index_back_from_a_snapshot(chain, tmp_path):
    """The controller forgets everything on a restart; the agent registers again and its
    next KV report, a delta on a base the new index lacks, is answered resync: the
    snapshot that follows brings the blocks back."""
    viewer, emulator, agent, started = chain
    vllm = httpx.Client(base_url=emulator.url, timeout=20)
    warm_up(vllm, viewer, "tiny")
    prompt = " ".join(f"keep{i}" for i in range(100))
    keys = BlockHasher(16).keys(
        vllm.post("/tokenize", json={"prompt": prompt}).json()["tokens"])
    assert vllm.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                              "max_tokens": 1}).status_code == 200

    def found() -> bool:
        body = viewer.post("/api/v1/prefix-index/lookup", json={"block_hashes": keys}).json()
        return body["best"] == "gpu2" and body["matches"][0]["cached_blocks"] == len(keys)

    wait_for(found, "the blocks in the index")
    controller = started[0]
    port = int(str(viewer.base_url).rsplit(":", 1)[1].split("/")[0])
    stop_process(controller)
    started[0] = start_controller(tmp_path, port)
    wait_for(lambda: viewer.get("/api/v1/backends/gpu2").status_code == 200,
             "the agent to register again", timeout=40)
    wait_for(found, "the blocks back in the restarted controller's index", timeout=40)
    summary = viewer.get("/api/v1/prefix-index").json()["backends"]["gpu2"]
    assert summary["synced"] and summary["trusted"]


def test_a_silent_agents_entries_are_shown_but_not_trusted(chain):
    """The staleness rule, live: an agent that dies without a word (SIGKILL) leaves its
    entries in the index; three seconds after its last report they are no longer
    trusted, and no lookup names its backend best."""
    viewer, emulator, agent, _ = chain
    vllm = httpx.Client(base_url=emulator.url, timeout=20)
    warm_up(vllm, viewer, "tiny")
    prompt = " ".join(f"stale{i}" for i in range(64))
    keys = BlockHasher(16).keys(vllm.post("/tokenize", json={"prompt": prompt}).json()["tokens"])
    assert vllm.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                              "max_tokens": 1}).status_code == 200

    def lookup() -> dict:
        return viewer.post("/api/v1/prefix-index/lookup", json={"block_hashes": keys}).json()

    wait_for(lambda: lookup()["best"] == "gpu2", "the blocks in the index")
    agent.kill()
    agent.wait(timeout=10)
    found = wait_for(lambda: lookup()["best"] is None and lookup(), "the entries to go stale",
                     timeout=15)
    [match] = found["matches"]
    assert match["cached_blocks"] == len(keys) and not match["trusted"]
    assert match["reason"] == "last report older than 3 s" and match["report_age_s"] > 3
