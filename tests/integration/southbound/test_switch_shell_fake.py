"""p4runtime-shell as an independent reader and writer, against the in-process server."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.southbound.conftest import FAST
from tests.integration.southbound.helpers import P4INFO, mini_state, normalized
from tokenfabric.controller.southbound import Role, Switch, SwitchConfig
from tokenfabric.controller.switch_shell import (
    check_program,
    shell_commands,
    shell_read,
    shell_view,
    shell_write,
)

pytestmark = pytest.mark.timeout(90)


async def primary(server, pipeline, **options) -> Switch:
    switch = Switch(SwitchConfig("s1", server.address, election_id=9, pipeline=pipeline,
                                 **{**FAST, **options}))
    await switch.start()
    await switch.wait_role(Role.PRIMARY)
    return switch


async def test_shell_reads_what_the_controller_wrote(fake, pipeline):
    switch = await primary(fake, pipeline)
    try:
        desired = mini_state(tenants=3, weights=(2, 1, 1))
        await switch.apply(desired)
        seen = await asyncio.to_thread(shell_read, fake.address, fake.device_id)
        assert seen == shell_view(list(normalized(desired, pipeline).entities.values()))
        assert seen["groups"]["MiniIngress.backend_selector"][0]["members"] == \
            [[1, 2], [2, 1], [3, 1]]
        # the shell connected below the controller: it never became primary
        assert switch.role is Role.PRIMARY and switch.stats.sessions == 1
        assert fake.updates_written() == len(desired.entities)
    finally:
        await switch.stop()


async def test_entries_written_by_the_shell_are_adopted_without_writes(fake, pipeline):
    # p4runtime-shell writes the program's entries (as the benchmark baseline does) ...
    setup = await primary(fake, pipeline)
    await setup.stop()  # leaves the pipeline installed, no controller connected
    desired = mini_state(tenants=4, weights=(1, 2, 1))
    commands = shell_commands(list(normalized(desired, pipeline).entities.values()))
    result = await asyncio.to_thread(shell_write, fake.address, fake.device_id, commands, 9)
    assert result["entities"] == len(desired.entities)
    written = fake.updates_written()
    assert written == len(desired.entities)
    # ... and a controller wanting the same state finds nothing to write
    switch = Switch(SwitchConfig("s1", fake.address, election_id=9, pipeline=pipeline, **FAST))
    await switch.apply(desired)
    await switch.start()
    try:
        await switch.wait_role(Role.PRIMARY)
        assert switch.stats.last.applied and switch.stats.last.writes == 0
        assert fake.updates_written() == written
    finally:
        await switch.stop()


async def test_check_program_compares_cookies(fake, pipeline, tmp_path):
    switch = await primary(fake, pipeline)
    try:
        config = tmp_path / "mini.json"
        config.write_bytes(pipeline.device_config)
        assert await asyncio.to_thread(check_program, fake.address, 0, P4INFO, config) is None
        config.write_bytes(pipeline.device_config + b"\n")
        problem = await asyncio.to_thread(check_program, fake.address, 0, P4INFO, config)
        assert problem and "runs program cookie" in problem
    finally:
        await switch.stop()
