"""Benchmark: a policy of 1,000 tenants and 64 backends compiled and applied to BMv2.

What it measures, in one run, on one simple_switch_grpc per measurement:
- controller: compile the policy (controller/compile) and apply it with the
  southbound to a switch that runs the program but holds nothing — seconds end
  to end (compile + read + diff + batched writes) and entities per second;
- baseline: the very same entities written by p4runtime-shell, one Write per
  entity with its own TableEntry/ActionProfileMember/... objects, as an operator
  or a script built on p4runtime-shell would (time measured inside the shell's
  process, after its setup);
- the ratio baseline / controller (> 1: the controller is faster);
- then a re-apply of the same policy and a controller restart: both must write
  nothing, and the time they take (a read of everything and a diff).

The program is p4src/build/token_router.{json,p4info.txtpb} with the policy
compiler (controller.compile) when both exist; otherwise the test
program tests/integration/southbound/data/mini.p4 with equivalent entities
generated here (one LPM classification entry, one ternary QoS entry and one
meter cell per tenant; one member per backend, 8 weighted groups, a VIP entry
per group and a route per backend) — the output says which.

Run: python bench/bench_controller_apply.py [--tenants 1000] [--backends 64]
Exit 3 when simple_switch_grpc is absent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import tempfile
import time
from pathlib import Path

from tokenfabric import exitcodes
from tokenfabric.benchcli import bench_args
from tokenfabric.bmv2 import Bmv2Options, Bmv2Switch
from tokenfabric.controller import entries as ent
from tokenfabric.controller.southbound import Pipeline, Role, Switch, SwitchConfig
from tokenfabric.controller.switch_shell import shell_commands, shell_write
from tokenfabric.tools import find_tool

REPO = Path(__file__).resolve().parent.parent

TOKEN_ROUTER = REPO / "p4src" / "build" / "token_router"
MINI = REPO / "tests" / "integration" / "southbound" / "data" / "mini"
DEVICE_ID = 1
ELECTION_ID = 10


# ---- the policy --------------------------------------------------------------------

def fabric_yaml(backends: int) -> str:
    lines = ["switches:", "  s1:", "    address: 127.0.0.1:50051", "    device_id: 1",
             "    mac: \"02:00:00:00:01:00\"", "    ports: {" +
             ", ".join(f"{p}: s1-eth{p}" for p in range(1, backends + 3)) + "}",
             "hosts:",
             "  clients: {switch: s1, port: 1, address: 10.0.0.0, prefix_len: 8, "
             "mac: \"02:00:00:00:00:01\"}",
             f"  responder: {{switch: s1, port: {backends + 2}, address: 172.16.255.254, "
             "mac: \"02:00:00:00:ff:fe\"}"]
    for b in range(1, backends + 1):
        lines.append(f"  gpu{b}: {{switch: s1, port: {b + 1}, address: 172.16.{b // 250}."
                     f"{b % 250 + 1}, mac: \"02:00:00:01:{b // 256:02x}:{b % 256:02x}\"}}")
    lines.append("backends:")
    for b in range(1, backends + 1):
        lines.append(f"  b{b}: {{id: {b}, host: gpu{b}, capacity: {8 + b % 8}, "
                     f"models: [model{b % 8}]}}")
    lines.append("services:")
    for s in range(8):  # 8 models, each served by 8 of the 64 backends
        pool = ", ".join(f"b{b}" for b in range(1, backends + 1) if b % 8 == s)
        lines += [f"  svc{s}:", f"    id: {s + 1}", f"    model: model{s}",
                  f"    vip: 10.255.0.{s + 1}", "    port: 8000",
                  f"    mode: {'hash' if s % 2 == 0 else 'p2c'}", f"    pool: [{pool}]",
                  "    overflow: responder"]
    return "\n".join(lines) + "\n"


def policy_yaml(tenants: int) -> str:
    lines = [
        "version: 1", "contracts:",
        "  premium:",
        "    class: {service_class: low-latency-data, dscp: 18, priority_level: 20, queue: 5}",
        "    tpm: 600000", "    burst: 60000",
        "    bandwidth: {cir: 8Mbit/s, cbs: 64kB, pir: 16Mbit/s, pbs: 128kB, "
        "exceed: remark, exceed_dscp: 10, violate: drop}",
        "  standard:",
        "    class: {service_class: standard, priority_level: 90}",
        "    tpm: 60000", "    burst: 5000",
        "    bandwidth: {cir: 1250000, cbs: 3000, pir: 2500000, pbs: 6000, "
        "exceed: transmit, violate: remark, violate_dscp: 8}",
        "default_contract: standard", "tenants:"]
    for t in range(1, tenants + 1):
        net = ipaddress.IPv4Network(f"10.{t // 256}.{t % 256}.0/24")
        lines += [f"  - name: tenant{t}", f"    id: {t}", f"    prefixes: [{net}]",
                  f"    contract: {'premium' if t % 4 == 0 else 'standard'}"]
    return "\n".join(lines) + "\n"


def compiled_policy(tenants: int, backends: int) -> tuple[ent.DesiredState, float, str] | None:
    """(state, compile seconds, what) with the real compiler and program, or None."""
    if not (TOKEN_ROUTER.with_suffix(".json").exists()
            and TOKEN_ROUTER.with_suffix(".p4info.txtpb").exists()):
        return None
    try:
        from tokenfabric.controller.compile import compile_model
        from tokenfabric.controller.fabric import parse_fabric
        from tokenfabric.controller.policy.schema import parse_policy
    except ImportError:
        return None
    started = time.perf_counter()
    model = parse_fabric(fabric_yaml(backends), "bench-fabric.yaml")
    model.policy = parse_policy(policy_yaml(tenants), "bench-policy.yaml", model=model)
    state = compile_model(model)["s1"]
    return state, time.perf_counter() - started, "tokenfabric.controller.compile, token_router.p4"


def generated_mini_state(tenants: int, backends: int) -> ent.DesiredState:
    """Entities of the same shape for data/mini.p4 (no policy compiler used)."""
    state = ent.DesiredState()
    for t in range(1, tenants + 1):
        prefix = int(ipaddress.IPv4Address(f"10.{t // 256}.{t % 256}.0"))
        state.add(ent.TableEntry.of(
            "classify", {"hdr.ipv4.src_addr": ent.Lpm(prefix, 24)},
            ent.Action.of("set_tenant", tenant=t)))
        state.add(ent.TableEntry.of(
            "qos", {"meta.tenant": ent.Ternary(t, 0xFFFF), "meta.l4_port": ent.Range(8000, 8999)},
            ent.Action.of("set_dscp", dscp=18 if t % 4 == 0 else 0), priority=10))
        state.add(ent.MeterConfig("tenant_meter", t, cir=1_000_000, cburst=64_000,
                                  pir=2_000_000, pburst=128_000))
    for b in range(1, backends + 1):
        state.add(ent.ProfileMember(
            "backend_selector", b,
            ent.Action.of("forward", port=b + 1, dst_mac=0x020000010000 + b)))
        state.add(ent.TableEntry.of(
            "routes", {"hdr.ipv4.dst_addr": ent.Lpm(0xAC100000 + b, 32)},
            ent.Action.of("route", port=b + 1)))
    for s in range(8):
        members = tuple((b, 1 + b % 3) for b in range(1, backends + 1) if b % 8 == s)
        state.add(ent.ProfileGroup("backend_selector", s + 1, members))
        state.add(ent.TableEntry.of(
            "select_backend", {"hdr.ipv4.dst_addr": ent.Exact(0x0AFF0000 + s + 1)},
            ent.GroupRef(s + 1)))
    return state


# ---- the measurements --------------------------------------------------------------

def start_switch(workdir: Path, name: str) -> Bmv2Switch:
    return Bmv2Switch(Bmv2Options(ports={}, device_id=DEVICE_ID,
                                  log_path=workdir / f"{name}.log", log_level="warn")).start()


def switch_config(bmv2: Bmv2Switch, pipeline: Pipeline) -> SwitchConfig:
    return SwitchConfig("s1", bmv2.opts.grpc_address, device_id=DEVICE_ID,
                        election_id=ELECTION_ID, pipeline=pipeline, rpc_timeout=120)


async def connected(config: SwitchConfig) -> Switch:
    switch = Switch(config)
    await switch.start()
    await switch.wait_role(Role.PRIMARY, timeout=60)
    return switch


async def measure(tenants: int, backends: int, workdir: Path) -> None:
    real = compiled_policy(tenants, backends)
    if real is not None:
        desired, compile_s, what = real
        program = TOKEN_ROUTER
    else:
        if not MINI.with_suffix(".json").exists():
            print(f"no program: build {MINI}.json (tests/.../data/build.sh)", file=sys.stderr)
            raise SystemExit(exitcodes.MISSING)
        started = time.perf_counter()
        desired = generated_mini_state(tenants, backends)
        compile_s = time.perf_counter() - started
        what = ("entities generated by this script for tests/.../mini.p4 "
                "(p4src/build or controller.compile missing)")
    pipeline = Pipeline.from_files(program.with_suffix(".p4info.txtpb")
                                   if real else MINI.with_suffix(".p4info.txtpb"),
                                   program.with_suffix(".json") if real
                                   else MINI.with_suffix(".json"))
    print(f"policy: {tenants} tenants, {backends} backends -> {len(desired.entities)} "
          f"entities ({what})")

    # 1. the controller: pipeline pushed first (not timed), then compile + apply
    bmv2 = start_switch(workdir, "controller")
    try:
        switch = await connected(switch_config(bmv2, pipeline))
        started = time.perf_counter()
        result = await switch.apply(desired)
        apply_s = time.perf_counter() - started
        total_s = compile_s + apply_s
        assert result.applied and result.inserted == len(desired.entities), result

        started = time.perf_counter()
        again = await switch.apply(desired)
        noop_s = time.perf_counter() - started
        assert again.writes == 0, again
        await switch.stop()

        restarted = Switch(switch_config(bmv2, pipeline))
        await restarted.apply(desired)
        started = time.perf_counter()
        await restarted.start()
        await restarted.wait_role(Role.PRIMARY, timeout=120)
        adopt_s = time.perf_counter() - started
        adopted = restarted.stats.last
        assert adopted.writes == 0 and restarted.stats.pipeline_pushes == 0, adopted
        await restarted.stop()
    finally:
        bmv2.stop()

    # 2. the baseline: p4runtime-shell writes the same entities, one Write each
    bmv2 = start_switch(workdir, "shell")
    try:
        switch = await connected(switch_config(bmv2, pipeline))  # pushes the pipeline
        canonical = [switch.codec.normalize(e) for e in desired.entities.values()]
        await switch.stop()
        commands = shell_commands(canonical)
        shell = await asyncio.to_thread(shell_write, bmv2.opts.grpc_address, DEVICE_ID,
                                        commands, ELECTION_ID, 3600.0)
        shell_s = shell["seconds"]
        check = await connected(switch_config(bmv2, pipeline))
        held = (await check.read_state()).entities
        await check.stop()
        assert len(held) == len(desired.entities), (len(held), len(desired.entities))
    finally:
        bmv2.stop()

    n = len(desired.entities)
    print(f"controller: compile {compile_s:.3f} s + apply {apply_s:.3f} s = "
          f"{total_s:.3f} s end to end, {n / total_s:,.0f} entities/s "
          f"({result.write_rpcs} Write RPCs)")
    print(f"p4runtime-shell: {shell_s:.3f} s, {n / shell_s:,.0f} entities/s ({n} Write RPCs)")
    print(f"re-apply, nothing changed: {noop_s:.3f} s, {again.writes} writes; "
          f"controller restart: adopted in {adopt_s:.3f} s, {adopted.writes} writes")
    print(f"ratio p4runtime-shell / controller apply alone: {shell_s / apply_s:.1f}x")
    print(f"ratio p4runtime-shell / controller (end to end): {shell_s / total_s:.1f}x")


def main() -> int:
    args = bench_args(__doc__, tenants=1000, backends=64)
    if not find_tool("simple_switch_grpc"):
        print("simple_switch_grpc (BMv2) not found: skipping", file=sys.stderr)
        return exitcodes.MISSING
    with tempfile.TemporaryDirectory(prefix="tf-bench-sb-") as tmp:
        asyncio.run(measure(args.tenants, args.backends, Path(tmp)))
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
