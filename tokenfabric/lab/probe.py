"""The data-path probe: one request per tenant through the VIP, before any load is sent.

It runs as a process inside each client host (`mnexec -a <host shell pid>`, the way
Mininet itself enters a host), from the tenant's own address, step by step:

1. ARP/gateway: a route to the VIP through the gateway, and a neighbour entry for the
   gateway with its switch's MAC (the lab's static entry: the P4 program answers no ARP);
2. TCP handshake to the VIP: a SYN-ACK from VIP:port;
3. HTTP: POST /v1/completions (one token) answered 200 with a completion, or 429 (the
   policy shed it by design: the path works).

The first step that fails is named. `tokenfabric lab run` probes after the fabric is
ready and stops (tearing down) when a tenant fails; `tokenfabric lab check` probes the
fabric of a running `lab up` (or `lab run`), found through the state file LabNetwork
writes beside the lab lock.

    python -m tokenfabric.lab.probe '<ProbeTarget as JSON>'   # inside a host; prints JSON
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenfabric.lab.plan import STATE_PATH
from tokenfabric.tools import find_tool

ARP = "ARP/gateway"
TCP = "TCP handshake to the VIP"
HTTP = "HTTP"
# Neighbour states with a usable MAC (linux/neighbour.h): REACHABLE, STALE, DELAY, PROBE,
# PERMANENT.
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80


class ProbeFailed(RuntimeError):
    """A tenant's request did not come back through the VIP."""


@dataclass(frozen=True)
class ProbeTarget:
    host: str  # the client host (Mininet node name)
    tenant: str
    source: str  # the tenant's address on that host
    pid: int  # the host's shell: its network namespace is the host's
    gateway: str
    gateway_mac: str
    vip: str
    vip_port: int
    model: str


@dataclass
class ProbeResult:
    host: str
    tenant: str
    ok: bool
    step: str | None  # the step that failed (None when ok)
    detail: str
    status: int | None = None
    backend: str | None = None
    seconds: float = 0.0


# -- inside the host -------------------------------------------------------------------
def check_gateway(target: ProbeTarget) -> str | None:
    """What is wrong with the way to the VIP's gateway, or None."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            [route] = ipr.route("get", dst=target.vip)[:1]
        except (NetlinkError, ValueError) as exc:
            return f"no route to the VIP {target.vip}: {exc}"
        gateway = route.get("RTA_GATEWAY")
        if gateway != target.gateway:
            return (f"the route to the VIP {target.vip} goes via {gateway or 'no gateway'}, "
                    f"not the lab's gateway {target.gateway}")
        oif = route.get("RTA_OIF")
        entries = [n for n in ipr.neigh("dump") if n.get("NDA_DST") == target.gateway
                   and n["ifindex"] == oif]
    if not entries:
        return (f"no neighbour (ARP) entry for the gateway {target.gateway}: the switch "
                "answers no ARP, the lab sets a static one")
    mac = str(entries[0].get("NDA_LLADDR") or "")
    if not entries[0]["state"] & NUD_USABLE:
        return f"the gateway's ARP entry is unresolved (state {entries[0]['state']:#x})"
    if mac.lower() != target.gateway_mac.lower():
        return f"the gateway's ARP entry is {mac}, its switch's MAC is {target.gateway_mac}"
    return None


def _request(target: ProbeTarget, sock: socket.socket,
             timeout: float) -> tuple[bool, str, int | None, str | None]:
    """One completion over a connected socket: (ok, detail, status, backend)."""
    sock.settimeout(timeout)
    conn = http.client.HTTPConnection(target.vip, target.vip_port, timeout=timeout)
    conn.sock = sock  # the connection whose handshake was just checked
    body = json.dumps({"model": target.model, "prompt": "probe", "max_tokens": 1,
                       "stream": False, "user": target.tenant})
    try:
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        data = reply.read(64 * 1024)
    except (OSError, http.client.HTTPException) as exc:
        return False, f"no answer after the handshake: {type(exc).__name__}: {exc}", None, None
    finally:
        conn.close()
    backend = reply.getheader("X-Tokenfabric-Backend")
    if reply.status == 429:
        return True, "shed by the policy (429): the path works", 429, backend
    if reply.status != 200:
        return False, f"status {reply.status}: {data[:200].decode(errors='replace')}", \
            reply.status, backend
    try:
        choices = json.loads(data).get("choices")
    except (ValueError, AttributeError):
        choices = None
    if not choices:
        return False, f"status 200 but no completion: {data[:200]!r}", 200, backend
    return True, "a completion came back", 200, backend


def _tries(attempt: int, started: float) -> str:
    return f"{attempt} {'try' if attempt == 1 else 'tries'} in " \
           f"{time.monotonic() - started:.0f} s"


def probe_here(target: ProbeTarget, deadline_s: float = 15.0) -> ProbeResult:
    """The three steps from inside the host; the handshake and the request are retried
    until `deadline_s` (at most 30 tries), and the last failure is reported."""
    started = time.monotonic()

    def result(ok: bool, step: str | None, detail: str, status: int | None = None,
               backend: str | None = None) -> ProbeResult:
        return ProbeResult(target.host, target.tenant, ok, step, detail, status, backend,
                           round(time.monotonic() - started, 3))

    problem = check_gateway(target)
    if problem:
        return result(False, ARP, problem)
    step, detail, status, backend = TCP, "not tried", None, None
    for attempt in range(1, 31):
        left = deadline_s - (time.monotonic() - started)
        if left <= 0:
            break
        try:
            sock = socket.create_connection((target.vip, target.vip_port),
                                            timeout=min(3.0, left),
                                            source_address=(target.source, 0))
        except TimeoutError:
            step, detail = TCP, (f"no SYN-ACK from {target.vip}:{target.vip_port} "
                                 f"({_tries(attempt, started)}): the switch does not carry "
                                 "the SYN to a backend, or the backend's answer back")
        except ConnectionRefusedError:
            step, detail = TCP, (f"{target.vip}:{target.vip_port} refused the connection "
                                 f"({_tries(attempt, started)}): a host got the SYN but "
                                 "nothing listens there")
        except OSError as exc:
            unreachable = exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
            step = ARP if unreachable else TCP
            detail = f"{type(exc).__name__}: {exc} ({_tries(attempt, started)})"
        else:
            ok, detail, status, backend = _request(target, sock, max(5.0, left))
            if ok:
                return result(True, None, detail, status, backend)
            step = HTTP
        time.sleep(0.5)
    return result(False, step, detail, status, backend)


# -- from outside the hosts ------------------------------------------------------------
def probe_hosts(targets: Sequence[ProbeTarget], deadline_s: float = 15.0) -> list[ProbeResult]:
    """Probe every target at once, each from inside its host (`mnexec -a PID`)."""
    mnexec = find_tool("mnexec") or "mnexec"
    procs = [(t, subprocess.Popen(
        [mnexec, "-a", str(t.pid), sys.executable, "-m", "tokenfabric.lab.probe",
         json.dumps(asdict(t)), str(deadline_s)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for t in targets]
    results = []
    for target, proc in procs:
        try:
            out, err = proc.communicate(timeout=deadline_s + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        try:
            results.append(ProbeResult(**json.loads(out.strip().splitlines()[-1])))
        except (ValueError, IndexError, TypeError):
            results.append(ProbeResult(target.host, target.tenant, False, "probe",
                                       f"the probe in {target.host} failed (exit "
                                       f"{proc.returncode}): {err.strip()[-300:]}"))
    return results


def write_state(topo: str, dataplane: str, run_dir: Path,
                targets: Sequence[ProbeTarget]) -> None:
    """The running lab network, for `lab check` (written by the lock's holder)."""
    STATE_PATH.write_text(json.dumps({
        "pid": os.getpid(), "topo": topo, "dataplane": dataplane, "run_dir": str(run_dir),
        "targets": [asdict(t) for t in targets]}, indent=2))


def clear_state() -> None:
    STATE_PATH.unlink(missing_ok=True)


def _is_host_shell(pid: int, host: str) -> bool:
    try:
        return f"mininet:{host}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def running_lab() -> tuple[dict[str, Any], list[ProbeTarget]]:
    """The state of the lab network up now, and its probe targets; ProbeFailed saying
    why where none is up (no state, or a stale one whose hosts are gone)."""
    try:
        state = json.loads(STATE_PATH.read_text())
        targets = [ProbeTarget(**t) for t in state["targets"]]
    except FileNotFoundError:
        raise ProbeFailed("no lab network is up (start one with `tokenfabric lab up`)") \
            from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProbeFailed(f"{STATE_PATH} is not a lab state: {exc}") from None
    gone = [t.host for t in targets if not _is_host_shell(t.pid, t.host)]
    if gone:
        raise ProbeFailed(f"no lab network is up: {STATE_PATH} names hosts that are gone "
                          f"({', '.join(gone)}; left by pid {state.get('pid')})")
    return state, targets


def describe(results: Sequence[ProbeResult]) -> list[str]:
    """One line per tenant: ok, or the step that failed and why."""
    lines = []
    for r in results:
        where = f"tenant {r.tenant} ({r.host})"
        if r.ok:
            by = f", answered by {r.backend}" if r.backend else ""
            lines.append(f"ok      {where}: {r.detail}{by} ({r.seconds:.2f} s)")
        else:
            lines.append(f"FAILED  {where} at step {r.step}: {r.detail}")
    return lines


def as_dicts(results: Sequence[ProbeResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = ProbeTarget(**json.loads(args[0]))
    deadline = float(args[1]) if len(args) > 1 else 15.0
    result = probe_here(target, deadline)
    print(json.dumps(asdict(result)))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
