"""The failover evidence: a real tcpdump on lo sees real LOAD beacons and SYNs, and the
parser finds them (and ignores USAGE beacons, other hosts' beacons and ACKed segments)."""

import shutil
import socket
import subprocess
import time

import pytest

from tokenfabric.beacon import BEACON_PORT
from tokenfabric.hostagent.beacons import BeaconSender
from tokenfabric.lab import capture
from tokenfabric.tools import free_port

pytestmark = [pytest.mark.root, pytest.mark.timeout(30),
              pytest.mark.skipif(shutil.which("tcpdump") is None, reason="no tcpdump")]


def test_capture_finds_load_beacons_and_new_connections(tmp_path):
    port = free_port()
    out = tmp_path / "cap.pcap"
    proc = subprocess.Popen(capture.tcpdump_argv(shutil.which("tcpdump"), "lo", out, port),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        sender = BeaconSender(("127.0.0.1", BEACON_PORT), "127.0.0.1")
        other = BeaconSender(("127.0.0.1", BEACON_PORT), "127.0.0.3")
        t0 = time.time()
        for _ in range(3):
            sender.load(5, 100, 1, 0, False)
            sender.usage(5, 11, 10, 0)  # a USAGE beacon is not a LOAD one
            other.load(6, 100, 1, 0, False)  # another host's
            time.sleep(0.02)
        t1 = time.time()
        for _ in range(2):  # nothing listens: refused, but the SYN reached the host
            with socket.socket() as s, pytest.raises(ConnectionRefusedError):
                s.connect(("127.0.0.1", port))
        listener = socket.create_server(("127.0.0.1", 0))  # a SYN to another port
        with listener, socket.create_connection(listener.getsockname()):
            pass
        t2 = time.time()
        time.sleep(0.5)
        sender.close()
        other.close()
    finally:
        proc.terminate()
        proc.wait(5)
    found = capture.host_evidence(out, "127.0.0.1", "127.0.0.1", port)
    assert len(found.load_beacons) == 3, proc.stderr.read()
    assert all(t0 - 0.01 <= t <= t1 + 0.01 for t in found.load_beacons)
    assert len(found.syns) == 2
    assert all(t1 - 0.01 <= t <= t2 + 0.01 for t in found.syns)


def test_read_pcap_rejects_a_file_that_is_not_one(tmp_path):
    bad = tmp_path / "x.pcap"
    bad.write_bytes(b"not a capture at all, certainly not")
    with pytest.raises(ValueError, match="not a pcap"):
        capture.read_pcap(bad)
