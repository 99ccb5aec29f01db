"""NetSandbox on the real kernel: namespaces, veths, traffic, and nothing left behind."""

import subprocess

import pytest

from tokenfabric.netns import NetnsError, leftovers, sandbox

pytestmark = pytest.mark.root

PREFIX = "tfut-"


def test_two_namespaces_talk_over_a_veth_and_vanish():
    with sandbox(PREFIX) as box:
        a, b = box.netns("a"), box.netns("b")
        box.veth("tfut-va", "tfut-vb", a, b)
        box.addr("tfut-va", "10.99.0.1/30", a)
        box.addr("tfut-vb", "10.99.0.2/30", b)
        ping = box.run(["ping", "-c", "1", "-W", "2", "10.99.0.2"], ns=a, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert sorted(leftovers(PREFIX)) == [a, b]
    assert leftovers(PREFIX) == []


def test_cleanup_runs_on_failure_and_ends_processes():
    with pytest.raises(RuntimeError), sandbox(PREFIX) as box:
        ns = box.netns("p")
        box.veth("tfut-r0", "tfut-r1", None, ns)
        proc = box.popen(["sleep", "30"], ns=ns)
        raise RuntimeError("test body failed")
    assert proc.poll() is not None
    assert leftovers(PREFIX) == []


def test_errors_carry_the_command_and_its_reason():
    with sandbox(PREFIX) as box, pytest.raises(NetnsError, match="longer than 15"):
        box.veth("tfut-this-name-is-too-long", "tfut-x")
    with sandbox(PREFIX) as box, pytest.raises(NetnsError, match="ip netns exec"):
        box.run(["false"], ns=box.netns("e"))
    assert subprocess.run(["ip", "netns", "list"], capture_output=True,
                          text=True).stdout.count(PREFIX) == 0
