"""The committed p4c output (and the names generated from it) match the sources, and
the docs name everything the P4Info holds."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenfabric import dataplane as dp
from tokenfabric.controller.southbound.p4info import load_p4info
from tokenfabric.tools import tool_env

# Output name -> the committed file build.sh would write there.
OUTPUTS = {name: dp.BUILD / name for name in (
    "token_router.json", "token_router.p4info.txtpb", "forward.json", "forward.p4info.txtpb")}
OUTPUTS["p4names.py"] = dp.P4SRC.parent / "tokenfabric" / "p4names.py"


@pytest.mark.p4c
def test_committed_output_is_what_the_sources_compile_to(tmp_path):
    env = {**tool_env(), "PYTHON": sys.executable}  # gen_p4names.py needs the protobufs
    done = subprocess.run([str(dp.P4SRC / "build.sh"), str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    stale = [str(committed) for name, committed in OUTPUTS.items()
             if (tmp_path / name).read_bytes() != committed.read_bytes()]
    assert not stale, f"stale build output {stale}: run p4src/build.sh and commit it"


def test_docs_name_everything_in_the_p4info():
    info = load_p4info(dp.TOKEN_ROUTER_P4INFO)
    docs = (dp.P4SRC.parent / "docs" / "dataplane.md").read_text()
    entities = [*info.tables, *info.counters, *info.meters, *info.action_profiles,
                *info.actions]
    for name in (e.preamble.name for e in entities if e.preamble.name != "NoAction"):
        assert f"`{name}" in docs, f"{name} is in the P4Info but not in docs/dataplane.md"
