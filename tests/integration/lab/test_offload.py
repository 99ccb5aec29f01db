"""Checksum offload through pyroute2, without the ethtool binary: off (and on) on a real
veth in a namespace of its own, and our own namespace never changes."""

import os
import subprocess

import pytest

from tokenfabric.lab.offload import OffloadError, checksum_offload_off, set_checksum_offload

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]


@pytest.fixture
def veth_in_a_namespace():
    """(pid holding a fresh network namespace, the veth end inside it, the end outside)."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    inside, outside = "tfxoffb", "tfxoffa"
    try:
        for _ in range(50):  # until unshare has made the namespace
            if os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            subprocess.run(["sleep", "0.05"], check=True)
        subprocess.run(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside],
                       check=True)
        subprocess.run(["ip", "link", "set", inside, "netns", str(holder.pid)], check=True)
        yield holder.pid, inside, outside
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True, check=False)
        holder.kill()
        holder.wait()


def test_offload_off_and_on_inside_a_namespace(veth_in_a_namespace):
    pid, inside, outside = veth_in_a_namespace
    ours = os.readlink("/proc/self/ns/net")
    states = checksum_offload_off([inside], pid)
    assert states == {inside: {"tx-checksumming": False, "rx-checksumming": False}}
    assert os.readlink("/proc/self/ns/net") == ours  # only the helper thread moved
    assert set_checksum_offload([inside], True, pid)[inside]["tx-checksumming"] is True
    # the end in our namespace, directly
    assert checksum_offload_off([outside])[outside]["tx-checksumming"] is False
    # an interface that is not in that namespace is named in the error
    with pytest.raises(OffloadError, match=outside):
        checksum_offload_off([outside], pid)
