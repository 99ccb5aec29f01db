"""Fixtures of the host agent's tests: real processes and real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from tokenfabric.tools import free_port

TOKEN = "test-token"


def wait_http(url: str, deadline: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {deadline} s")


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


@dataclass
class Emulator:
    url: str
    port: int
    proc: subprocess.Popen

    def fault(self, kind: str, factor: float = 4.0) -> None:
        body = json.dumps({"fault": kind, "factor": factor}).encode()
        request = urllib.request.Request(f"{self.url}/admin/fault", body, method="POST")
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert reply.status == 200

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as reply:
            return reply.read().decode()


def start_emulator(*args: str) -> Emulator:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tokenfabric.cli", "vllm-emulator",
                             "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    emulator = Emulator(f"http://127.0.0.1:{port}", port, proc)
    try:
        wait_http(f"{emulator.url}/health", proc=proc)
    except Exception:
        stop_process(proc)
        raise
    return emulator


@pytest.fixture
def emulator_factory() -> Iterator:
    started: list[Emulator] = []

    def make(*args: str) -> Emulator:
        emulator = start_emulator(*args)
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        stop_process(emulator.proc)


@pytest.fixture
def emulator(emulator_factory) -> Emulator:
    # Ten times an A100's speed keeps the tests short; the timing tests set their own.
    return emulator_factory("--speed", "10", "--model", "tiny")


@dataclass
class ControllerStub:
    """A real HTTP server recording the agent's calls to the controller's REST API."""
    tenants: list[dict]
    backend_id: int = 7
    calls: list[tuple[str, str, dict | None, str | None]] = field(default_factory=list)
    report_status: int = 200
    report_answer: dict = field(default_factory=lambda: {"ok": True})
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/backends", self.register)
        app.router.add_delete("/api/v1/backends/{name}", self.delete)
        app.router.add_post("/api/v1/backends/{name}/report", self.report)
        return app

    def _record(self, request: web.Request, body: dict | None) -> None:
        self.calls.append((request.method, request.path, body,
                           request.headers.get("Authorization")))

    async def register(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._record(request, body)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"detail": "bad token"}, status=401)
        return web.json_response({"backend_id": self.backend_id, "tenants": self.tenants},
                                 status=201)

    async def delete(self, request: web.Request) -> web.Response:
        self._record(request, None)
        return web.Response(status=204)

    async def report(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._record(request, body)
        return web.json_response(self.report_answer, status=self.report_status)

    def of(self, method: str, suffix: str = "") -> list:
        return [c for c in self.calls if c[0] == method and c[1].endswith(suffix)]


TENANTS = [
    {"tenant_id": 11, "name": "gold", "prefixes": ["127.0.0.2/32"], "tokens_per_s": 100},
    {"tenant_id": 12, "name": "bronze", "prefixes": ["127.0.0.3/32", "10.20.0.0/16"],
     "tokens_per_s": 1000},
]


@pytest.fixture
def controller_stub() -> Iterator[ControllerStub]:
    """The stub served from its own thread's event loop, so sync and async tests can use it."""
    import threading

    stub = ControllerStub(tenants=[dict(t) for t in TENANTS])
    port = free_port()
    stub.url = f"http://127.0.0.1:{port}"
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(stub.app(), access_log=None)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield stub
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


class BeaconTrap:
    """A UDP socket on 127.0.0.1 standing in for the switch's beacon port."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[float, bytes]] = []

    def collect(self, seconds: float) -> list[tuple[float, bytes]]:
        end = time.monotonic() + seconds
        got = []
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                data = self.sock.recv(2048)
                got.append((time.monotonic(), data))
        self.received += got
        return got


@pytest.fixture
def beacon_trap() -> Iterator[BeaconTrap]:
    trap = BeaconTrap()
    yield trap
    trap.sock.close()


def wait_for(predicate, seconds: float, what: str):
    """The first truthy value of predicate() within `seconds`, else an AssertionError."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def env_without_config() -> dict:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("TOKENFABRIC_AGENT__") and k != "TOKENFABRIC_CONFIG"}
