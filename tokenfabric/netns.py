"""Network namespaces and veths for tests and labs, always cleaned up.

A NetSandbox remembers everything it made and removes it in reverse order,
so a failing test or a Ctrl-C leaves no namespace, veth or process behind.
Names carry the sandbox's prefix, so parallel users never collide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence

from tokenfabric.tools import find_tool

log = logging.getLogger(__name__)


IFNAMSIZ = 15  # Linux interface names are at most 15 characters


class NetnsError(RuntimeError):
    """A namespace or link operation failed; the message carries the command's stderr."""


def _ns_prefix(ns: str | None) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


class NetSandbox:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.namespaces: list[str] = []
        self.root_links: list[str] = []
        self.processes: list[subprocess.Popen] = []

    def run(self, argv: Sequence[str], ns: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        argv = [*_ns_prefix(ns), *argv]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
        return done

    def popen(self, argv: Sequence[str], ns: str | None = None,
              **kwargs: object) -> subprocess.Popen:
        """Start a process (in `ns`); it is ended by cleanup() unless already gone."""
        proc = subprocess.Popen([*_ns_prefix(ns), *argv], start_new_session=True,
                                **kwargs)  # type: ignore[call-overload]
        self.processes.append(proc)
        return proc

    def netns(self, name: str) -> str:
        """Create namespace `<prefix><name>` with its loopback up; returns its full name."""
        full = f"{self.prefix}{name}"
        self.run(["ip", "netns", "add", full])
        self.namespaces.append(full)
        self.run(["ip", "link", "set", "lo", "up"], ns=full)
        return full

    def veth(self, a: str, b: str, ns_a: str | None = None, ns_b: str | None = None,
             mac_a: str | None = None, mac_b: str | None = None) -> tuple[str, str]:
        """A veth pair a<->b, each end moved into its namespace (None: the root namespace),
        up, without IPv6 chatter and without checksum offload (BMv2 and the kernel then
        agree on checksums)."""
        for name in (a, b):
            if len(name) > IFNAMSIZ:
                raise NetnsError(f"interface name {name!r} is longer than {IFNAMSIZ}")
        self.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        if ns_a is None or ns_b is None:
            self.root_links.append(a if ns_a is None else b)
        for name, ns, mac in ((a, ns_a, mac_a), (b, ns_b, mac_b)):
            if ns:
                self.run(["ip", "link", "set", name, "netns", ns])
            if mac:
                self.run(["ip", "link", "set", name, "address", mac], ns=ns)
            self.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], ns=ns,
                     check=False)
            self.run(["ip", "link", "set", name, "up"], ns=ns)
            if find_tool("ethtool"):
                self.run(["ethtool", "-K", name, "tx", "off", "rx", "off"], ns=ns, check=False)
        return a, b

    def addr(self, ifname: str, cidr: str, ns: str | None = None) -> None:
        self.run(["ip", "addr", "add", cidr, "dev", ifname], ns=ns)

    def cleanup(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        self.processes.clear()
        for link in reversed(self.root_links):
            self.run(["ip", "link", "del", link], check=False)
        self.root_links.clear()
        for ns in reversed(self.namespaces):
            done = self.run(["ip", "netns", "del", ns], check=False)
            if done.returncode != 0:
                log.warning("could not delete namespace %s: %s", ns, done.stderr.strip())
        self.namespaces.clear()


@contextlib.contextmanager
def sandbox(prefix: str) -> Iterator[NetSandbox]:
    """A NetSandbox that is cleaned up however the block ends."""
    box = NetSandbox(prefix)
    try:
        yield box
    finally:
        box.cleanup()


def leftovers(prefix: str) -> list[str]:
    """Namespaces and root-namespace links whose names start with `prefix` (for tests)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=False).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=False).stdout.splitlines()
    found = [n for n in names if n.startswith(prefix)]
    for line in links:
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name.startswith(prefix):
            found.append(name)
    return found
