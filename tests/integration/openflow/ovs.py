"""A private Open vSwitch for tests: its own ovsdb-server and ovs-vswitchd under a tmp dir.

Nothing of the system's OVS is touched: database, sockets, pid and log files
live in `rundir`; processes are ended by the PIDs their pidfiles name. Bridges
use the userspace datapath (this kernel has no OVS module).

ovs-vswitchd runs in a network namespace of its own (`netns`): a userspace
ovs-vswitchd makes the tap device `ovs-netdev`, and a second one in the same
namespace (the system's, the lab's) would fail every netdev bridge. Its unix
sockets still work from here; the controller is reached over a veth.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")


class PrivateOvs:
    def __init__(self, rundir: Path, netns: str | None = None) -> None:
        self.rundir = Path(rundir)
        self.netns = netns
        self._started: dict[str, int] = {}  # daemon -> the pid it had when started
        self.db = self.rundir / "conf.db"
        self.sock = self.rundir / "db.sock"
        self.env = {**os.environ, "OVS_RUNDIR": str(self.rundir),
                    "OVS_DBDIR": str(self.rundir), "OVS_LOGDIR": str(self.rundir)}

    # ---- processes ------------------------------------------------------------

    def _run(self, argv: list[str], check: bool = True) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def start(self) -> PrivateOvs:
        self.rundir.mkdir(parents=True, exist_ok=True)
        self._run(["ovsdb-tool", "create", str(self.db), str(SCHEMA)])
        self._run(["ovsdb-server", str(self.db), f"--remote=punix:{self.sock}",
                   f"--pidfile={self.rundir / 'ovsdb-server.pid'}", "--detach",
                   f"--log-file={self.rundir / 'ovsdb-server.log'}",
                   f"--unixctl={self.rundir / 'ovsdb-server.ctl'}"])
        self._started["ovsdb-server"] = self._pid("ovsdb-server") or 0
        self.vsctl("--no-wait", "init")
        self.start_vswitchd()
        return self

    def start_vswitchd(self) -> None:
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        self._run([*inside, "ovs-vswitchd", f"unix:{self.sock}",
                   f"--pidfile={self.rundir / 'ovs-vswitchd.pid'}", "--detach",
                   f"--log-file={self.rundir / 'ovs-vswitchd.log'}",
                   f"--unixctl={self.rundir / 'ovs-vswitchd.ctl'}"])
        self._started["ovs-vswitchd"] = self._pid("ovs-vswitchd") or 0

    def _pid(self, name: str) -> int | None:
        path = self.rundir / f"{name}.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _alive(self, name: str) -> bool:
        """Whether the daemon this OVS started (by its pidfile) still runs."""
        pid = self._started.get(name)
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _kill(self, name: str) -> None:
        pid = self._pid(name)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            (self.rundir / f"{name}.pid").unlink()

    def restart_vswitchd(self) -> None:
        """Kill ovs-vswitchd (every flow, group and meter is lost) and start it again;
        the bridges come back from the database and reconnect to the controller."""
        self._kill("ovs-vswitchd")
        self.start_vswitchd()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            for br in self.vsctl("list-br").split():
                self.vsctl("--if-exists", "del-br", br)
        self._kill("ovs-vswitchd")
        self._kill("ovsdb-server")

    # ---- configuration --------------------------------------------------------

    def vsctl(self, *args: str) -> str:
        return self._run(["ovs-vsctl", f"--db=unix:{self.sock}", "--timeout=20", *args])

    def ofctl(self, *args: str, check: bool = True) -> str:
        return self._run(["ovs-ofctl", "-O", "OpenFlow13", *args], check=check)

    def add_bridge(self, name: str, datapath_id: int, controller: str) -> None:
        """The contract's bridge: netdev datapath, OpenFlow 1.3 only, secure fail mode."""
        self.vsctl("add-br", name, "--", "set", "bridge", name, "datapath_type=netdev",
                   "protocols=OpenFlow13", "fail_mode=secure",
                   f"other-config:datapath-id={datapath_id:016x}", "--",
                   "set-controller", name, f"tcp:{controller}", "--",
                   "set", "controller", name, "max_backoff=1000")

    def add_port(self, bridge: str, ifname: str, ofport: int) -> None:
        self.vsctl("add-port", bridge, ifname, "--", "set", "interface", ifname,
                   f"ofport_request={ofport}")

    def dump_flows(self, bridge: str) -> str:
        return self.ofctl("dump-flows", bridge)
