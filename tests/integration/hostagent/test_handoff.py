"""The prefix handoff, live: a real controller (prefix index, policy with the opt-in), two
real emulators publishing KV events, two real agents (bridge, handoff listener on
127.0.0.1 and 127.0.0.2, KV reports), UDP sinks standing in for the switch's beacons.

gpu1's bridge gets requests whose prompt prefix gpu2 holds: it hands them over and the
answer streams back; a client abort cancels gpu2's generation; usage is charged once, by
gpu2; no handoff when gpu2 is overloaded or the shared prefix is short; counters.

The switch learns from it: the agent of the backend that served a request for its cached
prefix (handed to it, or held longest where it landed) reports "client -> backend" to the
controller's affinity table (the clients' addresses come in X-Tokenfabric-Client: every
test client connects from 127.0.0.1, which no edge switch has)."""

from __future__ import annotations

import json
import re
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
from tokenfabric import beacon, yamlio
from tokenfabric.hostagent.handoff import sign

POLICY = """
contracts:
  std:
    class: {service_class: standard, dscp: 0, queue: 1, priority_level: 9}
    tpm: 6000000
    burst: 500000
tenants:
  - {name: chat, id: 5, prefixes: [10.0.1.0/25], contract: std, prefix_affinity: true}
  - {name: plain, id: 6, prefixes: [10.0.1.128/25], contract: std}
"""
SECRET = "handoff-test-secret-0123456789"
CAPACITY = 2


def wait_for(check, what: str, timeout: float = 30.0):
    def attempt():
        try:
            return check()
        except httpx.HTTPError:
            return None
    return wait_until(attempt, timeout, what)


class Sink:
    """A UDP socket where an agent's beacons land (the switch's place)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.usage: list[beacon.UsageBeacon] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def drain(self) -> list[beacon.UsageBeacon]:
        for _ in range(100_000):
            try:
                data = self.sock.recv(2048)
            except BlockingIOError:
                break
            parsed = beacon.unpack(data)
            if isinstance(parsed, beacon.UsageBeacon):
                self.usage.append(parsed)
        return self.usage


class Rig:
    def __init__(self, tmp_path) -> None:
        self.tmp = tmp_path
        self.started: list[subprocess.Popen] = []
        self.sinks: dict[str, Sink] = {}
        self.emulators: dict = {}
        self.bridges: dict[str, str] = {}
        self.metrics: dict[str, str] = {}
        self.handoff_port = free_port()
        self.api_port = 0  # the controller's, once started

    def start(self, overrides: dict[int, dict[str, object]] | None = None,
              agent_keys: dict[int, dict[str, object]] | None = None) -> None:
        """The controller, two emulators with KV events and an agent in front of each;
        `overrides`: agent n's handoff keys over the rig's; `agent_keys`: its agent keys
        (e.g. report_interval)."""
        self.start_controller()
        for n in (1, 2):
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            replay = f"tcp://127.0.0.1:{free_port()}"
            # speed 1: 0.1 ms of prefill a token, 20 ms a decode step
            emulator = start_emulator(
                "--speed", "1", "--model", "tiny", "--max-num-seqs", str(CAPACITY),
                "--kv-cache-tokens", "20000", "--kv-events-config",
                json.dumps({"enable_kv_cache_events": True, "endpoint": endpoint,
                            "replay_endpoint": replay}))
            self.started.append(emulator.proc)
            self.emulators[f"gpu{n}"] = emulator
            self.start_agent(n, emulator.url, (endpoint, replay),
                             (agent_keys or {}).get(n), **(overrides or {}).get(n, {}))
        self.wait_ready("gpu1", "gpu2")

    def start_controller(self) -> None:
        """A controller process with POLICY (tenant chat opted in)."""
        (self.tmp / "fabric.yaml").write_text(FABRIC)
        (self.tmp / "policy.yaml").write_text(POLICY)
        (self.tmp / "tokens.yaml").write_text(yamlio.dump(
            {ADMIN: {"name": "ops", "role": "admin"},
             AGENT: {"name": "agents", "role": "agent", "backends": ["*"]},
             VIEWER: {"name": "grafana", "role": "viewer"}}))
        self.api_port = free_port()
        self.started.append(subprocess.Popen(
            [sys.executable, "-m", "tokenfabric.cli", "controller", "run",
             "--fabric", str(self.tmp / "fabric.yaml"), "--policy", str(self.tmp / "policy.yaml"),
             "--tokens", str(self.tmp / "tokens.yaml"), "--ledger", str(self.tmp / "l.db"),
             "--listen", f"127.0.0.1:{self.api_port}"],
            stdout=open(self.tmp / "controller.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT))
        self.viewer = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=10,
                                   headers={"Authorization": f"Bearer {VIEWER}"})

    def start_agent(self, n: int, vllm_url: str, kv_events: tuple[str, str] | None,
                    agent_keys: dict[str, object] | None = None, **handoff: object) -> None:
        """Agent gpu`n` on 127.0.0.`n` in front of `vllm_url`, following its KV events
        (endpoint, replay endpoint) when given; `handoff` overrides the handoff keys."""
        name = f"gpu{n}"
        sink = self.sinks[name] = Sink()
        listen, metrics = free_port(), free_port()
        self.bridges[name] = f"http://127.0.0.1:{listen}"
        self.metrics[name] = f"http://127.0.0.1:{metrics}/metrics"
        events = {} if kv_events is None else {
            "kv_events_endpoint": kv_events[0], "kv_events_replay_endpoint": kv_events[1],
            "kv_report_interval": 0.2}
        (self.tmp / f"{name}.yaml").write_text(yamlio.dump({"agent": {
            "name": name, "address": f"127.0.0.{n}", "mac": f"02:00:00:00:00:1{n}",
            "switch": "s1", "port": 2 + n, "vip": "10.0.100.1", "vip_port": 8000,
            "capacity": CAPACITY, "vllm_url": vllm_url,
            "controller_url": f"http://127.0.0.1:{self.api_port}", "token": AGENT,
            "listen_address": "127.0.0.1", "listen_port": listen,
            "trust_tenant_header": True, "beacon_target": sink.target,
            "report_interval": 0.2, **events, **(agent_keys or {}),
            "metrics_listen": f"127.0.0.1:{metrics}",
            "handoff": {"secret": SECRET, "port": self.handoff_port,
                        "lookup_timeout": 1.0, "min_gain_ms": 5.0,
                        "max_peer_load": 1.0, "cache_ttl": 0.0,
                        "home_weight": 1.0, "decision_header": True, **handoff}}}))
        self.started.append(subprocess.Popen(
            [sys.executable, "-m", "tokenfabric.cli", "agent", "run", "--config",
             str(self.tmp / f"{name}.yaml")], env=env_without_config(),
            stdout=open(self.tmp / f"{name}.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT))

    def wait_ready(self, *names: str) -> None:
        for name in names:
            wait_for(lambda name=name: self.viewer.get(
                f"/api/v1/backends/{name}").json().get("load", {}).get("reports", 0) > 0,
                     f"{name}'s registration and first report")
            wait_for(lambda name=name: httpx.get(self.metrics[name]).status_code == 200,
                     f"{name}'s metrics")

    def stop(self) -> None:
        for proc in reversed(self.started):
            stop_process(proc)
        for sink in self.sinks.values():
            sink.sock.close()

    def metric(self, name: str, pattern: str) -> float:
        text = httpx.get(self.metrics[name], timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if re.match(pattern, line):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def warm(self, name: str, prompt: str) -> None:
        """`prompt` into `name`'s KV cache, and into the index."""
        reply = httpx.post(self.emulators[name].url + "/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": prompt, "max_tokens": 1})
        assert reply.status_code == 200
        keys = len(prompt.split()) // 16

        def indexed() -> bool:
            body = self.viewer.post("/api/v1/prefix-index/lookup", json={
                "block_hashes": self.keys(prompt)}).json()
            return any(m["backend"] == name and m["cached_blocks"] >= keys and m["trusted"]
                       for m in body["matches"])
        wait_for(indexed, f"{name}'s blocks in the index")

    def keys(self, prompt: str) -> list[int]:
        from tokenfabric.blockhash import BlockHasher
        ids = httpx.post(self.emulators["gpu1"].url + "/tokenize",
                         json={"prompt": prompt}).json()["tokens"]
        return BlockHasher(16).keys(ids)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rig = Rig(tmp_path_factory.mktemp("handoff"))
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()


def completion(rig: Rig, prompt: str, tenant: str = "chat", max_tokens: int = 8,
               client: str | None = None) -> tuple[httpx.Response, list[dict]]:
    """A streamed completion through gpu1's bridge; the response and its SSE events."""
    headers = {"X-Tokenfabric-Tenant": tenant}
    if client is not None:
        headers["X-Tokenfabric-Client"] = client
    with httpx.stream("POST", rig.bridges["gpu1"] + "/v1/completions", timeout=30,
                      headers=headers,
                      json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                            "stream": True, "ignore_eos": True,
                            "stream_options": {"include_usage": True}}) as reply:
        events = []
        done = False
        for line in reply.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
        assert done, "the stream did not end with [DONE]"
    return reply, events


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def test_a_request_whose_prefix_the_peer_holds_is_handed_off_and_streamed_back(rig):
    system = words("sysA", 1600)  # 100 blocks: 160 ms of prefill saved at speed 1
    rig.warm("gpu2", system + " first question")
    before_hits = rig.emulators["gpu2"].metrics()
    rig.sinks["gpu1"].drain()
    rig.sinks["gpu2"].drain()
    gpu1_usage, gpu2_usage = len(rig.sinks["gpu1"].usage), len(rig.sinks["gpu2"].usage)

    reply, events = completion(rig, system + " second question", max_tokens=12)
    assert reply.status_code == 200
    assert reply.headers["x-tokenfabric-backend"] == "gpu2"
    assert reply.headers["x-tokenfabric-handoff-from"] == "gpu1"
    assert float(reply.headers["x-tokenfabric-handoff-ms"]) > 0
    # what the bridge decided, on what: 100 blocks, none here, gpu2 holding them all
    decided = reply.headers["x-tokenfabric-handoff-decision"]
    assert re.fullmatch(r"handoff; blocks=100; here=0; longest=gpu2:100; gain=\d+\.\d", decided)
    text_chunks = [e for e in events if e.get("choices")]
    assert len(text_chunks) == 12  # one per token, none lost or doubled on the way
    [usage] = [e["usage"] for e in events if e.get("usage")]
    assert usage["completion_tokens"] == 12 and usage["prompt_tokens"] == 1602
    assert _hits(rig.emulators["gpu2"].metrics()) - _hits(before_hits) >= 1600 - 16

    # charged once: gpu2's agent sent the USAGE beacons of tenant 5, gpu1's none
    def charged() -> bool:
        got = rig.sinks["gpu2"].drain()[gpu2_usage:]
        return sum(b.completion_tokens for b in got if b.tenant_id == 5) == 12
    wait_for(charged, "gpu2's USAGE beacons")
    assert [b for b in rig.sinks["gpu1"].drain()[gpu1_usage:] if b.tenant_id == 5] == []
    assert rig.metric("gpu1", r'tokenfabric_handoffs_total\{.*peer="gpu2".*tenant="chat"') == 1
    assert rig.metric("gpu2", r'tokenfabric_handoffs_received_total\{.*origin="gpu1"') == 1
    # the agents export the bridge's delivery check; this answer was delivered (both paths
    # shown, at 0)
    for name in ("gpu1", "gpu2"):
        text = httpx.get(rig.metrics[name], timeout=5).text
        pattern = (r'tokenfabric_bridge_unacked_answers_total\{backend="' + name
                   + r'",path="(local|relayed)"\} 0\.0')
        assert re.findall(pattern, text) == ["local", "relayed"]


def test_each_agent_reports_its_measured_service_time_and_lookups_carry_it(rig):
    """What a bridge prices a holder's queue with (peer_speed): the holder's agent's delay
    model, measured from the streams its bridge relayed, in its load report
    (`service_s`), passed on by the index's lookup."""
    system = words("sysS", 800)
    rig.warm("gpu2", system + " x")
    # a stream through gpu2's own bridge (tenant plain: served there): 20 tokens at
    # speed 1's 20 ms a decode step
    with httpx.stream("POST", rig.bridges["gpu2"] + "/v1/completions", timeout=30,
                      headers={"X-Tokenfabric-Tenant": "plain"},
                      json={"model": "tiny", "prompt": "measure me", "max_tokens": 20,
                            "stream": True, "ignore_eos": True}) as reply:
        assert reply.status_code == 200 and sum(1 for _ in reply.iter_lines()) > 20

    def measured() -> float | None:
        found = rig.viewer.post("/api/v1/prefix-index/lookup", json={
            "block_hashes": rig.keys(system + " x")}).json()
        return next(m["service_s"] for m in found["matches"] if m["backend"] == "gpu2")
    service = wait_for(measured, "gpu2's measured service time in the lookup", timeout=10)
    # a typical request there: its prefill and its output (the moving averages of what
    # gpu2's bridge relayed: 8-20 tokens at about 20 ms each)
    assert 0.05 < service < 5.0, service


def test_a_handed_off_request_is_billed_once_in_the_controllers_ledger(rig):
    system = words("sysU", 800)
    rig.warm("gpu2", system + " x")
    time.sleep(0.5)  # earlier tests' usage reported
    before = _ledger(rig)
    reply, _ = completion(rig, system + " y", max_tokens=5)
    assert reply.headers["x-tokenfabric-backend"] == "gpu2"
    wait_for(lambda: _ledger(rig)[0] > before[0] or None, "the usage in the ledger")
    time.sleep(1.0)  # five more report intervals: a second count would have come
    requests, completion_tokens = _ledger(rig)
    assert requests == before[0] + 1 and completion_tokens == before[1] + 5


def test_a_client_abort_during_a_handoff_cancels_the_peers_generation(rig):
    system = words("sysB", 1600)
    rig.warm("gpu2", system + " q")
    aborted = _aborts(rig.emulators["gpu2"].metrics())
    with httpx.stream("POST", rig.bridges["gpu1"] + "/v1/completions", timeout=30,
                      headers={"X-Tokenfabric-Tenant": "chat"},
                      json={"model": "tiny", "prompt": system + " long answer",
                            "max_tokens": 3000, "stream": True, "ignore_eos": True}) as reply:
        assert reply.headers["x-tokenfabric-backend"] == "gpu2"
        lines = reply.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
            if got >= 3:
                break
    # the client left after 3 tokens of 3000 (60 s of decoding): gpu2 aborts now
    wait_for(lambda: _aborts(rig.emulators["gpu2"].metrics()) > aborted or None,
             "gpu2's emulator to abort the request", timeout=10)
    wait_for(lambda: _running(rig.emulators["gpu2"].metrics()) == 0 or None,
             "gpu2 to run nothing", timeout=10)


def test_no_handoff_for_a_short_shared_prefix_or_a_tenant_not_opted_in(rig):
    system = words("sysC", 1600)
    rig.warm("gpu2", system + " q")
    # 2 blocks shared: too short to pay the relay
    reply, _ = completion(rig, words("sysC", 40) + " " + words("other", 800))
    assert reply.headers["x-tokenfabric-backend"] == "gpu1"
    assert "x-tokenfabric-handoff-from" not in reply.headers
    # the whole prefix held, but tenant plain has no prefix_affinity in the policy
    reply, _ = completion(rig, system + " q2", tenant="plain")
    assert reply.headers["x-tokenfabric-backend"] == "gpu1"
    assert rig.metric("gpu1", r'tokenfabric_handoff_decisions_total\{.*decision="short_prefix"'
                      ) + rig.metric("gpu1", r'tokenfabric_handoff_decisions_total\{.*'
                                     r'decision="no_match"') >= 1


def test_no_handoff_when_the_peer_is_overloaded(rig):
    system = words("sysD", 1600)
    rig.warm("gpu2", system + " q")
    # fill gpu2: 2 slots running and 2 waiting (long generations sent to it directly)
    fillers = [subprocess.Popen(
        [sys.executable, "-c", "import httpx,sys; httpx.post(sys.argv[1], timeout=60, json="
         "{'model': 'tiny', 'prompt': 'fill', 'max_tokens': 400, 'ignore_eos': True})",
         rig.emulators["gpu2"].url + "/v1/completions"]) for _ in range(4)]
    try:
        wait_for(lambda: rig.viewer.get("/api/v1/backends/gpu2").json()["load"]["waiting"] >= 1
                 or None,
                 "gpu2's report of its queue")
        said_no = r'tokenfabric_handoff_decisions_total\{.*decision="(peer_busy|no_gain)"'
        before = rig.metric("gpu1", said_no)
        reply, _ = completion(rig, system + " q3")
        # what gpu1's bridge decided, and on what (the decision header), if not this
        why = (reply.headers.get("x-tokenfabric-handoff-decision"), rig.viewer.post(
            "/api/v1/prefix-index/lookup", json={"block_hashes": rig.keys(system + " q3")}
        ).json())
        assert reply.headers["x-tokenfabric-backend"] == "gpu1", why
        # the load said no: over max_peer_load, or its queue costs more than the prefill
        assert rig.metric("gpu1", said_no) == before + 1, why
    finally:
        for proc in fillers:
            proc.kill()
            proc.wait(timeout=5)


def test_the_handoff_listener_refuses_unsigned_or_forged_requests(rig):
    url = f"http://127.0.0.2:{rig.handoff_port}/v1/completions"
    body = json.dumps({"model": "tiny", "prompt": "hello there", "max_tokens": 1}).encode()
    assert httpx.post(url, content=body, timeout=10).status_code == 403
    forged = sign(b"not-the-fabric-secret-000", "gpu1", 5, body)
    assert httpx.post(url, content=body, timeout=10,
                      headers={"X-Tokenfabric-Handoff": forged}).status_code == 403
    # a well-signed header whose client address was changed on the way: refused
    signed = sign(SECRET.encode(), "gpu1", 5, body, client="10.0.1.40")
    assert httpx.post(url, content=body, timeout=10, headers={
        "X-Tokenfabric-Handoff": signed.replace("client=10.0.1.40", "client=10.0.1.41")
    }).status_code == 403
    # signed for another body: refused
    other = sign(SECRET.encode(), "gpu1", 5, b"{}")
    assert httpx.post(url, content=body, timeout=10,
                      headers={"X-Tokenfabric-Handoff": other}).status_code == 403
    good = sign(SECRET.encode(), "gpu1", 5, body)
    reply = httpx.post(url, content=body, timeout=10, headers={"X-Tokenfabric-Handoff": good})
    assert reply.status_code == 200 and reply.headers["x-tokenfabric-backend"] == "gpu2"
    assert rig.metric("gpu2", r"tokenfabric_handoffs_refused_total") >= 4


def _affinity(rig: Rig, client: str) -> list[str]:
    """The backends the controller's affinity table sends `client` to (switch s1)."""
    view = rig.viewer.get("/api/v1/affinity").json()
    return [e["backend"] for e in view["switches"].get("s1", []) if e["client"] == client]


def _reports(rig: Rig, name: str, outcome: str) -> float:
    return rig.metric(name, rf'tokenfabric_affinity_reports_total\{{.*outcome="{outcome}"')


def test_after_a_handoff_the_peers_agent_teaches_the_switch_the_client(rig):
    system = words("sysE", 1600)
    rig.warm("gpu2", system + " q")
    sent = _reports(rig, "gpu2", "sent"), _reports(rig, "gpu1", "sent")
    reply, _ = completion(rig, system + " q2", client="10.0.1.21")
    assert reply.headers["x-tokenfabric-backend"] == "gpu2"
    assert reply.headers["x-tokenfabric-handoff-from"] == "gpu1"
    # the client's address travelled in the signed header: gpu2's agent reported it
    wait_for(lambda: _affinity(rig, "10.0.1.21") == ["gpu2"] or None,
             "10.0.1.21 -> gpu2 in the controller's affinity table", timeout=10)
    assert _reports(rig, "gpu2", "sent") == sent[0] + 1
    assert _reports(rig, "gpu1", "sent") == sent[1]  # the origin reports nothing


def test_a_prompt_held_where_it_landed_teaches_the_switch_once_per_window(rig):
    system = words("sysF", 1600)
    rig.warm("gpu1", system + " q")
    before = _reports(rig, "gpu1", "sent"), _reports(rig, "gpu1", "deduped")
    reply, _ = completion(rig, system + " q2", client="10.0.1.22")
    assert reply.headers["x-tokenfabric-backend"] == "gpu1"
    assert "x-tokenfabric-handoff-from" not in reply.headers
    wait_for(lambda: _affinity(rig, "10.0.1.22") == ["gpu1"] or None,
             "10.0.1.22 -> gpu1 in the controller's affinity table", timeout=10)
    # the same client again within the window (30 s): no second report
    reply, _ = completion(rig, system + " q3", client="10.0.1.22")
    assert reply.headers["x-tokenfabric-backend"] == "gpu1"
    wait_for(lambda: _reports(rig, "gpu1", "deduped") == before[1] + 1 or None,
             "gpu1's deduplication", timeout=10)
    assert _reports(rig, "gpu1", "sent") == before[0] + 1
    assert rig.metric("gpu1", r'tokenfabric_handoff_decisions_total\{.*'
                      r'decision="local_longest"') >= 2


def test_affinity_reports_the_controller_refuses_are_counted_and_change_nothing(rig):
    system = words("sysG", 1600)
    rig.warm("gpu1", system + " q")
    refused = _reports(rig, "gpu1", "refused")
    # tenant chat by its header, but 10.9.9.9 is in no tenant's prefix (nor behind an edge
    # switch): the controller answers 409, the request was served all the same
    reply, _ = completion(rig, system + " q2", client="10.9.9.9")
    assert reply.status_code == 200 and reply.headers["x-tokenfabric-backend"] == "gpu1"
    wait_for(lambda: _reports(rig, "gpu1", "refused") == refused + 1 or None,
             "gpu1's refused report", timeout=10)
    assert _affinity(rig, "10.9.9.9") == []
    # a tenant that did not opt in: no decision, no report
    sent = _reports(rig, "gpu1", "sent")
    reply, _ = completion(rig, system + " q3", tenant="plain", client="10.0.1.200")
    assert reply.headers["x-tokenfabric-backend"] == "gpu1"
    time.sleep(0.5)
    assert _reports(rig, "gpu1", "sent") == sent and _affinity(rig, "10.0.1.200") == []


def _group_ranking_first(rig: Rig, first: str, tag: str) -> str:
    """A 1600-word system prompt (100 blocks) whose prefix ranks `first` above the other
    backend (tokenfabric.hostagent.handoff.rendezvous, as every bridge ranks it)."""
    from tokenfabric.hostagent.handoff import rendezvous
    other = "gpu2" if first == "gpu1" else "gpu1"
    for n in range(40):
        system = words(f"{tag}{n}x", 1600)
        key = rig.keys(system)[99]
        if rendezvous(key, first) > rendezvous(key, other):
            return system
    raise AssertionError("no system prompt ranks " + first + " first")


def test_a_system_prompt_cached_on_both_goes_to_its_home(rig):
    """Both backends hold an app's system prompt (p2c copied it): a new conversation that
    lands on gpu1 goes to the prompt's home, gpu2, although gpu1 holds as much -- so that
    gpu1's copy can age out -- and the switch learns the client there."""
    system = _group_ranking_first(rig, "gpu2", "sysH")
    rig.warm("gpu1", system + " q")
    rig.warm("gpu2", system + " q")
    homed = r'tokenfabric_handoff_decisions_total\{.*decision="handoff_home"'
    before = rig.metric("gpu1", homed)
    reply, events = completion(rig, system + " " + words("askH", 40), client="10.0.1.30")
    assert reply.headers["x-tokenfabric-backend"] == "gpu2"
    assert reply.headers["x-tokenfabric-handoff-from"] == "gpu1"
    assert events[-1]["usage"]["completion_tokens"] == 8
    assert rig.metric("gpu1", homed) == before + 1
    wait_for(lambda: _affinity(rig, "10.0.1.30") == ["gpu2"] or None,
             "10.0.1.30 -> gpu2 in the controller's affinity table", timeout=10)


def test_at_the_home_a_shared_prompt_stays_and_needs_one_lookup(rig):
    """gpu1 is the system prompt's home: it serves the conversations it gets; the first
    one's lookup ranked the group, the next ones need none (the home is remembered)."""
    system = _group_ranking_first(rig, "gpu1", "sysI")
    rig.warm("gpu1", system + " q")
    rig.warm("gpu2", system + " q")
    lookups = r'tokenfabric_prefix_lookup_seconds_count\{backend="gpu1"'
    before = rig.metric("gpu1", lookups)
    for n in range(3):
        reply, _ = completion(rig, system + " " + words(f"askI{n}x", 40))
        assert reply.headers["x-tokenfabric-backend"] == "gpu1"
        assert "x-tokenfabric-handoff-from" not in reply.headers
    assert rig.metric("gpu1", lookups) == before + 1


def test_a_long_prompt_served_where_it_landed_teaches_the_switch(rig):
    """No backend held it (`no_match`): served here, and its blocks are cached here now,
    so the conversation's next turn belongs here: the agent reports the client
    (report_local)."""
    sent = _reports(rig, "gpu1", "sent")
    reply, _ = completion(rig, words("fresh", 800), client="10.0.1.31")
    assert reply.headers["x-tokenfabric-backend"] == "gpu1"
    wait_for(lambda: _affinity(rig, "10.0.1.31") == ["gpu1"] or None,
             "10.0.1.31 -> gpu1 in the controller's affinity table", timeout=10)
    assert _reports(rig, "gpu1", "sent") == sent + 1
    # a prompt under min_blocks blocks is no evidence of anything: no report
    completion(rig, words("tiny", 20), client="10.0.1.32")
    time.sleep(0.5)
    assert _affinity(rig, "10.0.1.32") == []


def test_a_shared_address_loses_its_switch_affinity(rig):
    """Three requests of one address in flight at once (shared_in_flight; an app server:
    one conversation waits for each answer): gpu1's agent withdraws the entry it made for
    it and reports it no more -- its conversations' prefixes live on different
    backends. Two at once (an open-loop replay overlapping turns) are not enough."""
    from concurrent.futures import ThreadPoolExecutor
    system = words("sysJ", 1600)
    rig.warm("gpu1", system + " q")
    completion(rig, system + " " + words("askJ", 40), client="10.0.1.50")
    wait_for(lambda: _affinity(rig, "10.0.1.50") == ["gpu1"] or None,
             "10.0.1.50 -> gpu1 in the controller's affinity table", timeout=10)
    withdrawn = _reports(rig, "gpu1", "withdrawn")
    def together(n: int) -> None:  # 60 tokens each, 20 ms a step: 1.2 s at once
        with ThreadPoolExecutor(n) as pool:
            replies = list(pool.map(lambda k: completion(
                rig, system + " " + words(f"askJ{n}k{k}x", 40), max_tokens=60,
                client="10.0.1.50"), range(n)))
        assert all(reply.status_code == 200 for reply, _ in replies)
    together(2)
    time.sleep(0.5)
    assert _affinity(rig, "10.0.1.50") == ["gpu1"]
    assert _reports(rig, "gpu1", "withdrawn") == withdrawn
    reply, _ = completion(rig, system + " " + words("askJ8x", 40), client="10.0.1.50")
    assert not reply.headers["x-tokenfabric-handoff-decision"].endswith("; shared")
    together(3)  # gpu1 has 2 slots: the third waits in its queue, in flight all the same
    wait_for(lambda: _affinity(rig, "10.0.1.50") == [] or None,
             "10.0.1.50's entry withdrawn", timeout=10)
    assert _reports(rig, "gpu1", "withdrawn") == withdrawn + 1
    shared = _reports(rig, "gpu1", "shared")
    reply, _ = completion(rig, system + " " + words("askJ9x", 40), client="10.0.1.50")
    wait_for(lambda: _reports(rig, "gpu1", "shared") > shared or None,
             "the shared address's report skipped", timeout=10)
    assert _affinity(rig, "10.0.1.50") == []
    # and its requests are weighed as a shared address's (shared_cache_weight)
    assert reply.headers["x-tokenfabric-handoff-decision"].endswith("; shared")
    reply, _ = completion(rig, system + " " + words("askJ7x", 40), client="10.0.1.51")
    assert not reply.headers["x-tokenfabric-handoff-decision"].endswith("; shared")


def _set_opt_in(rig: Rig, admin: httpx.Client, enabled: bool) -> None:
    """Tenant chat's `prefix_affinity` on or off by a policy reload, and until gpu1's
    bridge acts on it (the agent takes the tenants from its reports' answers)."""
    text = POLICY if enabled else POLICY.replace(", prefix_affinity: true", "")
    (rig.tmp / "policy.yaml").write_text(text)
    assert admin.post("/api/v1/policy/reload").status_code == 200
    def acted() -> bool | None:
        reply, _ = completion(rig, words("optK", 80), client="10.0.1.61")
        decided = "x-tokenfabric-handoff-decision" in reply.headers
        return True if decided == enabled else None
    wait_for(acted, f"gpu1's bridge with the opt-in {'on' if enabled else 'off'}",
             timeout=15)


def test_ending_the_opt_in_forgets_the_shared_addresses(rig):
    """A policy reload that ends the last opt-in makes the agent forget the shared
    addresses it learnt: opted in again, an address is one conversation's (weighed with
    `cache_weight`) until seen shared anew -- as at the first opt-in. (Before, the mark
    lasted `shared_client_s`, 300 s: the lab's later rounds of a mode started with the
    app server already shared, unlike the first.)"""
    from concurrent.futures import ThreadPoolExecutor
    system = words("sysK", 1600)
    rig.warm("gpu1", system + " q")
    with ThreadPoolExecutor(3) as pool:  # three at once: 10.0.1.60 is shared
        replies = list(pool.map(lambda k: completion(
            rig, system + " " + words(f"askK{k}x", 40), max_tokens=60,
            client="10.0.1.60"), range(3)))
    assert all(reply.status_code == 200 for reply, _ in replies)
    reply, _ = completion(rig, system + " " + words("askK5x", 40), client="10.0.1.60")
    assert reply.headers["x-tokenfabric-handoff-decision"].endswith("; shared")
    admin = httpx.Client(base_url=f"http://127.0.0.1:{rig.api_port}", timeout=10,
                         headers={"Authorization": f"Bearer {ADMIN}"})
    try:
        _set_opt_in(rig, admin, False)
        _set_opt_in(rig, admin, True)
        reply, _ = completion(rig, system + " " + words("askK6x", 40), client="10.0.1.60")
        assert reply.status_code == 200
        assert not reply.headers["x-tokenfabric-handoff-decision"].endswith("; shared")
        # and it is learnt anew as before
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda k: completion(
                rig, system + " " + words(f"askK{k}y", 40), max_tokens=60,
                client="10.0.1.60"), range(3)))
        reply, _ = completion(rig, system + " " + words("askK7x", 40), client="10.0.1.60")
        assert reply.headers["x-tokenfabric-handoff-decision"].endswith("; shared")
    finally:
        (rig.tmp / "policy.yaml").write_text(POLICY)  # the module's other tests: opted in
        admin.post("/api/v1/policy/reload")
        admin.close()


def _ledger(rig: Rig) -> tuple[int, int]:
    """Requests and completion tokens of tenant chat (id 5) in the controller's ledger."""
    rows = rig.viewer.get("/api/v1/ledger", params={"tenant_id": 5}).json()
    return sum(r["requests"] for r in rows), sum(r["completion_tokens"] for r in rows)


def _metric(text: str, pattern: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if re.match(pattern, line))


def _hits(text: str) -> float:
    return _metric(text, r"vllm:prefix_cache_hits_total")


def _aborts(text: str) -> float:
    return _metric(text, r'vllm:request_success_total\{.*finished_reason="abort"')


def _running(text: str) -> float:
    return _metric(text, r"vllm:num_requests_running")


def test_handoff_decisions_need_a_longer_prefix_and_pay_for_queueing():
    """The cost model on its own numbers (no servers): what makes it say no."""
    from tokenfabric.hostagent.handoff import HandoffSettings, LocalLoad, decide
    s = HandoffSettings(secret=b"x" * 16)
    idle = LocalLoad(0, 0, 4, 0.0, 1.0)
    peer = {"backend": "b", "address": "10.0.0.2", "cached_blocks": 50, "trusted": True,
            "capacity": 4, "running": 0, "waiting": 0, "load_age_s": 0.1}
    assert decide(s, "a", [peer], idle, 3.0, {}, 16).decision == "handoff"
    # 50 blocks x 16 tokens x 0.1 ms = 80 ms saved; a peer 2 typical requests behind: no
    queued = {**peer, "running": 4, "waiting": 4}
    assert decide(s, "a", [queued], idle, 3.0, {}, 16).decision in ("no_gain", "peer_busy")
    # we hold 47 of the 50 blocks ourselves: not markedly longer (no keys: no home)
    mine = {**peer, "backend": "a", "cached_blocks": 47}
    assert decide(s, "a", [peer, mine], idle, 3.0, {}, 16).decision == "short_prefix"
    # untrusted or stale-loaded peers are not used
    assert decide(s, "a", [{**peer, "trusted": False}], idle, 3.0, {}, 16).decision == "no_match"
    assert decide(s, "a", [{**peer, "load_age_s": 10}], idle, 3.0, {}, 16).decision == "no_match"
    # handoffs in flight to the peer count as its load: 17 > max_peer_load 4 x 4 slots
    assert decide(s, "a", [peer], idle, 3.0, {"b": 17}, 16).decision == "peer_busy"
    # 8 are within the bound, and their queue (5 beyond the slots, 1.25 s) costs more
    # than the 80 ms of prefill
    assert decide(s, "a", [peer], idle, 3.0, {"b": 8}, 16).decision == "no_gain"
