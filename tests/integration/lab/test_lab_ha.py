"""`tokenfabric lab run --experiment ha` end to end (issue 18 item 4): two controller
replicas on a throw-away PostgreSQL, Mininet + BMv2, load running, kill -9 of the leader,
then its restart. The run's ha.json must show the targets met, not merely that it ran."""

import json
import subprocess
import sys

import pytest

from tests.integration.lab.checks import skip_unless_bmv2_lab
from tokenfabric.lab.network import host_shells, leftover_links
from tokenfabric.lab.replicas import TAKEOVER_TARGET_S
from tokenfabric.pg_temp import find_bin

pytestmark = [pytest.mark.mininet, pytest.mark.root, pytest.mark.bmv2, pytest.mark.timeout(420)]


@pytest.fixture(autouse=True)
def _components():
    if find_bin() is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl not found (Debian package postgresql)")
    skip_unless_bmv2_lab()


def test_ha_leader_killed_under_load_backup_takes_over(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "lab", "run", "--topo",
                           "single", "--experiment", "ha", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    [found] = list(tmp_path.glob("*/runs/*/ha.json"))
    ha = json.loads(found.read_text())
    # every BMv2 switch named the backup primary, read back over P4Runtime, within 2 s
    assert ha["takeover_s"] and not ha.get("no_takeover")
    assert max(ha["takeover_s"].values()) <= TAKEOVER_TARGET_S
    failed, near = ha["failed_near_kill"]
    assert near > 0 and failed == 0  # requests ran across the kill, none failed
    assert ha["restarted_role"] == "backup"
    ledger = ha["ledger"]
    assert ledger["agents_reporting"] > 0 and ledger["agents"]
    assert not ledger["lost_or_duplicated"], ledger["ledger_minus_agents"]
    assert "0 lost, 0 duplicated" in (found.parent / "summary.md").read_text()
    assert "teardown: clean" in next(tmp_path.glob("*/summary.md")).read_text()
    assert leftover_links() == [] and host_shells() == []
