"""Agent configuration, RoCE commands, and the beacons the agent puts on the wire."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tokenfabric.beacon import BeaconFlags
from tokenfabric.config import ConfigError
from tokenfabric.hostagent import roce
from tokenfabric.hostagent.beacons import BeaconSender
from tokenfabric.hostagent.config import load
from tokenfabric.hostagent.tenants import TenantTable, retry_after_seconds, tenant_from_json

GOLDEN = json.loads((Path(__file__).resolve().parents[2] / "data" / "beacons.json").read_text())

GOOD = """
agent:
  name: gpu1
  address: 10.0.0.11
  mac: "00:00:00:00:00:11"
  switch: s1
  port: 1
  vip: 10.100.0.1
  token: abc
"""


def write(tmp_path, text) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_config_defaults_and_derived_values(tmp_path):
    cfg = load(write(tmp_path, GOOD), {})
    assert (cfg.listen_address, cfg.listen_port, cfg.host) == ("10.100.0.1", 8000, "gpu1")
    assert cfg.beacon_addr == ("169.254.42.1", 7420)
    assert cfg.auth_token() == "abc" and cfg.beacon_interval == 0.02


@pytest.mark.parametrize("line, message", [
    ("  address: 10.0.0.300", "agent.address"),
    ("  mac: zz", "agent.mac"),
    ("  mode: sideways", "agent.mode"),
    ("  beacon_interval: 0", "agent.beacon_interval"),
    ("  capacity: 0", "agent.capacity"),
    ("  colour: blue", "unknown key"),
    ("  max_connections: 0", "agent.max_connections"),
    ("  max_headers: -1", "agent.max_headers"),
    ("  max_body_bytes: many", "agent.max_body_bytes"),
    ("  max_buffered_bytes: 1000", "agent.max_buffered_bytes must be at least"),
    ("  head_timeout: 0", "agent.head_timeout"),
    ("  delivery_wait: -1", "agent.delivery_wait"),
    ("  delivery_wait: soon", "agent.delivery_wait"),
])
def test_config_errors_name_the_key(tmp_path, line, message):
    key = line.split(":")[0]
    lines = [x for x in GOOD.splitlines() if x.split(":")[0] != key]  # a key once (YAML)
    text = "\n".join([*lines, line]) + "\n"
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text), {})


def test_controller_urls_from_file_env_and_flags(tmp_path, monkeypatch):
    """Controller replicas (docs/replicas.md): a list, a comma-separated string (env), or
    the repeated flag; without them, controller_url alone."""
    assert load(write(tmp_path, GOOD), {}).controller_urls == ["http://127.0.0.1:8080"]
    text = GOOD + "  controller_urls: [http://a:8080/, 'https://b:8443']\n"
    assert load(write(tmp_path, text), {}).controller_urls == ["http://a:8080",
                                                               "https://b:8443"]
    monkeypatch.setenv("TOKENFABRIC_AGENT__CONTROLLER_URLS", "http://c:1, http://d:2")
    assert load(write(tmp_path, GOOD), {}).controller_urls == ["http://c:1", "http://d:2"]
    flags = {"controller_urls": ["http://e:3"]}
    assert load(write(tmp_path, GOOD), flags).controller_urls == ["http://e:3"]


@pytest.mark.parametrize("value, message", [
    ("[ftp://a]", "is not an http"),
    ("[http://a:1, http://a:1/]", "named twice"),
    ("{a: 1}", "must be a list"),
    ("[http://a b]", "is not an http"),
])
def test_bad_controller_urls_are_refused(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, GOOD + f"  controller_urls: {value}\n"), {})


def test_bridge_limits_reach_the_bridge(tmp_path):
    from tokenfabric.hostagent.agent import Agent

    text = GOOD + ("  max_connections: 7\n  max_buffered_bytes: 33554432\n  head_timeout: 2\n"
                   "  delivery_wait: 0.5\n")
    agent = Agent(load(write(tmp_path, text), {"max_header_bytes": 8192}))
    try:
        bridge = agent.bridge
        assert (bridge.settings.max_connections, bridge.budget.limit,
                bridge.limits.head_timeout, bridge.limits.max_head) == (7, 33554432, 2, 8192)
        assert bridge.settings.delivery_wait == 0.5
        assert bridge.limits.max_body == 16 * 1024 * 1024 and bridge.limits.max_headers == 100
    finally:
        agent.beacons.close()


def test_config_requires_identity(tmp_path):
    with pytest.raises(ConfigError, match="agent.name is required"):
        load(write(tmp_path, "agent:\n  vip: 10.0.0.1\n"), {})


def test_token_from_file(tmp_path):
    (tmp_path / "token").write_text("from-file\n")
    text = GOOD.replace("  token: abc\n", f"  token_file: {tmp_path / 'token'}\n")
    assert load(write(tmp_path, text), {}).auth_token() == "from-file"


def test_agent_run_with_bad_config_exits_4(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "agent", "run", "--config",
                           str(write(tmp_path, GOOD + "  mode: x\n"))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 4 and "agent.mode" in done.stderr


def test_tenant_lookup_is_longest_prefix():
    table = TenantTable.from_json([
        {"tenant_id": 1, "name": "wide", "prefixes": ["10.0.0.0/8"], "tokens_per_s": 10},
        {"tenant_id": 2, "name": "narrow", "prefixes": ["10.1.0.0/16"]},
    ])
    assert table.by_address("10.1.2.3").name == "narrow"
    assert table.by_address("10.2.2.3").name == "wide"
    assert table.by_address("192.0.2.1").tenant_id == 0
    assert table.by_address("not an address").tenant_id == 0


@pytest.mark.parametrize("item", [{"name": "x"}, {"tenant_id": 0, "name": "x"},
                                  {"tenant_id": 1, "name": "x", "prefixes": ["nope"]}, "x"])
def test_bad_tenants_are_refused(item):
    with pytest.raises(ValueError):
        tenant_from_json(item)


def test_retry_after_from_refill_rate():
    table = TenantTable.from_json([{"tenant_id": 1, "name": "a", "tokens_per_s": 100}])
    assert retry_after_seconds(table.tenants[0], 512) == 6      # ceil(512 / 100)
    assert retry_after_seconds(table.tenants[0], 10) == 1
    assert retry_after_seconds(table.by_address("1.1.1.1"), 512) == 60


def test_retry_after_uses_the_switch_s_integer_rate():
    """The switch refills max(1, round(tpm / 60)) whole tokens per second: a contract of
    24 tpm (0.4 tokens/s) refills 1 token/s, one of 6036 tpm (100.6/s) 101 tokens/s."""
    table = TenantTable.from_json([
        {"tenant_id": 1, "name": "slow", "tokens_per_s": 0.4},
        {"tenant_id": 2, "name": "odd", "tokens_per_s": 100.6}])
    assert retry_after_seconds(table.tenants[0], 512) == 512   # not ceil(512 / 0.4) = 1280
    assert retry_after_seconds(table.tenants[1], 5050) == 50   # 5050 / 101, not 50.2 -> 51
    assert retry_after_seconds(table.tenants[0], 10**6) == 3600


def test_roce_dry_run_prints_exact_commands():
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "agent", "roce", "--dry-run",
                           "--netdev", "ens1f0", "--rdma-dev", "mlx5_0", "--dscp", "24"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "dcb app replace dev ens1f0 dscp-prio 24:3 48:6",
        "dcb pfc set dev ens1f0 prio-pfc 0:off 1:off 2:off 3:on 4:off 5:off 6:off 7:off",
        "sh -c 'echo 1 > /sys/class/net/ens1f0/ecn/roce_np/enable/3'",
        "sh -c 'echo 1 > /sys/class/net/ens1f0/ecn/roce_rp/enable/3'",
        "sh -c 'echo 48 > /sys/class/net/ens1f0/ecn/roce_np/cnp_dscp'",
        "sh -c 'echo 6 > /sys/class/net/ens1f0/ecn/roce_np/cnp_802p_prio'",
        "sh -c 'echo 96 > /sys/kernel/config/rdma_cm/mlx5_0/ports/1/default_roce_tos'",
    ]


def test_roce_without_device_says_so_and_succeeds():
    if roce.rdma_devices():
        pytest.skip("this machine has an RDMA device")
    status = roce.apply(roce.RoceQos())
    assert status["present"] is False and "no RDMA device" in status["message"]
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "agent", "roce"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "no RDMA device" in done.stdout


def test_roce_devices_found_in_sysfs_layout(tmp_path):
    (tmp_path / "mlx5_0" / "device" / "net" / "ens1f0").mkdir(parents=True)
    (tmp_path / "rxe0").mkdir()
    assert roce.rdma_devices(tmp_path) == {"mlx5_0": ["ens1f0"], "rxe0": []}


@pytest.mark.parametrize("values", [{"dscp": 64}, {"priority": 8}, {"colour": 1}])
def test_roce_bad_values(values):
    with pytest.raises(ValueError):
        roce.RoceQos.from_dict(values)


@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_sender_puts_golden_bytes_on_the_wire(case):
    """The agent's sender emits exactly the bytes the dataplane's tests expect."""
    trap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    trap.bind(("127.0.0.1", 0))
    trap.settimeout(2)
    sender = BeaconSender(trap.getsockname())
    fields = case["fields"]
    sender.seq = fields.get("seq", 0)
    try:
        if case["type"] == "LoadBeacon":
            flags = BeaconFlags(fields.get("flags", 0))
            sender.load(fields["backend_id"], fields["load"], fields.get("running", 0),
                        fields.get("waiting", 0), down=BeaconFlags.DOWN in flags,
                        draining=BeaconFlags.DRAINING in flags)
        else:
            sender.usage(fields["backend_id"], fields["tenant_id"], fields["prompt_tokens"],
                         fields["completion_tokens"])
        assert trap.recv(64).hex() == case["hex"]
    finally:
        sender.close()
        trap.close()
