"""Build a LabPlan in Mininet, run processes in its hosts, and take it all down again.

Links are TCLinks with HTB bandwidth only: this kernel has no netem, so there
is no link delay, jitter or loss (docs/lab.md). Every process started through
`LabNetwork.popen` runs in its own session and is ended by PID on teardown;
`leftovers()` lists what would have survived (used by the tests and the runner).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mininet.link import Link, TCLink
from mininet.log import setLogLevel
from mininet.net import Mininet
from mininet.node import Host

from tokenfabric.lab import probe
from tokenfabric.lab.offload import checksum_offload_off
from tokenfabric.lab.plan import GATEWAY_IP, LOCK_PATH, NAME_PREFIX, LabHost, LabPlan
from tokenfabric.lab.switch import Bmv2MininetSwitch

log = logging.getLogger(__name__)


DATAPLANES = ("bmv2", "ovs")
IPIP_HEADER = 20  # bytes an outer IPv4 header adds (the leaves' IP-in-IP, BMv2)
HOST_MTU_UNDER_IPIP = 1500 - IPIP_HEADER


class LabBusy(RuntimeError):
    """Another lab network is up on this machine."""


def check_not_busy() -> None:
    """LabBusy where another lab network holds the lock now (checked before a run makes
    its results folder; LabNetwork.start takes the lock for real)."""
    _take_lock().close()


def _take_lock() -> Any:
    handle = open(LOCK_PATH, "a+")  # noqa: SIM115 - held until stop()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise LabBusy(f"another lab network is up on this machine (pid {holder}, lock "
                      f"{LOCK_PATH}); its node names would collide with this one's") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle

MGMT_NODE = f"{NAME_PREFIX}mgmt"


def _quiet(host: Host, command: str) -> str:
    return host.cmd(command + " 2>&1")


class LabNetwork:
    """The Mininet network of one plan: BMv2 or Open vSwitch switches, hosts, a management
    network."""

    def __init__(self, plan: LabPlan, run_dir: Path, bw_mbps: float | None = 100.0,
                 pcap: bool = False, switch_log_level: str = "warn",
                 dataplane: str = "bmv2") -> None:
        if dataplane not in DATAPLANES:
            raise ValueError(f"unknown dataplane {dataplane!r}: one of {', '.join(DATAPLANES)}")
        self.plan = plan
        self.dataplane = dataplane
        self.ovs: Any = None  # the OVS daemons (tokenfabric.lab.ovs.OvsDaemons) of an OVS run
        self.run_dir = Path(run_dir)
        self.bw_mbps = bw_mbps
        self.pcap = pcap
        self.switch_log_level = switch_log_level
        self.net: Mininet | None = None
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.pids: list[int] = []  # every PID we made (host shells, switches, processes)
        self.namespaces: set[str] = set()  # net namespace ids ("net:[...]") of our hosts
        self._lock: Any = None

    # -- building -------------------------------------------------------------
    def start(self) -> LabNetwork:
        self._lock = _take_lock()
        setLogLevel("warning")
        net = Mininet(topo=None, controller=None, build=False, autoSetMacs=False,
                      autoStaticArp=False)
        self.net = net
        try:
            if self.dataplane == "ovs":
                from tokenfabric.lab.ovs import ensure_ovs

                for sw in self.plan.switches.values():
                    sw.driver = "openflow"
                self.ovs = ensure_ovs()
            # tc warns that HTB's quantum is big at 100 Mbit/s (harmless; r2q default);
            # Mininet would print that as an error once per link.
            setLogLevel("critical")
            try:
                self._add_nodes(net)
                net.build()
            finally:
                setLogLevel("warning")
            if self.dataplane == "bmv2":
                for sw in self.plan.switches.values():
                    node = net.get(sw.name)
                    sw.grpc_port, sw.thrift_port = node.grpc_port, node.thrift_port
            setLogLevel("critical")  # OVS re-applies the links' HTB (the same warning)
            try:
                net.start()
            finally:
                setLogLevel("warning")
            self.pids += [n.pid for n in net.hosts + net.switches if n.pid]
            self.pids += [s.switch_pid for s in net.switches
                          if getattr(s, "switch_pid", None)]
            self.namespaces = {ns for h in net.hosts if h.inNamespace
                               if (ns := netns_of(h.pid)) is not None}
            if self.dataplane == "ovs":
                from tokenfabric.lab.ovs import check_bridges

                check_bridges({sw.name: sw.ports for sw in self.plan.switches.values()})
            for host in self.plan.hosts.values():
                self._configure_host(host)
            probe.write_state(self.plan.topo, self.dataplane, self.run_dir,
                              self.probe_targets())
        except BaseException:
            self.stop()
            raise
        return self

    def _add_nodes(self, net: Mininet) -> None:
        for sw in self.plan.switches.values():
            if self.dataplane == "ovs":
                from tokenfabric.lab.ovs import OvsMininetSwitch

                # datapath id == device_id: the fabric file names the switch by both
                net.addSwitch(sw.name, cls=OvsMininetSwitch, dpid=f"{sw.device_id:x}",
                              device_id=sw.device_id)
                continue
            net.addSwitch(sw.name, cls=Bmv2MininetSwitch, dpid=f"{sw.device_id:x}",
                          device_id=sw.device_id, log_dir=self.run_dir / "switches",
                          pcap=self.pcap, log_level=self.switch_log_level)
        needs_mgmt = [h for h in self.plan.hosts.values() if h.mgmt_ip]
        if needs_mgmt:
            # ip=None: Mininet would otherwise give its first interface an address of
            # its ipBase (10.0.0.x/8) in the root namespace.
            net.addHost(MGMT_NODE, inNamespace=False, ip=None, mac=None)
        for h in self.plan.hosts.values():
            net.addHost(h.name, ip=f"{h.ip}/{h.prefix_len}", mac=h.mac)
        bw = {"bw": self.bw_mbps} if self.bw_mbps else {}
        for lk in self.plan.links:
            # txo/rxo off: Mininet's own link set-up (its `ethtool -K`, where ethtool is
            # installed) then agrees with offload.py instead of turning checksum offload on
            net.addLink(lk.a, lk.b, port1=lk.a_port, port2=lk.b_port, cls=TCLink,
                        txo=False, rxo=False, **bw)
        for i, h in enumerate(needs_mgmt):
            net.addLink(h.name, MGMT_NODE, cls=Link, intfName1=f"{h.name}-m0",
                        intfName2=f"{MGMT_NODE}-eth{i}",
                        params1={"ip": f"{h.mgmt_ip}/30"}, params2={"ip": f"{h.mgmt_gw}/30"})

    def _configure_host(self, h: LabHost) -> None:
        node = self._mininet().get(h.name)
        intf = node.defaultIntf().name
        gateway_mac = self.plan.switches[h.switch].mac
        for command in (
            f"ip addr flush dev {intf}",
            f"ip addr add {h.ip}/{h.prefix_len} dev {intf}",
            f"ip link set {intf} address {h.mac}",
            f"ip route replace default via {GATEWAY_IP} dev {intf} onlink",
            f"ip neigh replace {GATEWAY_IP} lladdr {gateway_mac} dev {intf} nud permanent",
            # /proc/sys/net is the host's own (per namespace); no sysctl binary needed
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
        ):
            _quiet(node, command)
        if self.plan.topo == "leafspine" and self.dataplane == "bmv2":
            # A leaf wraps a client's packet to a far backend in IP-in-IP (+20 bytes) and
            # a switch port cannot send a frame beyond its 1500-byte MTU: a full-size
            # segment (a prompt of a few KB) would vanish. Hosts 20 bytes smaller make
            # TCP agree on segments that still fit once wrapped, as a tunnel's edge does.
            _quiet(node, f"ip link set {intf} mtu {HOST_MTU_UNDER_IPIP}")
        # Userspace switches never fill in offloaded checksums (offload.py).
        checksum_offload_off([intf], node.pid)

    def probe_targets(self) -> list[probe.ProbeTarget]:
        """What the data-path probe needs of each client host (one per tenant)."""
        return [probe.ProbeTarget(h.name, h.tenant or "", h.ip, self._mininet().get(h.name).pid,
                                  GATEWAY_IP, self.plan.switches[h.switch].mac, self.plan.vip,
                                  self.plan.vip_port, self.plan.model)
                for h in self.plan.by_role("client")]

    # -- processes ------------------------------------------------------------
    def _mininet(self) -> Mininet:
        assert self.net is not None, "the lab network is not started"
        return self.net

    def host(self, name: str) -> Host:
        return self._mininet().get(name)

    def popen(self, host: str, argv: Sequence[str], log_name: str,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `argv` in `host`'s namespace, its output in <run_dir>/logs/<log_name>.log."""
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{log_name}.log", "wb") as out:
            # No start_new_session: Mininet's `mnexec -d` calls setsid() itself, and would
            # fork (losing the PID we track) if the process already led its group.
            proc = self._mininet().get(host).popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                            env=env or dict(os.environ))
        self.processes.append((log_name, proc))
        self.pids.append(proc.pid)
        log.debug("%s: started %s (pid %d)", host, " ".join(argv), proc.pid)
        return proc

    def stop_process(self, proc: subprocess.Popen, kill: bool = False,
                     timeout: float = 5.0) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)

    # -- teardown -------------------------------------------------------------
    def stop(self) -> None:
        """End every process we started, then the switches, hosts and links. Idempotent."""
        for _, proc in reversed(self.processes):
            self.stop_process(proc)
        self.processes.clear()
        if self.net is not None:
            net, self.net = self.net, None
            try:
                net.stop()
            except Exception as exc:  # noqa: BLE001 - keep tearing down whatever is left
                log.warning("mininet stop: %s", exc)
            for sw in net.switches:
                if isinstance(sw, Bmv2MininetSwitch) and sw.running() and sw.bmv2:
                    sw.bmv2.stop(kill=True)
            self._remove_links()
        self._remove_bridges()
        if self.ovs is not None:
            ovs, self.ovs = self.ovs, None
            ovs.stop()
        # Anything still inside our hosts' namespaces (a child a process left behind) is
        # ours too; only now, once Mininet no longer talks to the host shells.
        for pid in in_namespaces(self.namespaces):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not in_namespaces(self.namespaces), timeout=3, interval=0.05)
        if self._lock is not None:
            probe.clear_state()  # ours: we hold the lock
            lock, self._lock = self._lock, None
            lock.close()  # releases the flock

    def _remove_links(self) -> None:
        for name in leftover_links():
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)

    def _remove_bridges(self) -> None:
        """OVS bridges of the lab that Mininet's stop missed (it ran, or it failed half way)."""
        if self.dataplane != "ovs":
            return
        from tokenfabric.lab.ovs import OvsError, lab_bridges, vsctl

        for bridge in lab_bridges(NAME_PREFIX):
            try:
                vsctl("--if-exists", "del-br", bridge)
            except OvsError as exc:
                log.warning("%s", exc)
        for name in leftover_links():  # the bridge's own tap device of the netdev datapath
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)

    def __enter__(self) -> LabNetwork:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def leftover_links(prefix: str = NAME_PREFIX) -> list[str]:
    """Root-namespace interfaces whose name starts with the lab's prefix."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=False).stdout
    names = [line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines()]
    return [n for n in names if n.startswith(prefix)]


def alive(pids: Sequence[int]) -> list[int]:
    """The PIDs of `pids` that still run (zombies count as gone)."""
    living = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            living.append(pid)
    return living


def host_shells(prefix: str = NAME_PREFIX) -> list[int]:
    """PIDs of Mininet host shells of lab nodes (`bash ... mininet:<name>`): each holds
    a network namespace open."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"mininet:" + prefix.encode() in cmd:
            found.append(int(entry.name))
    return alive(found)


def netns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def in_namespaces(namespaces: set[str]) -> list[int]:
    """Living processes inside any of the given network namespaces."""
    if not namespaces:
        return []
    found = [int(e.name) for e in Path("/proc").iterdir()
             if e.name.isdigit() and netns_of(int(e.name)) in namespaces]
    return alive(found)


def leftovers(pids: Sequence[int], namespaces: set[str] | None = None) -> list[str]:
    """Everything a finished lab run left behind: links, OVS bridges, host shells, living
    processes, and any process still inside one of the run's host namespaces."""
    from tokenfabric.lab.ovs import lab_bridges

    left = [f"link {n}" for n in leftover_links()]
    left += [f"OVS bridge {b}" for b in lab_bridges(NAME_PREFIX)]
    shells = host_shells()
    left += [f"host shell pid {p}" for p in shells]
    others = set(alive(pids)) | set(in_namespaces(namespaces or set()))
    left += [f"pid {p}" for p in sorted(others - set(shells))]
    return left


def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
