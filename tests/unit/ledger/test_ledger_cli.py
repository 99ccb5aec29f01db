"""`tokenfabric ledger statement|verify` (real subprocesses) on each engine, and what
they say about a ledger they cannot reach."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.api.conftest import FABRIC
from tests.integration.api.test_api_statement import PRICED
from tokenfabric import exitcodes
from tokenfabric.controller.ledger import Ledger, Usage
from tokenfabric.tools import free_port

T0 = 1_800_000_000


def run_ledger(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenfabric.cli", "ledger", *args],
                          capture_output=True, text=True, timeout=60)


def test_statement_from_either_engine(tmp_path, ledger_target):
    ledger = Ledger(ledger_target)
    ledger.record(None, "gpu1", [Usage(1, "tiny-llama", 200_000, 100_000)], now=T0)
    ledger.record(None, "gpu1", [Usage(2, "tiny-llama", 7, 7)], now=T0 + 1)
    ledger.close()
    (tmp_path / "policy.yaml").write_text(PRICED)
    done = run_ledger("statement", "--ledger", ledger_target, "--policy",
                      str(tmp_path / "policy.yaml"), "--tenant", "acme", "--format", "json")
    assert done.returncode == 0, done.stderr
    statement = json.loads(done.stdout)
    # 200k input at 0.5/M and 100k output at 1.5/M
    assert statement["total"] == "0.250000"
    assert [line["requests"] for line in statement["lines"]] == [1]


def test_an_unreachable_database_is_a_clear_error_without_the_password():
    url = f"postgresql://billing:s3cret@127.0.0.1:{free_port()}/ledger"  # nothing listens
    done = run_ledger("verify", "--ledger", url)
    assert done.returncode == exitcodes.INVALID_INPUT
    assert "cannot read the journal" in done.stderr and "billing:***@" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout


def test_a_controller_on_an_unreachable_database_exits_naming_it(tmp_path):
    (tmp_path / "fabric.yaml").write_text(FABRIC)
    url = f"postgresql://billing:s3cret@127.0.0.1:{free_port()}/ledger"  # nothing listens
    done = subprocess.run(
        [sys.executable, "-m", "tokenfabric.cli", "controller", "run", "--fabric",
         str(tmp_path / "fabric.yaml"), "--ledger", url, "--listen",
         f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60,
        cwd=tmp_path)
    assert done.returncode == exitcodes.FAILED, done.stderr
    assert "cannot open the ledger postgresql://billing:***@127.0.0.1" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout


def test_a_missing_sqlite_file_is_named(tmp_path):
    done = run_ledger("verify", "--ledger", str(tmp_path / "nope.db"))
    assert done.returncode == exitcodes.MISSING and "no such ledger file" in done.stderr
