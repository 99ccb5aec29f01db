"""The southbound against real BMv2 (simple_switch_grpc) running data/mini.p4."""

from __future__ import annotations

import asyncio
import filecmp
import subprocess

import pytest

from tests.integration.southbound.conftest import FAST
from tests.integration.southbound.helpers import (
    BMV2_JSON,
    DATA,
    P4INFO,
    mini_pipeline,
    mini_state,
    normalized,
)
from tokenfabric.bmv2 import Bmv2Options, Bmv2Switch
from tokenfabric.controller.entries import DesiredState, Exact, MemberRef, TableEntry
from tokenfabric.controller.southbound import Role, Switch, SwitchConfig, WriteError
from tokenfabric.controller.switch_shell import shell_read, shell_view
from tokenfabric.tools import tool_env

pytestmark = [pytest.mark.bmv2, pytest.mark.timeout(180)]


@pytest.fixture
def pipeline():
    if not BMV2_JSON.exists():
        pytest.skip(f"{BMV2_JSON.name} not built: run {DATA / 'build.sh'}")
    return mini_pipeline()


@pytest.fixture
def bmv2(tmp_path):
    switch = Bmv2Switch(Bmv2Options(ports={}, device_id=1, log_path=tmp_path / "bmv2.log"))
    switch.start()
    yield switch
    switch.stop()


def controller(bmv2, pipeline, election_id=10, name="s1", **options) -> Switch:
    return Switch(SwitchConfig(name, bmv2.opts.grpc_address, device_id=bmv2.opts.device_id,
                               election_id=election_id, pipeline=pipeline,
                               **{**FAST, **options}))


async def as_primary(switch: Switch) -> Switch:
    await switch.start()
    await switch.wait_role(Role.PRIMARY, timeout=30)
    return switch


async def test_bmv2_holds_what_was_applied_in_canonical_form(bmv2, pipeline):
    switch = await as_primary(controller(bmv2, pipeline))
    try:
        assert switch.stats.pipeline_pushes == 1
        desired = mini_state(tenants=8, weights=(3, 1, 2))
        result = await switch.apply(desired)
        assert result.inserted == len(desired.entities)
        # what BMv2 gives back decodes to exactly the desired state: weights, meters, masks
        assert await switch.read_state() == normalized(desired, pipeline)
        again = await switch.apply(desired)
        assert again.writes == 0 and again.write_rpcs == 0
        changed = mini_state(tenants=6, weights=(1, 1, 4), dscp=30)
        result = await switch.apply(changed)
        assert (result.inserted, result.deleted) == (0, 6) and result.modified == 6 + 1
        assert await switch.read_state() == normalized(changed, pipeline)
    finally:
        await switch.stop()


async def test_bmv2_killed_and_restarted_gets_everything_back(bmv2, pipeline):
    switch = await as_primary(controller(bmv2, pipeline))
    try:
        desired = mini_state(tenants=10, weights=(2, 2, 1))
        await switch.apply(desired)
        sessions = switch.stats.sessions
        bmv2.stop(kill=True)  # a crash: every table, member and meter is gone
        bmv2.start()  # same gRPC port, no program
        deadline = asyncio.get_running_loop().time() + 30
        while switch.stats.sessions == sessions:
            assert asyncio.get_running_loop().time() < deadline, "controller never reconnected"
            await asyncio.sleep(0.05)
        await switch.wait_role(Role.PRIMARY, timeout=30)
        assert switch.stats.pipeline_pushes == 2
        assert switch.stats.last.inserted == len(desired.entities)
        seen = await asyncio.to_thread(shell_read, bmv2.opts.grpc_address, 1)
        assert seen == shell_view(list(normalized(desired, pipeline).entities.values()))
    finally:
        await switch.stop()


async def test_bmv2_controller_restart_writes_nothing(bmv2, pipeline):
    desired = mini_state(tenants=12, weights=(1, 3, 1))
    first = await as_primary(controller(bmv2, pipeline))
    await first.apply(desired)
    await first.stop()
    second = controller(bmv2, pipeline)
    await second.apply(desired)
    await as_primary(second)
    try:
        assert second.stats.pipeline_pushes == 0  # BMv2 kept our cookie
        assert second.stats.last.applied and second.stats.last.writes == 0
        assert second.stats.last.held == len(desired.entities)
        assert second.stats.updates_written == 0
    finally:
        await second.stop()


async def test_bmv2_backup_takes_over_without_writing(bmv2, pipeline):
    desired = mini_state(tenants=4)
    primary = await as_primary(controller(bmv2, pipeline, election_id=20, name="primary"))
    backup = controller(bmv2, pipeline, election_id=10, name="backup")
    await backup.apply(desired)
    await backup.start()
    try:
        await backup.wait_role(Role.BACKUP, timeout=30)
        await primary.apply(desired)
        assert backup.stats.updates_written == 0 and backup.primary_election_id == 20
        await primary.stop()
        await backup.wait_role(Role.PRIMARY, timeout=30)
        assert backup.stats.last.applied and backup.stats.last.writes == 0
        assert backup.stats.pipeline_pushes == 0
    finally:
        await backup.stop()
        await primary.stop()


async def test_bmv2_shell_reader_sees_the_controller_state(bmv2, pipeline):
    switch = await as_primary(controller(bmv2, pipeline))
    try:
        desired = mini_state(tenants=5, weights=(2, 1, 3))
        await switch.apply(desired)
        seen = await asyncio.to_thread(shell_read, bmv2.opts.grpc_address, 1)
        assert seen == shell_view(list(normalized(desired, pipeline).entities.values()))
        assert switch.role is Role.PRIMARY and switch.stats.sessions == 1
    finally:
        await switch.stop()


async def test_bmv2_per_update_errors(bmv2, pipeline):
    switch = await as_primary(controller(bmv2, pipeline))
    try:
        desired = mini_state(tenants=2)
        desired.add(TableEntry.of("select_backend", {"hdr.ipv4.dst_addr": Exact(7)},
                                  MemberRef(42)))  # no member 42
        with pytest.raises(WriteError) as caught:
            await switch.apply(desired)
        [failure] = caught.value.failures
        assert failure.entity.action == MemberRef(42) and failure.code != "OK"
        # everything else of the batch went in
        held = await switch.read_state()
        assert len(held.entities) == len(desired.entities) - 1
    finally:
        await switch.stop()


async def test_bmv2_counters_and_meters_read(bmv2, pipeline):
    switch = await as_primary(controller(bmv2, pipeline))
    try:
        await switch.apply(mini_state(tenants=3))
        cells = await switch.read_counters("tenant_packets")
        assert sorted(cells) == list(range(switch.index.counter("tenant_packets").size))
        assert (await switch.read_counters("tenant_packets", index=2))[2].packets == 0
        direct = await switch.read_direct_counters("routes")
        assert len(direct) == 1
        meters = await switch.read_meters("tenant_meter")
        assert sorted(m.index for m in meters.entities.values()) == [1, 2, 3]
        await switch.apply(DesiredState())
        assert not (await switch.read_meters()).entities  # reset to default
    finally:
        await switch.stop()


@pytest.mark.p4c
def test_committed_mini_build_is_fresh(tmp_path):
    """data/mini.json and mini.p4info.txtpb are what p4c makes of mini.p4 today."""
    if not BMV2_JSON.exists():
        pytest.skip("mini.json not committed yet")
    subprocess.run(["bash", str(DATA / "build.sh"), str(tmp_path)], check=True,
                   env=tool_env(), capture_output=True)
    assert filecmp.cmp(tmp_path / "mini.p4info.txtpb", P4INFO, shallow=False)
    assert filecmp.cmp(tmp_path / "mini.json", BMV2_JSON, shallow=False)


async def test_bmv2_token_router_takes_a_compiled_example_policy(bmv2):
    """The real program with the policy compiler's entities: applied, read back, adopted."""
    program = DATA.parents[3] / "p4src" / "build" / "token_router"
    if not program.with_suffix(".json").exists():
        pytest.skip("p4src/build/token_router.json not built")
    compile_mod = pytest.importorskip("tokenfabric.controller.compile")
    from tokenfabric.controller.fabric import load_fabric
    from tokenfabric.controller.policy.schema import load_policy
    from tokenfabric.controller.southbound import Pipeline

    examples = DATA.parents[3] / "examples"
    model = load_fabric(examples / "fabric-single.yaml")
    model.policy = load_policy(examples / "policy-bandwidth.yaml", model)
    desired = compile_mod.compile_model(model)["s1"]
    pipeline = Pipeline.from_files(program.with_suffix(".p4info.txtpb"),
                                   program.with_suffix(".json"))
    switch = await as_primary(controller(bmv2, pipeline))
    try:
        result = await switch.apply(desired)
        assert result.inserted == len(desired.entities)
        assert await switch.read_state() == normalized(desired, pipeline)
        seen = await asyncio.to_thread(shell_read, bmv2.opts.grpc_address, 1)
        assert seen == shell_view(list(normalized(desired, pipeline).entities.values()))
    finally:
        await switch.stop()
    again = controller(bmv2, pipeline)
    await again.apply(desired)
    await as_primary(again)
    try:
        assert again.stats.last.writes == 0 and again.stats.pipeline_pushes == 0
    finally:
        await again.stop()


async def test_bmv2_open_shell_reads_as_a_backup(bmv2, pipeline):
    """`tokenfabric switch shell` runs open_shell(): p4runtime-shell's prompt, read-only."""
    import sys

    switch = await as_primary(controller(bmv2, pipeline))
    try:
        await switch.apply(mini_state(tenants=2))
        code = ("import sys; from controller.switch_shell import open_shell; "
                f"sys.exit(open_shell({bmv2.opts.grpc_address!r}, 1, {str(P4INFO)!r}, "
                f"{str(BMV2_JSON)!r}))")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        typed = b"print(len(list(table_entry['MiniIngress.classify'].read())))\nexit\n"
        out, _ = await asyncio.wait_for(proc.communicate(typed), 60)
        text = out.decode(errors="replace")
        assert proc.returncode == 0, text
        assert "not the primary client" in text and "warning" not in text
        assert ">>> 2" in text  # the shell read both classify entries
        assert switch.role is Role.PRIMARY and switch.stats.sessions == 1
    finally:
        await switch.stop()
