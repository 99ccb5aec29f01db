"""Checksum offload off on the lab's interfaces, through pyroute2 (no `ethtool` binary).

A userspace switch (BMv2, OVS's netdev datapath) reads frames from AF_PACKET sockets
and never fills in a checksum the sending kernel left to the NIC: with TX offload on,
every TCP segment arrives with a bad checksum and is dropped (a dead data path that
looks like timeouts). So every host interface and switch port gets TX and RX checksum
offload off, the equivalent of `ethtool -K IF tx off rx off`.

A Mininet host's interfaces live in its network namespace: the ioctl runs in a thread
of its own that joins that namespace (setns moves only the calling thread), so the
process itself never changes namespace.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

OFFLOADS = ("tx-checksumming", "rx-checksumming")
T = TypeVar("T")


class OffloadError(RuntimeError):
    """Checksum offload could not be turned off on an interface."""


def _usable_pyroute2() -> None:
    """OffloadError where this Python has no pyroute2 that can set offload flags (0.9+):
    e.g. `mn --custom` run by Debian's python3 outside the project's venv."""
    try:
        from pyroute2.ethtool.ioctl import IoctlEthtool
    except ImportError:
        why = "pyroute2 is not installed"
    else:
        if hasattr(IoctlEthtool, "set_offload_flag"):
            return
        why = "its pyroute2 is older than 0.9 (no offload flags)"
    raise OffloadError(f"{sys.executable}: {why}; the lab turns checksum offload off through "
                       "pyroute2>=0.9, which the project's venv has (plain Mininet: run "
                       "`sudo .venv/bin/python $(command -v mn) --custom ...`)")


def _set(interfaces: Sequence[str], enabled: bool) -> dict[str, dict[str, bool]]:
    from pyroute2.ethtool.ioctl import IoctlEthtool

    states = {}
    tool = IoctlEthtool()
    try:
        for name in interfaces:
            tool.change_ifname(name)
            for flag in OFFLOADS:
                tool.set_offload_flag(flag, int(enabled))
            flags = tool.get_offload_flags()
            states[name] = {flag: flags[flag] for flag in OFFLOADS}
    finally:
        tool.close()
    return states


def _in_namespace(pid: int | None, work: Callable[[], T]) -> T:
    """`work()` in the network namespace of process `pid` (None: ours)."""
    if pid is None:
        return work()
    from pyroute2 import netns

    values: list[T] = []
    errors: list[Exception] = []

    def joined() -> None:
        try:
            netns.setns(f"/proc/{pid}/ns/net", flags=0)
            values.append(work())
        except Exception as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)

    # A new thread each time: it leaves the namespace with it when it ends.
    thread = threading.Thread(target=joined, name=f"offload-{pid}", daemon=True)
    thread.start()
    thread.join(30)
    if errors:
        raise errors[0]
    if not values:
        raise OffloadError(f"setting offloads in the namespace of pid {pid} did not finish")
    return values[0]


def set_checksum_offload(interfaces: Sequence[str], enabled: bool,
                         pid: int | None = None) -> dict[str, dict[str, bool]]:
    """TX and RX checksum offload on or off on `interfaces`, in the network namespace of
    process `pid` (a Mininet host's shell) or in ours; returns each interface's flags as
    the kernel reports them afterwards. OffloadError names the interface where it failed
    or did not take."""
    names = list(interfaces)
    _usable_pyroute2()
    try:
        states = _in_namespace(pid, lambda: _set(names, enabled))
    except OffloadError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyroute2's ioctl errors and OSError alike
        where = f" (namespace of pid {pid})" if pid is not None else ""
        raise OffloadError(f"turning checksum offload {'on' if enabled else 'off'} on "
                           f"{', '.join(names)}{where}: {type(exc).__name__}: {exc}") from exc
    wrong = [f"{name} {flag}" for name, flags in states.items()
             for flag, on in flags.items() if on != enabled]
    if wrong:
        raise OffloadError(f"checksum offload still {'off' if enabled else 'on'}: "
                           f"{', '.join(wrong)}")
    return states


def checksum_offload_off(interfaces: Sequence[str],
                         pid: int | None = None) -> dict[str, dict[str, bool]]:
    """What the lab does to every interface: `ethtool -K IF tx off rx off`."""
    return set_checksum_offload(interfaces, False, pid)
