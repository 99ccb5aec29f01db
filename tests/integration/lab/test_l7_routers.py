"""The L7 baselines against the emulator, on 127.0.0.1: vllm-router's cache_aware gets
token ids from every backend (/v1/completions/render, /v1/chat/completions/render), so it
routes by prefix instead of falling back (no `render_unavailable`); sglang-router's
cache_aware (a text radix tree, no token calls) routes by prefix too."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.hostagent.conftest import start_emulator, stop_process
from tokenfabric.tools import free_port

BIN = Path(sys.executable).parent


def router_binary(name: str) -> str:
    path = shutil.which(name) or str(BIN / name)
    if not Path(path).exists():
        pytest.skip(f"{name} is not installed (the lab extra)")
    return path


def counter(metrics: str, endpoint: str) -> float:
    found = re.search(r'tokenfabric_emulator_token_requests_total\{endpoint="'
                      + re.escape(endpoint) + r'"\} ([0-9.]+)', metrics)
    return float(found.group(1)) if found else 0.0


def run_router(command: list[str], log_path: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=open(log_path, "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_process(proc)
    raise AssertionError(f"the router did not answer: {log_path.read_text()[-3000:]}")


def send_shared_prefixes(port: int) -> list[str]:
    """Completions and chats sharing long prefixes; the backends that answered."""
    system = " ".join(f"rule{i}" for i in range(300))
    chat_system = " ".join(f"persona{i}" for i in range(300))
    backends = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for n in range(4):
            for path, body in (
                    ("/v1/completions", {"prompt": f"{system} question {n}"}),
                    ("/v1/chat/completions", {"messages": [
                        {"role": "system", "content": chat_system},
                        {"role": "user", "content": f"q{n}"}]})):
                reply = client.post(path, json={"model": "tiny", "max_tokens": 2, **body})
                assert reply.status_code == 200, reply.text
                backends.append(reply.headers["X-Tokenfabric-Backend"])
    return backends


@pytest.fixture
def two_emulators():
    emulators = [start_emulator("--speed", "10", "--model", "tiny", "--backend-name", f"b{i}")
                 for i in range(2)]
    yield emulators
    for emulator in emulators:
        stop_process(emulator.proc)


def test_vllm_router_cache_aware_uses_the_emulators_token_ids(two_emulators, tmp_path):
    binary = router_binary("vllm-router")
    port = free_port()
    log = tmp_path / "vllm-router.log"
    proc = run_router([binary, "--host", "127.0.0.1", "--port", str(port), "--policy",
                       "cache_aware", "--worker-urls", *[e.url for e in two_emulators],
                       "--log-level", "debug", "--disable-retries"], log, port)
    try:
        backends = send_shared_prefixes(port)
    finally:
        stop_process(proc)
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())
    assert "render_unavailable" not in text
    rates = [float(r) for r in re.findall(r"Cache prefix decision .*?match_rate=([0-9.]+)", text)]
    assert len(rates) == 8 and max(rates) > 0.9       # token-level prefix matches
    for emulator in two_emulators:                    # it asked every backend for token ids
        metrics = emulator.metrics()
        assert counter(metrics, "/v1/completions/render") >= 4
        assert counter(metrics, "/v1/chat/completions/render") >= 4
    # after the first of each kind, each prefix stays where its blocks are
    assert len(set(backends[2::2])) == 1 and len(set(backends[3::2])) == 1


def test_sglang_router_cache_aware_routes_by_prefix(two_emulators, tmp_path):
    binary = router_binary("sglang-router")
    port = free_port()
    proc = run_router([binary, "launch", "--host", "127.0.0.1", "--port", str(port),
                       "--policy", "cache_aware", "--worker-urls",
                       *[e.url for e in two_emulators], "--log-level", "info"],
                      tmp_path / "sglang-router.log", port)
    try:
        backends = send_shared_prefixes(port)
    finally:
        stop_process(proc)
    assert len(set(backends[2::2])) == 1 and len(set(backends[3::2])) == 1
    hits = 0.0
    for emulator in two_emulators:
        metrics = emulator.metrics()
        hits += float(re.search(r"vllm:prefix_cache_hits_total\{[^}]*\} ([0-9.]+)",
                                metrics).group(1))
    assert hits >= 6 * 288                          # 3 repeats x 2 prefixes, 18 blocks each
