"""Hostile clients against a real controller process (`tokenfabric controller run`) on 127.0.0.1.

Raw sockets for what an HTTP library would not send, generated inputs, and the
server's own memory from /proc/PID/status (VmHWM: its peak resident set). Each
attack is bounded in bytes and in seconds. Bounds stated here (docs/rest.md):
- a 150 MB chunked body without a token: 401, and the server's peak RSS grows by
  less than 16 MB (it reads none of it);
- the same body with an admin token: 413 once 16 MiB are read, peak RSS grows by
  less than 80 MB (the 16 MiB it had to read, held while being counted);
- /metrics stays under 64 kB after 20 reports of 2,000 new model names each;
- /healthz answers within 100 ms while the largest policy apply runs.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.policygen import policy_text
from tests.integration.api.conftest import ADMIN, AGENT, FABRIC, POLICY, VIEWER
from tokenfabric import yamlio
from tokenfabric.tools import free_port

MB = 1024 * 1024


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen

    def client(self, token: str | None = ADMIN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def memory_kb(self, field: str = "VmHWM") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    files = tmp_path_factory.mktemp("hostile")
    (files / "fabric.yaml").write_text(FABRIC)
    (files / "policy.yaml").write_text(POLICY)
    (files / "tokens.yaml").write_text(yamlio.dump({
        ADMIN: {"name": "ops", "role": "admin"}, AGENT: {"name": "agents", "role": "agent",
                                                 "backends": ["*"]},
        VIEWER: {"name": "grafana", "role": "viewer"}}))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfabric.cli", "controller", "run",
         "--fabric", str(files / "fabric.yaml"), "--policy", str(files / "policy.yaml"),
         "--tokens", str(files / "tokens.yaml"), "--ledger", str(files / "ledger.db"),
         "--listen", f"127.0.0.1:{port}", "--openflow-listen", f"127.0.0.1:{free_port()}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the controller did not start in 60 s"
        try:
            httpx.get(f"{url}/healthz", timeout=1).raise_for_status()
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        yield Server(url, port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def stream_chunked(port: int, path: str, headers: dict[str, str], total: int,
                   seconds: float) -> tuple[bytes, int]:
    """Send a chunked body of up to `total` bytes (1 MiB chunks) while reading the answer;
    returns (the answer's first bytes, bytes sent) once the server answered or gave up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=seconds)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 f"Content-Type: application/json\r\n{head}\r\n".encode())
    sent = 0
    answer = bytearray()
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                data = sock.recv(65536)
                if not data:
                    break
                answer.extend(data)
                if complete(bytes(answer)):
                    break
        except OSError:
            pass
        stop.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    chunk = b"%x\r\n" % MB + b"[" * MB + b"\r\n"  # the worst body: all nesting
    deadline = time.monotonic() + seconds
    try:
        while sent < total and not stop.is_set() and time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += MB
    except OSError:  # the server answered and closed: what we hope for
        pass
    reader.join(timeout=max(0.1, deadline - time.monotonic()))
    stop.set()
    sock.close()
    return bytes(answer), sent


def complete(answer: bytes) -> bool:
    """A whole answer with a Content-Length: its headers and that many bytes."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def test_chunked_body_without_token_is_401_unread(server):
    before = server.memory_kb()
    answer, sent = stream_chunked(server.port, "/api/v1/policy/validate", {}, 150 * MB, 30)
    assert status_of(answer) == 401, answer[:300]
    assert b'"unauthorized"' in answer
    grown_mb = (server.memory_kb() - before) / 1024
    print(f"no token: {sent / MB:.0f} MB sent, peak RSS {before / 1024:.1f} MB -> "
          f"{server.memory_kb() / 1024:.1f} MB")
    assert grown_mb < 16, f"peak RSS grew {grown_mb:.1f} MB for {sent / MB:.0f} MB sent"
    assert server.client(None).get("/healthz").status_code == 200


def test_chunked_body_over_the_limit_is_413_while_read(server):
    before = server.memory_kb()
    answer, sent = stream_chunked(server.port, "/api/v1/policy/validate",
                                  {"Authorization": f"Bearer {ADMIN}"}, 150 * MB, 60)
    assert status_of(answer) == 413, answer[:300]
    assert b'"too_large"' in answer
    assert sent < 100 * MB, f"{sent / MB:.0f} MB were taken before the 413"
    grown_mb = (server.memory_kb() - before) / 1024
    print(f"admin token: {sent / MB:.0f} MB sent, peak RSS {before / 1024:.1f} MB -> "
          f"{server.memory_kb() / 1024:.1f} MB")
    assert grown_mb < 80, f"peak RSS grew {grown_mb:.1f} MB"


def test_content_length_over_the_limit_is_413_at_once(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /api/v1/backends/gpu1-llama/report HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {AGENT}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {200 * MB}\r\n\r\n".encode())
        start = time.monotonic()
        answer = sock.recv(65536)  # no body byte sent: the answer cannot have waited for it
    assert status_of(answer) == 413 and time.monotonic() - start < 5
    for bad in ("12a", "-1", "١٢"):  # not digits (the last: Arabic-Indic digits)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"POST /api/v1/policy/validate HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {ADMIN}\r\n".encode()
                         + b"Content-Length: " + bad.encode() + b"\r\n\r\n")
            assert status_of(sock.recv(65536)) == 400, bad


def report(depth_of_metrics: int = 1, models: list[str] | None = None) -> dict:
    metrics: object = 1
    for _ in range(depth_of_metrics):
        metrics = {"a": metrics}
    usage = [{"tenant_id": 1 + i % 2, "model": m, "prompt_tokens": 1, "completion_tokens": 1}
             for i, m in enumerate(models or [])]
    return {"running": 0, "waiting": 0, "kv_cache_usage": 0.1, "healthy": True,
            "usage": usage, "metrics": metrics}


def test_deep_or_odd_json_is_4xx_and_the_views_stay_200(server):
    agent, viewer = server.client(AGENT), server.client(VIEWER)
    path = "/api/v1/backends/gpu1-llama/report"
    for depth in (300, 3000, 100_000):  # beyond the body's 32 levels: 400 before pydantic
        body = json.dumps(report(0)).replace('"metrics": 1', '"metrics": ' + "[" * depth
                                            + "]" * depth)
        r = agent.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "deeper" in r.json()["error"]["message"], r.text
    r = agent.post(path, json=report(depth_of_metrics=300))  # the report: 400
    assert r.status_code == 400 and "deeper" in r.json()["error"]["message"], r.text
    r = agent.post(path, json=report(depth_of_metrics=10))  # within 32, beyond metrics' 4
    assert r.status_code == 422, r.text
    nan = json.dumps(report(0)).replace('"metrics": 1', '"metrics": {"x": NaN}')
    r = agent.post(path, content=nan, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "NaN" in r.json()["error"]["message"]
    rng = random.Random(16)
    for _ in range(40):  # generated: random nesting, sizes and values
        depth = rng.choice([1, 2, 3, 4, 5, 8, 33, 200])
        value: object = rng.choice([0, -1.5, "x" * rng.randrange(100), None, True])
        for _ in range(depth):
            # (one `value` per level: a value used twice per level would double each time)
            value = rng.choice([{"k": value}, [value], {"a": value, "b": [1, "x"]}])
        r = agent.post(path, json={**report(), "metrics": {"m": value}, "rdma": {"r": value}})
        assert r.status_code in (200, 400, 422), r.text
        backends = viewer.get("/api/v1/backends")
        assert backends.status_code == 200, backends.text
        assert viewer.get("/api/v1/backends/gpu1-llama").status_code == 200


def test_bad_json_is_400_after_auth(server):
    for token, status in ((None, 401), ("not-a-known-token-000000", 401), (VIEWER, 400),
                          (AGENT, 400), (ADMIN, 400)):
        r = server.client(token).post("/api/v1/backends", content=b"{nope",
                                      headers={"content-type": "application/json"})
        assert r.status_code == status, (token, r.text)
        assert r.json()["error"]["code"] == ("unauthorized" if status == 401 else "bad_request")


def test_made_up_label_values_do_not_grow_metrics(server):
    agent = server.client(AGENT)
    before = len(server.client(None).get("/metrics").content)
    rng = random.Random(2000)
    for i in range(20):  # 2,000 new names in each report: 40,000 in all
        names = [f"model-{rng.getrandbits(64):016x}" for _ in range(2000)]
        r = agent.post("/api/v1/backends/gpu1-llama/report", json=report(models=names))
        assert r.status_code == 200, r.text
        sent_raw = (f"M{i}THOD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(sent_raw.encode())  # a made-up method: counted as `other`
            sock.recv(65536)
    text = server.client(None).get("/metrics").text
    print(f"/metrics: {before} bytes -> {len(text)} bytes after 20 reports of 2,000 new "
          "model names each")
    assert len(text) < 64 * 1024, f"/metrics is {len(text)} bytes (was {before})"
    assert 'model="other"' in text and "model-" not in text
    assert 'method="other"' in text and "M0THOD" not in text


def heavy_admin_calls(server: Server, bodies: dict[str, bytes]) -> float:
    """Run the heaviest admin calls while /healthz is polled every 10 ms; the worst latency."""
    admin = server.client(ADMIN)
    json_type = {"content-type": "application/json"}
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            while not done.is_set() and len(latencies) < 5000:
                start = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        time.sleep(0.3)
        # (bodies encoded beforehand: this process's own work must not delay the poller)
        validated = admin.post("/api/v1/policy/validate", content=bodies["bad"],
                               headers=json_type)
        rejected = admin.post("/api/v1/policy/apply", content=bodies["bad"], headers=json_type)
        applied = admin.post("/api/v1/policy/apply", content=bodies["good"], headers=json_type)
        tenants = admin.get("/api/v1/tenants")
        time.sleep(0.3)
    finally:
        done.set()
        poller.join(timeout=30)
        admin.post("/api/v1/policy/apply", json={"yaml": POLICY})
    assert validated.status_code == 200 and not validated.json()["valid"]
    errors = validated.json()["errors"]
    assert len(errors) == 41 and errors[-1].endswith("and 19961 more errors"), errors[-3:]
    assert rejected.status_code == 422, rejected.text[:300]
    assert applied.status_code == 200 and applied.json()["tenants"] == 4000, applied.text[:300]
    assert tenants.status_code == 200 and len(tenants.json()) == 4000
    assert len(latencies) > 20
    return max(latencies)


def test_healthz_stays_responsive_during_the_heaviest_admin_calls(server):
    """The issue's 20,000 tenants (~1.7 MB) validated and applied (both refused), then
    4,000 tenants (near the dataplane's 4,095) applied: parsed, compiled and handed to
    the southbound. The machine is shared: a run over the bound is repeated (at most
    3 runs); a loop that parses on itself is over it every time (seconds, not ms)."""
    bodies = {"bad": json.dumps({"yaml": policy_text(20_000, unknown_key=True)}).encode(),
              "good": json.dumps({"yaml": policy_text(4_000)}).encode()}
    worst: list[float] = []
    for _ in range(3):
        worst.append(heavy_admin_calls(server, bodies))
        if worst[-1] < 0.1:
            break
    print(f"/healthz: max {', '.join(f'{w * 1000:.1f}' for w in worst)} ms per run")
    assert min(worst) < 0.1, f"/healthz took up to {min(worst) * 1000:.0f} ms in each run"
