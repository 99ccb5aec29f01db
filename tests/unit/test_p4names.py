"""tokenfabric/p4names.py is what p4src/gen_p4names.py makes of the committed build.

The generator reads the committed P4Info and defines.p4, so this needs no p4c
(tests/integration/dataplane/test_build.py checks the P4Info itself is fresh).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tokenfabric import beacon, p4names
from tokenfabric.dataplane import P4SRC, TOKEN_ROUTER_P4INFO

REPO = P4SRC.parent


def test_generated_module_is_what_the_build_generates(tmp_path: Path) -> None:
    out = tmp_path / "p4names.py"
    done = subprocess.run([sys.executable, str(P4SRC / "gen_p4names.py"),
                           str(TOKEN_ROUTER_P4INFO), str(P4SRC / "include" / "defines.p4"),
                           str(out)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == (REPO / "tokenfabric" / "p4names.py").read_text(), (
        "stale tokenfabric/p4names.py: run p4src/build.sh and commit it")


def test_generated_module_imports_no_protobuf() -> None:
    """The host agent imports it (through tokenfabric.beacon) without the P4Runtime stack."""
    code = ("import sys, tokenfabric.p4names, tokenfabric.beacon; "
            "print(sorted(m for m in sys.modules if m.startswith("
            "('google.protobuf', 'p4.', 'grpc', 'controller'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True, cwd=REPO)
    assert done.stdout.strip() == "[]"


def test_beacon_wire_numbers_are_the_documented_ones() -> None:
    """tokenfabric/beacon.py's docstring and docs/agent.md promise these to the agents."""
    assert (beacon.FABRIC_ADDRESS, beacon.BEACON_PORT, beacon.BEACON_VERSION) == (
        "169.254.42.1", 7420, 1)
    assert beacon.LoadBeacon(backend_id=3, load=5).pack()[:2] == bytes([1, 1])
    assert beacon.UsageBeacon(backend_id=3, tenant_id=2, prompt_tokens=1,
                              completion_tokens=1).pack()[:2] == bytes([1, 2])


def test_enums_cover_the_counters() -> None:
    assert max(p4names.DropReason) < p4names.COUNTER_SIZES[p4names.Counters.DROPS]
    assert max(p4names.Event) < p4names.COUNTER_SIZES[p4names.Counters.EVENTS]
    assert p4names.NUM_DROP_REASONS == p4names.COUNTER_SIZES[p4names.Counters.DROPS]
