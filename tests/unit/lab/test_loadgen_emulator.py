"""The load generator against the real vLLM emulator (hostagent), as a process on 127.0.0.1."""

import asyncio
import io
import subprocess
import sys
import time

import httpx
import pytest

from tokenfabric.lab import loadgen
from tokenfabric.lab.experiments import (
    EMULATOR_DECODE_BASE_MS,
    EMULATOR_MAX_NUM_SEQS,
    EMULATOR_PREFILL_MS_PER_TOKEN,
)
from tokenfabric.lab.loadgen import LengthDist, TenantSpec, Workload
from tokenfabric.tools import free_port

pytest.importorskip("tokenfabric.hostagent.emulator",
                    reason="the vLLM emulator (issue 5) is not here")


@pytest.fixture
def emulator():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfabric.cli", "vllm-emulator", "--port", str(port),
         "--model", "tiny-llama", "--max-num-seqs", str(EMULATOR_MAX_NUM_SEQS),
         "--decode-base-ms", str(EMULATOR_DECODE_BASE_MS),
         "--prefill-ms-per-token", str(EMULATOR_PREFILL_MS_PER_TOKEN)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"emulator did not start: {proc.stderr.read()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_loadgen_measures_the_emulator(emulator, endpoint):
    workload = Workload(url=emulator, rate=8, duration=2.0, model="tiny-llama",
                        endpoint=endpoint, lengths=LengthDist(scale=0.05, maximum=40),
                        tenants=[TenantSpec("gold", "premium", slo_ttft_ms=1000)], seed=5)
    records = asyncio.run(loadgen.run(workload, io.StringIO()))
    assert len(records) >= 8
    assert all(r["ok"] for r in records), [r["error"] for r in records if not r["ok"]]
    for r in records:
        assert r["output_tokens"] == r["max_tokens"]  # ignore_eos: exactly max_tokens
        assert r["ttft"] > 0 and r["e2e"] > r["ttft"]
        if r["tpot"] is not None:
            # one decode step per token: about decode-base-ms at speed 1
            assert EMULATOR_DECODE_BASE_MS * 0.8 / 1000 < r["tpot"] < 0.2
