"""Host set-up inside a network namespace made by the test: applied, then undone on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tokenfabric import yamlio
from tokenfabric.netns import leftovers, sandbox

pytestmark = pytest.mark.root

VIP = "10.100.0.1"
PREFIX = "tfa-"


def ns_read(box, ns: str, path: str) -> str:
    return box.run(["cat", path], ns=ns).stdout.strip()


def lo_addresses(box, ns: str) -> str:
    return box.run(["ip", "-4", "-o", "addr", "show", "dev", "lo"], ns=ns).stdout


def links(box, ns: str) -> str:
    return box.run(["ip", "-o", "link", "show"], ns=ns).stdout


def test_host_setup_applied_and_undone_on_sigterm():
    with sandbox(PREFIX) as box:
        ns = box.netns("hs")
        proc = box.popen([sys.executable, "-m", "tokenfabric.cli", "agent", "host-setup",
                          "--vip", VIP, "--address", "10.0.0.11"], ns=ns,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        status = json.loads(proc.stdout.readline())
        assert f"inet {VIP}/32" in lo_addresses(box, ns)
        assert ns_read(box, ns, "/proc/sys/net/ipv4/conf/all/arp_ignore") == "1"
        assert ns_read(box, ns, "/proc/sys/net/ipv4/conf/all/arp_announce") == "2"
        if status["decap"].startswith("unavailable"):
            assert "ipip" in status["decap"]  # this kernel: said so, and carried on
        else:
            assert "tfa-ipip0" in links(box, ns)
            assert ns_read(box, ns, "/proc/sys/net/ipv4/conf/tfa-ipip0/rp_filter") == "0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read()
        assert VIP not in lo_addresses(box, ns)
        assert ns_read(box, ns, "/proc/sys/net/ipv4/conf/all/arp_ignore") == "0"
        assert ns_read(box, ns, "/proc/sys/net/ipv4/conf/all/arp_announce") == "0"
        assert "tfa-ipip0" not in links(box, ns)
    assert not leftovers(PREFIX + "hs")


def test_agent_run_serves_the_vip_and_undoes_the_setup_on_sigterm(tmp_path):
    config = {"agent": {
        "name": "gpu1", "address": "10.0.0.11", "mac": "00:00:00:00:00:11", "switch": "s1",
        "port": 1, "vip": VIP, "vip_port": 8000, "host_setup": True,
        "vllm_url": "http://127.0.0.1:9",           # nothing there: the bridge answers 502
        "controller_url": "http://127.0.0.1:9", "beacon_target": "127.0.0.1:7420"}}
    path = tmp_path / "agent.yaml"
    path.write_text(yamlio.dump(config))
    probe = (f"import socket,sys; s=socket.create_connection(('{VIP}',8000),timeout=5); "
             "s.sendall(b'GET /v1/models HTTP/1.1\\r\\nhost: x\\r\\n\\r\\n'); "
             "sys.stdout.write(s.recv(4096).decode())")
    with sandbox(PREFIX) as box:
        ns = box.netns("ar")
        proc = box.popen([sys.executable, "-m", "tokenfabric.cli", "agent", "run", "--config",
                          str(path)], ns=ns, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
        deadline, answer = time.monotonic() + 15, ""
        while time.monotonic() < deadline and not answer.startswith("HTTP/1.1 502"):
            time.sleep(0.2)
            answer = box.run([sys.executable, "-c", probe], ns=ns, check=False).stdout
        assert answer.startswith("HTTP/1.1 502"), proc.stderr.read() if proc.poll() else answer
        assert "connection: close" in answer.lower()
        assert ns_read(box, ns, "/proc/sys/net/ipv4/conf/all/arp_ignore") == "1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert VIP not in lo_addresses(box, ns)
        assert ns_read(box, ns, "/proc/sys/net/ipv4/conf/all/arp_ignore") == "0"
    assert not leftovers(PREFIX + "ar")


def test_failed_setup_leaves_nothing_changed():
    with sandbox(PREFIX) as box:
        ns = box.netns("bad")
        done = box.run([sys.executable, "-m", "tokenfabric.cli", "agent", "host-setup",
                        "--vip", "not-an-address"], ns=ns, check=False)
        assert done.returncode == 1 and "host-setup failed" in done.stderr
        assert ns_read(box, ns, "/proc/sys/net/ipv4/conf/all/arp_ignore") == "0"
        assert "not-an-address" not in lo_addresses(box, ns)
