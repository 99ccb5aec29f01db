"""Open vSwitch for the lab: its daemons, and a Mininet switch on its userspace datapath.

The kernel here has no OVS datapath module, so every bridge is `datapath_type=netdev`
(ovs-vswitchd forwards in userspace over AF_PACKET sockets). `ovs-ctl start` gives up
when it cannot load the kernel module, so `ensure_ovs` starts ovsdb-server and
ovs-vswitchd itself where they are not running, and `OvsDaemons.stop` ends only the
daemons it started, by PID, and only when no bridge is left in OVS (someone else's).

One userspace ovs-vswitchd per network namespace: the first creates the tap device
`ovs-netdev`, and a second one fails every netdev bridge. `check_bridges` turns that
(and any other bridge that did not come up as planned) into a clear error.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mininet.node import OVSSwitch

from tokenfabric.lab.offload import checksum_offload_off
from tokenfabric.tools import find_tool

log = logging.getLogger(__name__)


# The controller's OpenFlow listener (the contract with controller/openflow).
OPENFLOW_CONTROLLER = "tcp:127.0.0.1:6653"
OPENFLOW_VERSION = "OpenFlow13"

RUNDIR = Path(os.environ.get("OVS_RUNDIR", "/var/run/openvswitch"))
DBDIR = Path(os.environ.get("OVS_DBDIR", "/etc/openvswitch"))
LOGDIR = Path(os.environ.get("OVS_LOGDIR", "/var/log/openvswitch"))
SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")


# Held while a userspace OVS of ours runs: tests with a private OVS take it too (one
# userspace ovs-vswitchd per network namespace), so that they wait for each other.
OVS_LOCK_PATH = Path(os.environ.get("TOKENFABRIC_OVS_LOCK", "/run/tokenfabric-ovs.lock"))


def take_ovs_lock(timeout: float = 300.0) -> Any:
    """The exclusive OVS lock (an open file; closing it releases it), waiting up to
    `timeout` seconds for another holder."""
    handle = open(OVS_LOCK_PATH, "a+")  # noqa: SIM115 - held by the caller
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise OvsError(f"another user of the userspace OVS holds {OVS_LOCK_PATH} "
                               f"after {timeout:.0f} s") from None
            time.sleep(0.5)


class OvsError(RuntimeError):
    """Open vSwitch is missing, does not start, or a bridge is not as planned."""


def _run(argv: list[str], timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def vsctl(*args: str, timeout: float = 5) -> str:
    """`ovs-vsctl ARGS` against the system database; its stdout, or OvsError."""
    done = _run(["ovs-vsctl", f"--timeout={int(timeout)}", *args], timeout=timeout + 5)
    if done.returncode != 0:
        raise OvsError(f"ovs-vsctl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def ofctl(*args: str, timeout: float = 10) -> str:
    """`ovs-ofctl -O OpenFlow13 ARGS` against the system's ovs-vswitchd; stdout, or OvsError."""
    done = _run(["ovs-ofctl", "-O", OPENFLOW_VERSION, *args], timeout=timeout)
    if done.returncode != 0:
        raise OvsError(f"ovs-ofctl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _pid_from(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def db_running() -> bool:
    return _run(["ovs-vsctl", "--timeout=2", "show"], timeout=5).returncode == 0


def vswitchd_pid() -> int | None:
    """The ovs-vswitchd serving the database in RUNDIR: its pidfile's, else a process
    started with that database on its command line."""
    pid = _pid_from(RUNDIR / "ovs-vswitchd.pid")
    if pid is not None:
        return pid
    target = f"unix:{RUNDIR / 'db.sock'}".encode()
    for pid, argv in _processes("ovs-vswitchd"):
        if target in argv:
            return pid
    return None


def _processes(binary: str) -> list[tuple[int, list[bytes]]]:
    """(pid, argv) of living processes running `binary`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(binary.encode()) and _alive(int(entry.name)):
            found.append((int(entry.name), argv))
    return found


@dataclass
class OvsDaemons:
    """The OVS daemons `ensure_ovs` found or started; `stop` ends those it started."""

    started: dict[str, int] = field(default_factory=dict)  # daemon name -> pid
    lock: Any = None  # the OVS lock, released by stop()

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self._stop_started(timeout)
        finally:
            if self.lock is not None:
                lock, self.lock = self.lock, None
                lock.close()

    def _stop_started(self, timeout: float) -> None:
        if not self.started:
            return
        try:
            bridges = vsctl("list-br").split()
        except OvsError:
            bridges = []
        if bridges:
            log.info("OVS left running: it still has bridges %s", ", ".join(bridges))
            return
        # vswitchd first: it removes its datapath (the ovs-netdev tap) on a clean exit.
        for name in ("ovs-vswitchd", "ovsdb-server"):
            pid = self.started.pop(name, None)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.started.clear()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def missing_tools() -> list[str]:
    """The Open vSwitch tools of the requirements table that are absent here."""
    from tokenfabric.requirements import OVS, REQUIREMENTS

    return [r.name for r in REQUIREMENTS if r.needed_by == OVS and r.present() is None]


def ensure_ovs() -> OvsDaemons:
    """ovsdb-server and ovs-vswitchd running against the system database; starts what is
    not running (idempotent) and remembers it."""
    if missing_tools():
        raise OvsError(f"Open vSwitch is not installed (no {', '.join(missing_tools())}): "
                       "apt-get install openvswitch-switch")
    daemons = OvsDaemons(lock=take_ovs_lock())
    try:
        _wait_for_other_vswitchd(OTHER_VSWITCHD_WAIT_S)
        _start_daemons(daemons)
    except BaseException:
        daemons.stop()
        raise
    return daemons


OTHER_VSWITCHD_WAIT_S = 60.0


def wait_for_free_datapath(timeout: float) -> list[str]:
    """Wait up to `timeout` s for every other ovs-vswitchd (a test's private OVS) to end;
    those still running."""
    deadline = time.monotonic() + timeout
    others = other_userspace_vswitchd()
    if others:
        log.warning("waiting up to %.0f s for another ovs-vswitchd to end: %s", timeout,
                    others[0][:160])
    while others and time.monotonic() < deadline:
        time.sleep(0.5)
        others = other_userspace_vswitchd()
    return others


def _wait_for_other_vswitchd(timeout: float) -> None:
    """Another ovs-vswitchd holds the namespace's userspace datapath: wait a while for it
    to end, else say so before building anything."""
    others = wait_for_free_datapath(timeout)
    if others:
        raise OvsError("another ovs-vswitchd runs in this network namespace and holds its "
                       "userspace datapath (ovs-netdev), so no lab bridge can work: "
                       + "; ".join(o[:200] for o in others))


def _start_daemons(daemons: OvsDaemons) -> None:
    RUNDIR.mkdir(parents=True, exist_ok=True)
    LOGDIR.mkdir(parents=True, exist_ok=True)
    if not db_running():
        db = DBDIR / "conf.db"
        if not db.exists():
            DBDIR.mkdir(parents=True, exist_ok=True)
            done = _run(["ovsdb-tool", "create", str(db), str(SCHEMA)])
            if done.returncode != 0:
                raise OvsError(f"ovsdb-tool create {db}: {done.stderr.strip()}")
        done = _run(["ovsdb-server", str(db), f"--remote=punix:{RUNDIR / 'db.sock'}",
                     f"--pidfile={RUNDIR / 'ovsdb-server.pid'}", "--detach", "--no-chdir",
                     f"--log-file={LOGDIR / 'ovsdb-server.log'}", "-vconsole:emer"])
        pid = _pid_from(RUNDIR / "ovsdb-server.pid")
        if done.returncode != 0 or pid is None:
            raise OvsError(f"ovsdb-server did not start: {done.stderr.strip()[-500:]}")
        daemons.started["ovsdb-server"] = pid
        vsctl("--no-wait", "init")
        log.info("started ovsdb-server (pid %d)", pid)
    if vswitchd_pid() is None:
        done = _run(["ovs-vswitchd", f"unix:{RUNDIR / 'db.sock'}",
                     f"--pidfile={RUNDIR / 'ovs-vswitchd.pid'}", "--detach", "--no-chdir",
                     f"--log-file={LOGDIR / 'ovs-vswitchd.log'}", "-vconsole:emer"], timeout=30)
        pid = vswitchd_pid()
        if done.returncode != 0 or pid is None:
            raise OvsError(f"ovs-vswitchd did not start: {done.stderr.strip()[-500:]}")
        daemons.started["ovs-vswitchd"] = pid
        log.info("started ovs-vswitchd (pid %d)", pid)


def _netns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def other_userspace_vswitchd() -> list[str]:
    """Command lines of ovs-vswitchd processes in this network namespace that are not the
    one of RUNDIR (any of them may hold this namespace's `ovs-netdev` tap; one in another
    namespace, such as a test's private OVS there, does not)."""
    ours, here = vswitchd_pid(), _netns("self")
    return [f"pid {pid}: " + " ".join(a.decode() for a in argv if a)
            for pid, argv in _processes("ovs-vswitchd") if pid != ours and _netns(pid) == here]


def bridge_ports(bridge: str) -> dict[str, int]:
    """Interface name -> OpenFlow port number of a bridge (-1 where OVS could not add it)."""
    ports = {}
    for name in vsctl("list-ports", bridge).split():
        value = vsctl("get", "Interface", name, "ofport")
        ports[name] = int(value) if value.lstrip("-").isdigit() else -1
    return ports


def check_bridges(planned: dict[str, dict[int, str]]) -> None:
    """Each bridge exists on the userspace datapath with every planned port at its planned
    OpenFlow number; else OvsError saying what is wrong."""
    problems = []
    existing = set(vsctl("list-br").split())
    for bridge, ports in planned.items():
        if bridge not in existing:
            problems.append(f"bridge {bridge} missing")
            continue
        actual = bridge_ports(bridge)
        for number, name in sorted(ports.items()):
            if actual.get(name) != number:
                problems.append(f"{name}: OpenFlow port {actual.get(name)}, planned {number}")
        error = vsctl("get", "Interface", bridge, "error")
        if error not in ("[]", ""):
            problems.append(f"{bridge}: {error}")
    if problems:
        hint = ""
        others = other_userspace_vswitchd()
        if others:
            hint = ("; another ovs-vswitchd runs in this network namespace and holds its "
                    "userspace datapath (ovs-netdev): " + "; ".join(others))
        raise OvsError("Open vSwitch bridges not as planned: " + ", ".join(problems) + hint)


def lab_bridges(prefix: str) -> list[str]:
    """OVS bridges whose name starts with `prefix` ([] where OVS is not running)."""
    if not find_tool("ovs-vsctl") or not db_running():
        return []
    try:
        return [b for b in vsctl("list-br").split() if b.startswith(prefix)]
    except OvsError:
        return []


class OvsMininetSwitch(OVSSwitch):
    """An OVS bridge on the userspace datapath, OpenFlow 1.3, fail mode secure (no flows,
    no forwarding, until the controller writes them), connecting to the lab's controller.

    Mininet gives every port `ofport_request=<the port number of addLink>`, so the
    OpenFlow port numbers are the plan's (check_bridges verifies it).
    """

    def __init__(self, name: str, device_id: int | None = None,
                 controller_target: str = OPENFLOW_CONTROLLER, **params: Any) -> None:
        # batch=False: `mn --topo` asks for batched start-up, which would queue our
        # set-controller behind Mininet's own commands
        params.update(datapath="user", protocols=OPENFLOW_VERSION, failMode="secure",
                      batch=False)
        super().__init__(name, **params)
        self.device_id = device_id if device_id is not None else int(self.dpid, 16)
        self.controller_target = controller_target

    @property
    def datapath_id(self) -> int:
        return int(self.dpid, 16)

    def start(self, controllers: list) -> None:  # noqa: ARG002 - our own controller target
        if not hasattr(OVSSwitch, "OVSVersion"):
            OVSSwitch.setup()  # Mininet's version probe (`mn` calls it; we build by hand)
        # TCP over the userspace datapath: the kernel would leave checksums to an
        # offload that never happens (offload.py; the ports are in the root namespace).
        checksum_offload_off([i.name for i in self.intfList() if i.name != "lo"])
        super().start([])
        self.vsctl("set-controller", self.name, self.controller_target)
        # No in-band control and a short reconnect back-off: the controller may start later.
        self.vsctl("set", "controller", self.name, "max_backoff=1000",
                   "connection_mode=out-of-band")
