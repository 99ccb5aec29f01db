"""Host set-up for direct server return, and its undoing.

- the VIP on the loopback device (/32), so the host accepts the switch's frames for it
  and answers the client from the VIP directly;
- ARP: arp_ignore=1 (answer ARP only for addresses of the asking interface, so the host
  never claims the VIP it holds on lo) and arp_announce=2 (never announce the VIP as an
  ARP source), on `all`, whose maximum with each interface's value applies;
- IP-in-IP decapsulation, for a switch that tunnels to a backend that is not local:
  an ipip device whose outer destination is the host's address, up, with reverse path
  filtering off on it and on `all` (the inner source is the client, which is not routed
  through that device).

Every change is recorded with the state it replaced and undone in reverse order by
undo(), which the agent runs on exit, SIGTERM included. A kernel without ipip support
(as on this machine) is reported in `status` and the rest goes on.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tokenfabric.tools import find_tool

log = logging.getLogger(__name__)


PROC_SYS = Path("/proc/sys")


class HostSetupError(RuntimeError):
    """A set-up step failed; the steps before it have been undone."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    ip = find_tool("ip") or "ip"
    done = subprocess.run([ip, *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise HostSetupError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def read_sysctl(name: str) -> str:
    return (PROC_SYS / name.replace(".", "/")).read_text().strip()


def write_sysctl(name: str, value: str) -> None:
    try:
        (PROC_SYS / name.replace(".", "/")).write_text(value + "\n")
    except OSError as exc:
        raise HostSetupError(f"sysctl {name}={value}: {exc.strerror}") from exc


@dataclass
class HostSetup:
    vip: str
    address: str | None = None
    decap_interface: str = "tfa-ipip0"
    decap: bool = True
    status: dict = field(default_factory=dict)
    _undo: list[tuple[str, Callable[[], object]]] = field(default_factory=list)

    def apply(self) -> dict:
        """Apply every step; on a failure undo what was done and raise HostSetupError."""
        try:
            self._vip_on_loopback()
            self._sysctl("net.ipv4.conf.all.arp_ignore", "1")
            self._sysctl("net.ipv4.conf.all.arp_announce", "2")
            if self.decap:
                self._decap()
            else:
                self.status["decap"] = "disabled"
        except Exception:
            self.undo()
            raise
        log.info("host set-up done: %s", self.status)
        return self.status

    def undo(self) -> None:
        while self._undo:
            what, step = self._undo.pop()
            try:
                step()
            except Exception as exc:  # undo the rest whatever happens to one step
                log.error("could not undo %s: %s", what, exc)

    def _vip_on_loopback(self) -> None:
        cidr = f"{self.vip}/32"
        present = _ip("-4", "-o", "addr", "show", "dev", "lo").stdout
        if f" {cidr} " in present or f"inet {self.vip}/" in present:
            self.status["vip"] = f"{cidr} already on lo"
            return
        _ip("link", "set", "lo", "up")
        _ip("addr", "add", cidr, "dev", "lo")
        self.status["vip"] = f"{cidr} added to lo"
        self._undo.append((f"VIP {cidr} on lo",
                           lambda: _ip("addr", "del", cidr, "dev", "lo", check=False)))

    def _sysctl(self, name: str, value: str) -> None:
        old = read_sysctl(name)
        self.status[name] = value
        if old == value:
            return
        write_sysctl(name, value)
        self._undo.append((f"{name}={value}", lambda: write_sysctl(name, old)))

    def _decap(self) -> None:
        dev = self.decap_interface
        args = ["link", "add", dev, "type", "ipip"]
        if self.address:
            args += ["local", self.address]
        done = _ip(*args, check=False)
        if done.returncode != 0:
            reason = done.stderr.strip()
            if "Unknown device type" in reason or "not supported" in reason.lower():
                self.status["decap"] = f"unavailable: this kernel has no ipip support ({reason})"
                log.warning("IP-in-IP decapsulation unavailable: %s; carrying on without it",
                            reason)
                return
            raise HostSetupError(f"ip {' '.join(args)}: {reason}")
        self._undo.append((f"ipip device {dev}", lambda: _ip("link", "del", dev, check=False)))
        _ip("link", "set", dev, "up")
        self._sysctl(f"net.ipv4.conf.{dev}.rp_filter", "0")
        self._sysctl("net.ipv4.conf.all.rp_filter", "0")
        self.status["decap"] = f"{dev} (ipip, local {self.address or 'any'})"
