"""One lab experiment from start to end: fabric, software, load, results, teardown.

The teardown runs however the run ends (success, failure, Ctrl-C, SIGTERM) and
checks that no interface or process of the run is left; what would be left is
removed and reported.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tokenfabric.lab import capture, prefix, prefix_lab, probe, results
from tokenfabric.lab.experiments import EMULATOR_MAX_NUM_SEQS, Event, Experiment, Run
from tokenfabric.lab.loadgen import TenantSpec, Workload, plan
from tokenfabric.lab.plan import LabPlan, TenantPlan, build_plan
from tokenfabric.lab.stack import ECMP_CAPACITY

if TYPE_CHECKING:
    from tokenfabric.lab.network import LabNetwork
    from tokenfabric.lab.stack import Stack

log = logging.getLogger(__name__)


# Lab modes -> the service's selection mode in the switch (docs/lab.md). ECMP is the
# weighted hash with agents that declare a capacity no load reaches (equal weights).
SWITCH_MODE = {"ecmp": "hash", "weights": "hash", "p2c": "p2c", "l7-router": "p2c",
               # experiment `prefix` (prefix_lab.py): p2c under the handoff, the
               # switch's affinity and the L7 routers alike
               **{m: prefix_lab.SWITCH_MODE for m in prefix.MODES}}


class Blocked(RuntimeError):
    """A part of the experiment cannot run with the components of this checkout."""


@dataclass
class RunOutcome:
    run: Run
    folder: Path
    summaries: list[results.Summary]
    events: dict[str, float] = field(default_factory=dict)  # name -> seconds after load start
    served: dict[str, float] = field(default_factory=dict)  # backend -> requests it finished
    verdicts: list[results.Verdict] = field(default_factory=list)  # one per summary


@contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the run with its teardown. SIGINT too, because a
    process started in the background by a non-interactive shell (`cmd &`, a CI script)
    inherits SIGINT as ignored, and Python then installs no Ctrl-C handler: a `kill -INT`
    would leave the run going and, if its sender then kills it, the lab behind."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, interrupt)
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextmanager
def _no_interrupts() -> Iterator[None]:
    """A second Ctrl-C must not cut the teardown short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def lab_plan(exp: Experiment, topo: str) -> LabPlan:
    router = exp.needs_router or any(r.mode == "l7-router" or r.mode in prefix.L7_MODES
                                     for r in exp.runs)
    return build_plan(topo, [TenantPlan(t.name, t.traffic_class) for t in exp.tenants],
                      exp.speeds, with_router=router)


def workloads(exp: Experiment, run: Run, lab: LabPlan, seed: int = 1,
              url: str | None = None) -> dict[str, Workload]:
    """One open-loop workload per client host (tenant), together `run.load` of capacity."""
    total = sum(t.weight for t in exp.tenants)
    rate = run.load * exp.capacity()
    # experiment `prefix`: its chat, trace or prefix-free requests (prefix_lab.py) instead
    # of independent prompts; a repetition gets its own seed
    shared = prefix_lab.client_workloads(exp, lab, run.load, seed + run.repeat) \
        if prefix_lab.is_prefix(exp) else None
    out = {}
    for i, host in enumerate(lab.by_role("client")):
        if shared is not None and host.name not in shared:
            continue  # this workload sends nothing from this host
        tenant = next(t for t in exp.tenants if t.name == host.tenant)
        mine = (shared or {}).get(host.name, {})
        out[host.name] = Workload(
            url=url or f"http://{lab.vip}:{lab.vip_port}", rate=rate * tenant.weight / total,
            duration=exp.duration, model=lab.model, arrival=exp.arrival, lengths=exp.lengths,
            tenants=[TenantSpec(tenant.name, tenant.traffic_class, 1.0, host.ip,
                                tenant.slo_ttft_ms, tenant.slo_tpot_ms)],
            seed=seed * 1000 + i, timeout=max(30.0, exp.duration),
            chat=mine.get("chat"), requests=mine.get("requests"),
            endpoint=mine.get("endpoint", "completions"))
    return out


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


class LabRunner:
    def __init__(self, exp: Experiment, topo: str, out_root: Path, bw_mbps: float | None,
                 pcap: bool = False, console: Console | None = None,
                 ready_timeout: float = 90.0, dataplane: str = "bmv2",
                 min_ok: float | None = None) -> None:
        self.exp = exp
        # the share of unshed requests that must succeed (the experiment's unless given)
        self.min_ok = exp.min_ok if min_ok is None else min_ok
        self.topo = topo
        self.dataplane = dataplane
        self.bw = bw_mbps
        self.pcap = pcap
        self.console = console or Console(stderr=True)
        self.ready_timeout = ready_timeout
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.folder = Path(out_root) / f"{exp.name}-{topo}-{dataplane}-{stamp}"
        self.plan = lab_plan(exp, topo)
        self.net: LabNetwork | None = None
        self._router_ready = False
        self.stack: Stack | None = None
        self.left: list[str] = []
        self.router_url: str | None = None
        self.blocked: list[str] = []
        self.probe_results: list[probe.ProbeResult] = []
        self.ha: Any = None  # the `ha` experiment's probe while a run goes
        self.prefix_figures: list[dict[str, Any]] = []  # experiment `prefix`, per mode
        self._routers_ready: set[str] = set()

    def _net(self) -> LabNetwork:
        assert self.net is not None, "the lab network is not up"
        return self.net

    def _stack(self) -> Stack:
        assert self.stack is not None, "the stack is not up"
        return self.stack

    # -- the whole experiment -----------------------------------------------------
    def run(self) -> list[RunOutcome]:
        from tokenfabric.lab.network import LabNetwork, check_not_busy, leftovers
        from tokenfabric.lab.stack import Stack

        check_not_busy()  # another lab's interfaces must not count as this run's leftovers
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "experiment.json").write_text(json.dumps({
            "experiment": self.exp.name, "title": self.exp.title, "topo": self.topo,
            "dataplane": self.dataplane, "min_ok": self.min_ok,
            "speeds": self.exp.speeds, "capacity_rps": self.exp.capacity(),
            "duration": self.exp.duration, "bw_mbps": self.bw,
            "kv_cache_tokens": self.exp.kv_cache_tokens,
            "workload": self.exp.workload, "trace_path": self.exp.trace_path,
            "lookup_timeout": self.exp.lookup_timeout, "handoff": self.exp.handoff,
            "tenants": [asdict(t) for t in self.exp.tenants],
            "runs": [asdict(r) for r in self.exp.runs]}, indent=2))
        outcomes: list[RunOutcome] = []
        with _signals_as_interrupt():
            try:
                kind = "BMv2" if self.dataplane == "bmv2" else "Open vSwitch"
                self.console.print(f"[bold]{self.exp.title}[/] on {self.topo}: building the "
                                   f"fabric ({len(self.plan.switches)} {kind} switches)")
                self.net = LabNetwork(self.plan, self.folder, self.bw, self.pcap,
                                      dataplane=self.dataplane).start()
                self.stack = Stack(self.net, self.exp, self.folder)
                first = SWITCH_MODE.get(self.exp.runs[0].mode, "hash")
                self._stack().write_files(first)
                self._stack().start_controller()
                self._stack().start_backends()
                if prefix_lab.is_prefix(self.exp):
                    added = prefix_lab.add_device_addresses(self._net())
                    self.console.print(f"per-device clients: {added} addresses on the "
                                       "devices tenant's client host")
                    self._stack().start_prefix_routers(
                        [r.mode for r in self.exp.runs if r.mode in prefix.L7_MODES])
                if any(r.mode == "l7-router" for r in self.exp.runs):
                    self.router_url = self._stack().start_router()
                with self.console.status("waiting for the switches and backends") as status:
                    # the real vLLM takes ~40 s to start on a CPU
                    timeout = self.ready_timeout + (150 if self.exp.needs_vllm else 0)
                    self._stack().wait_ready(timeout,
                                          lambda what: status.update(f"waiting for {what}"))
                self._probe()
                for run in self.exp.runs:
                    try:
                        outcomes.append(self._one_run(run))
                    except Blocked as exc:
                        self.blocked.append(f"{run.mode}@{run.load:g}: {exc}")
                        self.console.print(f"[yellow]skipped[/] {run.mode} at "
                                           f"{run.load:.0%}: {exc}")
            finally:
                with _no_interrupts():
                    self.console.print("tearing down")
                    pids: list[int] = list(self.net.pids) if self.net else []
                    namespaces: set[str] = set(self.net.namespaces) if self.net else set()
                    if self.stack:
                        self._stack().close()
                    if self.net:
                        self._net().stop()
                    self.left = leftovers(pids, namespaces)
                    if self.left:
                        log.error("left behind after teardown: %s", ", ".join(self.left))
                    self._write_summary(outcomes)
        return outcomes

    def _switch_steering(self, run: Run) -> dict[str, dict[str, int]] | None:
        """The switches' affinity outcomes before a handoff mode, else None."""
        if run.mode not in prefix.HANDOFF_MODES:
            return None
        try:
            if self.dataplane == "ovs":
                return {sw: {"steered": held["steered"]}
                        for sw, held in prefix_lab.read_ovs_affinity(self.plan).items()}
            return prefix_lab.read_switch_steering(self.plan)
        except Exception as exc:  # noqa: BLE001 - the run goes on without the figure
            log.warning("steering read failed: %s", exc)
            return None

    def _probe(self) -> None:
        """One request per tenant through the VIP before any load (probe.py); ProbeFailed
        naming the step where one does not come back."""
        with self.console.status("data-path probe: one request per tenant through the VIP"):
            self.probe_results = probe.probe_hosts(self._net().probe_targets())
        (self.folder / "probe.json").write_text(json.dumps(
            probe.as_dicts(self.probe_results), indent=2))
        for line in probe.describe(self.probe_results):
            self.console.print(f"probe: {line}")
        if not all(r.ok for r in self.probe_results):
            raise probe.ProbeFailed(
                "the data path is down, so no load was sent:\n  " + "\n  ".join(
                    probe.describe([r for r in self.probe_results if not r.ok])))

    # -- one run (mode x load) ------------------------------------------------------
    def _one_run(self, run: Run) -> RunOutcome:
        folder = self.folder / "runs" / run.key
        folder.mkdir(parents=True, exist_ok=True)
        if run.mode not in SWITCH_MODE:
            raise Blocked(f"unknown mode {run.mode}")
        url = self.router_url if run.mode == "l7-router" else None
        if run.mode in prefix.L7_MODES:
            url = prefix_lab.router_url(self.plan, run.mode)
            if run.mode not in self._routers_ready:
                with self.console.status(f"waiting for {run.mode}'s router"):
                    self._stack().wait_router(port=prefix_lab.ROUTER_PORTS[run.mode])
                self._routers_ready.add(run.mode)
        # the one vllm-router of mode l7-router, on the VIP's port (experiment prefix's
        # routers have their own ports, waited for above: a --modes without
        # vllm-cache_aware, whose port is the VIP's, waited 120 s here and failed)
        if run.mode == "l7-router" and not self._router_ready:
            with self.console.status("waiting for vllm-router to find its workers healthy"):
                self._stack().wait_router()
            self._router_ready = True
        capacity = ECMP_CAPACITY if run.mode == "ecmp" else EMULATOR_MAX_NUM_SEQS
        if self._stack().set_capacity(capacity):
            with self.console.status(f"agents re-registering with capacity {capacity}"):
                self._stack().wait_ready(self.ready_timeout)
        self._stack().set_mode("llm", SWITCH_MODE[run.mode])
        before: dict[str, str] = {}
        if prefix_lab.is_prefix(self.exp):
            if self._stack().set_prefix_affinity(run.mode in prefix.HANDOFF_MODES):
                time.sleep(2.0)  # the agents take the opt-in from their reports' answers
            # every mode starts alike: no entry of an earlier round, caches empty (the
            # bench's Cluster.reset_caches does the same)
            prefix_lab.withdraw_affinity(self._stack().http, self._stack().agent_token)
            prefix_lab.reset_caches(self.plan)
            before = prefix_lab.emulator_metrics(self.plan)
            affinity_before = self._stack().get("/affinity")
            decided_before = prefix_lab.handoff_decisions(self.plan)
            # a router's log spans every round of --repeat: judge each round by its own part
            log_before = len(self._stack().router_log(run.mode))
            steering_before = self._switch_steering(run)
        loads = workloads(self.exp, run, self.plan, url=url)
        planned = {h: len(plan(w)) for h, w in loads.items()}
        procs, outputs = [], []
        for host, workload in loads.items():
            wl_path, out = folder / f"workload-{host}.json", folder / f"requests-{host}.jsonl"
            wl_path.write_text(json.dumps(workload.to_dict()))
            outputs.append(out)
            procs.append(self._net().popen(host, [sys.executable, "-m", "tokenfabric.lab.loadgen",
                                              str(wl_path), str(out)], f"loadgen-{host}"))
        captures = self._start_captures(run, folder)
        served_before = self._stack().served_counts()
        self.ha = self._ha_probe(run)
        started = time.time()
        events = self._schedule(run.events, started)
        total = sum(planned.values())
        again = f" (run {run.repeat + 1})" if run.repeat else ""
        columns = [TextColumn(f"{run.mode} @ {run.load:.0%}{again}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total} requests"), TimeElapsedColumn()]
        deadline = started + self.exp.duration + max(30.0, self.exp.duration) + 15
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task("load", total=total)
            while any(p.poll() is None for p in procs) and time.time() < deadline:
                bar.update(task, completed=sum(_count_lines(o) for o in outputs))
                time.sleep(0.25)
            bar.update(task, completed=sum(_count_lines(o) for o in outputs))
        for p in procs:
            self._net().stop_process(p)
        for p in captures:
            self._net().stop_process(p)  # SIGTERM: tcpdump flushes and closes its file
        served_after = self._stack().served_counts()
        if self.ha is not None:
            self._ha_results(folder, outputs)
        try:  # the controller's billing cross-check so far (docs/ledger.md)
            (folder / "crosscheck.json").write_text(json.dumps(
                {**self._stack().get("/ledger/crosscheck/summary"), "run_started": started,
                 "liar": self.exp.liar}))
        except Exception as exc:  # the run's results stand without it
            log.warning("cross-check summary unavailable: %s", exc)
        served = {name: served_after[name] - served_before.get(name, 0.0)
                  for name in served_after}
        if prefix_lab.is_prefix(self.exp):
            # each client host's records (its requests-HOST.jsonl), read once
            by_host = {h: [json.loads(line) for line in out.read_text().splitlines()
                           if line.strip()]
                       for h, out in zip(loads, outputs, strict=True) if out.exists()}
            records = [r for host_records in by_host.values() for r in host_records]
            router_log = self._stack().router_log(run.mode) \
                if run.mode in prefix.L7_MODES else None
            figures = prefix_lab.run_figures(
                run.mode, records, before, prefix_lab.emulator_metrics(self.plan),
                self.exp.duration, router_log[log_before:] if router_log is not None
                else None, router_log)
            figures["affinity"] = prefix_lab.affinity_change(affinity_before,
                                                             self._stack().get("/affinity"))
            figures["repeat"], figures["workload"] = run.repeat, self.exp.workload
            if self.exp.workload != "free":  # prompts that share nothing miss nothing
                figures["misses"] = prefix_lab.misses(loads, by_host)
            figures["handoff_paths"] = prefix_lab.handoff_paths(self.plan, records)
            figures["decisions"] = {
                k: v - decided_before.get(k, 0.0)
                for k, v in prefix_lab.handoff_decisions(self.plan).items()
                if v > decided_before.get(k, 0.0)}
            if run.mode in prefix.HANDOFF_MODES and self.dataplane == "ovs":
                try:  # the bridges' flows, and the controller's bound decisions
                    ovs_held = prefix_lab.read_ovs_affinity(self.plan)
                    figures["switch_affinity"] = {sw: len(h["clients"])
                                                  for sw, h in ovs_held.items()}
                    figures["switch_affinity_clients"] = {sw: h["clients"]
                                                          for sw, h in ovs_held.items()}
                    figures["ovs_steered"] = {
                        sw: h["steered"] - (steering_before or {}).get(sw, {}).get("steered", 0)
                        for sw, h in ovs_held.items()}
                    figures["ovs_bound"] = {
                        v["name"]: (v.get("details") or {}).get("affinity")
                        for v in self._stack().get("/switches")}
                except Exception as exc:  # noqa: BLE001 - the run's figures stand
                    log.warning("OVS affinity read-back failed: %s", exc)
                    figures["switch_affinity_error"] = str(exc)
            if run.mode in prefix.HANDOFF_MODES and self.dataplane == "bmv2":
                try:  # what the switches hold, not what the controller believes
                    held = prefix_lab.read_switch_affinity(self.plan)
                    if steering_before is not None:
                        figures["switch_steering"] = prefix_lab.steering_change(
                            steering_before, prefix_lab.read_switch_steering(self.plan))
                    figures["switch_affinity"] = {sw: len(rows) for sw, rows in held.items()}
                    figures["switch_affinity_clients"] = {
                        sw: sorted({r["client"] for r in rows}) for sw, rows in held.items()}
                except Exception as exc:  # noqa: BLE001 - the run's figures stand
                    log.warning("affinity read-back failed: %s", exc)
                    figures["switch_affinity_error"] = str(exc)
            (folder / "prefix.json").write_text(json.dumps(figures, indent=2))
        for timer in events.pop("_timers", []):
            timer.cancel()
        merged = folder / "requests.jsonl"
        with merged.open("w") as sink:
            for out in outputs:
                if out.exists():
                    sink.write(out.read_text())
        marks = {k: v for k, v in events.items() if isinstance(v, float)}
        (folder / "events.json").write_text(json.dumps(marks))
        (folder / "served.json").write_text(json.dumps(served))
        # planned requests per tenant: any without a record counts as failed
        tenants = {h.name: h.tenant for h in self.plan.by_role("client")}
        per_tenant = {tenants[h]: n for h, n in planned.items()}
        (folder / "run.json").write_text(json.dumps({"started": started,
                                                     "planned": per_tenant}))
        return self.analyse(run, folder)

    def analyse(self, run: Run, folder: Path) -> RunOutcome:
        """Summary, plots and failover figures of one run folder (also after the fact)."""
        records = results.load_records(folder / "requests.jsonl")
        marks = json.loads((folder / "events.json").read_text())
        served = json.loads((folder / "served.json").read_text())
        meta = json.loads((folder / "run.json").read_text())
        started, planned = meta["started"], meta.get("planned", {})
        labels = {"mode": run.mode, "load": run.load}
        # goodput over the arrival window: a slow tail must not look like a lower rate
        summaries = results.summarize_by(records, "tenant", self.exp.duration, labels)
        verdicts = [results.verdict(s, self.min_ok, sum(planned.values()) if s.group == "all"
                                    else planned.get(s.group)) for s in summaries]
        results.plot_timeline(records, folder / "timeline.png",
                              f"{run.mode} at {run.load:.0%} of capacity", marks)
        results.plot_ttft_cdf({s: [r for r in records if r["tenant"] == s]
                               for s in {r["tenant"] for r in records}},
                              folder / "ttft_cdf.png", f"TTFT, {run.mode} at {run.load:.0%}")
        text = results.markdown_table(summaries, ["mode", "load"])
        text += "\n" + "\n".join(f"- {v.text()}" for v in verdicts) + "\n"
        text += "\nserved per backend (its vLLM's request_success_total): " + ", ".join(
            f"{k} {v:.0f}" for k, v in sorted(served.items())) + "\n"
        for event in run.events:
            if event.kind == "kill_backend" and event.target is not None \
                    and f"kill {event.target}" in marks:
                evidence, kind = self._evidence(folder, event.target)
                stats = results.failover_stats(records, started + marks[f"kill {event.target}"],
                                               event.target, evidence)
                marks.update({f"{k} ({event.target})": v for k, v in stats.items()})
                text += "\n" + results.failover_markdown(event.target, stats, kind)
        if (folder / "ha.json").is_file():
            from tokenfabric.lab import replicas

            text += "\n" + replicas.markdown(json.loads((folder / "ha.json").read_text()))
        if (folder / "prefix.json").is_file():
            figures = json.loads((folder / "prefix.json").read_text())
            figures["folder"] = str(folder)
            self.prefix_figures = [f for f in self.prefix_figures
                                   if (f["mode"], f.get("repeat", 0)) !=
                                   (figures["mode"], figures.get("repeat", 0))] + [figures]
            text += prefix_lab.markdown([figures], self.exp.kv_cache_tokens,
                                        self.exp.workload)
        if (folder / "crosscheck.json").is_file():
            text += "\n" + results.crosscheck_markdown(
                json.loads((folder / "crosscheck.json").read_text()))
        (folder / "summary.md").write_text(text)
        return RunOutcome(run, folder, summaries, marks, served, verdicts)

    def _start_captures(self, run: Run, folder: Path) -> list[subprocess.Popen]:
        """tcpdump on each backend a run kills (capture.py): its beacons and new SYNs."""
        tcpdump = shutil.which("tcpdump")
        procs: list[subprocess.Popen] = []
        for target in {e.target for e in run.events if e.kind == "kill_backend" and e.target}:
            if tcpdump is None:
                log.warning("no tcpdump: failover measured from response headers only")
                break
            mininet = self._net().net
            assert mininet is not None
            interface = mininet.get(target).defaultIntf().name
            procs.append(self._net().popen(target, capture.tcpdump_argv(
                tcpdump, interface, folder / f"capture-{target}.pcap", self.plan.vip_port),
                f"tcpdump-{target}"))
        if procs:
            time.sleep(1.0)  # tcpdump needs a moment before it captures
        return procs

    def _evidence(self, folder: Path, target: str) -> tuple[capture.HostEvidence | None, str]:
        host = self.plan.hosts[target]
        path = folder / f"capture-{target}.pcap"
        try:
            return (capture.host_evidence(path, host.ip, self.plan.vip, self.plan.vip_port),
                    "capture on its interface + response headers")
        except (OSError, ValueError) as exc:
            log.warning("no capture of %s (%s): response headers only", target, exc)
            return None, "response headers only; beacon time unknown, kill time used"

    def _schedule(self, events: tuple[Event, ...], started: float) -> dict[str, Any]:
        """Fire each event on a timer; record when it happened (seconds after start)."""
        done: dict[str, Any] = {"_timers": []}

        def fire(event: Event) -> None:
            try:
                if event.kind == "kill_backend" and event.target is not None:
                    at = self._stack().kill_backend(event.target)
                    done[f"kill {event.target}"] = at - started
                elif event.kind == "kill_controller" and self.ha is not None:
                    done["kill controller"] = self.ha.kill_leader(self._stack(), started) - started
                elif event.kind == "restart_controller" and self.ha is not None:
                    done["restart controller"] = self.ha.restart_killed(self._stack(),
                                                                        started) - started
                elif event.kind == "reload_policy":
                    t0 = time.time()
                    self._stack().reload_policy()
                    done["policy reload"] = t0 - started
            except Exception as exc:  # noqa: BLE001 - an event failing must not kill the run
                log.error("event %s failed: %s", event, exc)
                done[f"{event.kind} failed"] = time.time() - started

        for event in events:
            timer = threading.Timer(event.at, fire, (event,))
            timer.daemon = True
            timer.start()
            done["_timers"].append(timer)
        return done

    def _ha_probe(self, run: Run) -> Any:
        """The `ha` experiment's P4Runtime read-back (tokenfabric/lab/replicas.py)."""
        if not any(e.kind == "kill_controller" for e in run.events):
            return None
        from tokenfabric.lab.replicas import HaProbe

        switches = self.plan.fabric(SWITCH_MODE[run.mode])["switches"]
        probe_ = HaProbe(switches if self.dataplane == "bmv2" else {})
        probe_.start()
        return probe_

    def _ha_results(self, folder: Path, outputs: list[Path]) -> None:
        from tokenfabric.lab import replicas

        ha, self.ha = self.ha, None
        ha.stop()
        assert self.stack is not None  # a run has its stack
        found = ha.result
        try:
            found["ledger"] = replicas.ledger_against_agents(self.stack, self.folder / "logs")
        except Exception as exc:  # noqa: BLE001 - the run's other results stand
            found["ledger_error"] = str(exc)
        records = [json.loads(line) for out in outputs if out.exists()
                   for line in out.read_text().splitlines() if line.strip()]
        found["failed_total"] = sum(1 for r in records if not r.get("ok"))
        if found.get("killed_wall") is not None:
            found["failed_near_kill"] = replicas.failed_near(records, found["killed_wall"])
        (folder / "ha.json").write_text(json.dumps(found, indent=2))

    # -- results --------------------------------------------------------------------
    def _write_summary(self, outcomes: list[RunOutcome]) -> None:
        summaries = [s for o in outcomes for s in o.summaries]
        from tokenfabric.lab.prereqs import DATAPLANE_TITLE

        text = [f"# {self.exp.title}\n", f"dataplane {DATAPLANE_TITLE[self.dataplane]}, "
                f"topology `{self.topo}`, backends speeds "
                f"{self.exp.speeds}, capacity {self.exp.capacity():.1f} req/s, "
                f"{self.exp.duration:g} s per run, links {self.bw or 'unlimited'} Mbit/s "
                "(HTB; no netem, so no link delay)\n"]
        if prefix_lab.is_prefix(self.exp):
            budget = "50 ms (the agent default)" if self.exp.lookup_timeout is None \
                else f"{self.exp.lookup_timeout * 1000:g} ms"
            text.append(f"workload {self.exp.workload}, KV cache {self.exp.kv_cache_tokens} "
                        f"tokens per backend, prefix-index lookup budget {budget}\n")
            text.append(prefix_lab.handoff_line(self.exp.handoff) + "\n")
        text.append(self._verdict_text(outcomes) + "\n")
        if summaries:
            text.append(results.markdown_table(summaries, ["mode", "load"]))
        if outcomes:
            text.append("\nserved per backend (vllm:request_success_total):\n")
            text.append("| mode | load | " + " | ".join(b.name for b in self.plan.by_role(
                "backend")) + " |\n|" + "---|" * (2 + len(self.plan.by_role("backend"))))
            for o in outcomes:
                text.append(f"| {o.run.mode} | {o.run.load:g} | " + " | ".join(
                    f"{o.served.get(b.name, 0):.0f}" for b in self.plan.by_role("backend"))
                    + " |")
        for o in outcomes:
            if o.events:
                text.append(f"\nevents of {o.run.mode}@{o.run.load:g}: " + ", ".join(
                    f"{k}: {v:.3f}" for k, v in o.events.items()))
        if len({o.run.load for o in outcomes}) > 1:
            overall = [s for s in summaries if s.group == "all"]
            results.plot_sweep(overall, "load", "mode", [
                ("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"),
                ("slo_attainment", "SLO attainment"), ("goodput_rps", "goodput (req/s)")],
                self.folder / "sweep.png")
            text.append("\n![sweep](sweep.png)\n")
        if self.prefix_figures:
            text.append(prefix_lab.markdown(self.prefix_figures, self.exp.kv_cache_tokens,
                                            self.exp.workload))
            by_mode: dict[str, list[tuple[dict[str, Any], list[dict[str, Any]]]]] = {}
            for f in self.prefix_figures:
                by_mode.setdefault(f["mode"], []).append(
                    (f, results.load_records(Path(f["folder"]) / "requests.jsonl")))
            pooled = prefix_lab.intervals(by_mode)
            text.append(prefix_lab.intervals_markdown(pooled))
            (self.folder / "prefix_intervals.json").write_text(json.dumps(pooled, indent=2))
            prefix.plot_modes({f"{self.exp.workload} kv{self.exp.kv_cache_tokens}": pooled},
                              self.folder / "prefix.png",
                              f"{self.exp.title} ({self.topo}, {self.dataplane})")
            text.append("\n![prefix](prefix.png)\n")
        if self.blocked:
            text.append("\nnot run:\n" + "\n".join(f"- {b}" for b in self.blocked))
        text.append("\nteardown: " + ("clean (no interface or process left)" if not self.left
                                      else "LEFT BEHIND: " + ", ".join(self.left)) + "\n")
        (self.folder / "summary.md").write_text("\n".join(text))
        (self.folder / "summary.json").write_text(json.dumps(
            [s.as_dict() for s in summaries], indent=2))

    def failed(self, outcomes: list[RunOutcome]) -> list[str]:
        """Why the experiment failed: every verdict that did not pass, a probe that did
        not come back, runs that never ran; [] when it passed."""
        why = [f"data-path probe: {line}" for line in
               probe.describe([r for r in self.probe_results if not r.ok])]
        if not outcomes and not why:
            why.append("no run finished")
        why += [f"{o.run.mode}@{o.run.load:g} {v.text()}" for o in outcomes
                for v in o.verdicts if not v.passed]
        return why

    def _verdict_text(self, outcomes: list[RunOutcome]) -> str:
        expected = f"at least {self.min_ok:.0%} of the requests the policy did not shed (429) " \
                   "succeed in every run and tenant"
        why = f" ({self.exp.min_ok_why})" if self.exp.min_ok_why and \
            self.min_ok == self.exp.min_ok else ""
        failures = self.failed(outcomes)
        if not failures:
            return f"**PASSED**: {expected}{why}."
        if not all(r.ok for r in self.probe_results):
            expected = "one request per tenant through the VIP before any load"
        return (f"**FAILED**: expected {expected}{why}.\n\n"
                + "\n".join(f"- {f}" for f in failures))

    @classmethod
    def resummarize(cls, folder: Path) -> tuple[LabRunner, list[RunOutcome]]:
        """Rebuild every summary and plot of a results folder from its JSON lines."""
        from tokenfabric.lab.experiments import experiment

        meta = json.loads((folder / "experiment.json").read_text())
        exp = experiment(meta["experiment"], meta["duration"])
        exp.kv_cache_tokens = meta.get("kv_cache_tokens", exp.kv_cache_tokens)
        exp.workload = meta.get("workload", exp.workload)
        exp.trace_path = meta.get("trace_path", exp.trace_path)
        exp.runs = [Run(r["mode"], r["load"], tuple(Event(**e) for e in r["events"]),
                        r.get("repeat", 0)) for r in meta["runs"]]
        runner = cls(exp, meta["topo"], folder.parent, meta.get("bw_mbps"),
                     dataplane=meta.get("dataplane", "bmv2"), min_ok=meta.get("min_ok"))
        if (folder / "probe.json").exists():
            runner.probe_results = [probe.ProbeResult(**r) for r in
                                    json.loads((folder / "probe.json").read_text())]
        runner.folder = folder
        old = (folder / "summary.md").read_text() if (folder / "summary.md").exists() else ""
        runner.left = [] if "teardown: clean" in old else ["(see the first summary)"]
        outcomes = [runner.analyse(run, folder / "runs" / run.key) for run in exp.runs
                    if (folder / "runs" / run.key / "run.json").exists()]
        runner._write_summary(outcomes)
        return runner, outcomes

    def table(self, outcomes: list[RunOutcome]) -> Table:
        table = Table(title=f"{self.exp.name} on {self.topo} ({self.dataplane}): "
                            f"{self.folder}")
        for title in ("mode", "load", "tenant", "requests", "ok", "TTFT p50 ms", "TTFT p99 ms",
                      "SLO att.", "goodput req/s", "errors", "ok/not shed", "verdict"):
            table.add_column(title)
        for o in outcomes:
            for s, verdict in zip(o.summaries, o.verdicts, strict=True):
                share = f"{verdict.ok}/{verdict.counted}" + (
                    f" {verdict.share:.0%}" if verdict.share is not None else "")
                table.add_row(o.run.mode, f"{o.run.load:g}", s.group, str(s.requests),
                              str(s.ok), _fmt(s.ttft_p50_ms), _fmt(s.ttft_p99_ms),
                              _fmt(s.slo_attainment, 3), _fmt(s.goodput_rps, 2),
                              ", ".join(f"{k}:{v}" for k, v in s.errors.items()) or "–",
                              share, "PASSED" if verdict.passed else "[bold red]FAILED[/]")
        return table


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
