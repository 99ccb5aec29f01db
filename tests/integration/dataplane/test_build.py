"""The committed p4c output matches the sources, and carries the names the docs promise."""

from __future__ import annotations

import subprocess

import pytest

from tests.integration.dataplane.p4rt import P4Info
from tokenfabric import dataplane as dp
from tokenfabric.tools import tool_env

OUTPUTS = ("token_router.json", "token_router.p4info.txtpb", "forward.json",
           "forward.p4info.txtpb")


@pytest.mark.p4c
def test_committed_output_is_what_the_sources_compile_to(tmp_path):
    done = subprocess.run([str(dp.P4SRC / "build.sh"), str(tmp_path)], capture_output=True,
                          text=True, env=tool_env(), timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    stale = [name for name in OUTPUTS
             if (tmp_path / name).read_bytes() != (dp.BUILD / name).read_bytes()]
    assert not stale, f"stale p4c output {stale}: run p4src/build.sh and commit p4src/build/"


def test_p4info_has_every_documented_name():
    info = P4Info.load(dp.TOKEN_ROUTER_P4INFO)
    for table, actions in dp.TABLES.items():
        assert table in info.tables, table
        table_actions = {ref.id for ref in info.tables[table].action_refs}
        for action in actions:
            assert info.actions[action].preamble.id in table_actions, (table, action)
    for counter in dp.COUNTERS:
        assert counter in info.counters, counter
    assert dp.METER in info.meters
    assert dp.ACTION_PROFILE in info.profiles
    docs = (dp.P4SRC.parent / "docs" / "dataplane.md").read_text()
    for name in [*info.tables, *info.counters, *info.meters, *info.profiles,
                 *(a for a in info.actions if a != "NoAction")]:
        assert f"`{name}" in docs, f"{name} is in the P4Info but not in docs/dataplane.md"
