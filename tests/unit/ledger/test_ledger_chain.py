"""The journal's hash chain and signed records: what the ledger accepts, and what
`tokenfabric ledger verify` (a real subprocess) finds after the ledger was tampered with,
on each engine (a SQLite file, a PostgreSQL database)."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest

from tokenfabric import usage_signing, yamlio
from tokenfabric.controller.ledger import Ledger, Usage, UsageRefused
from tokenfabric.controller.ledger_chain import GENESIS, SELECT_ROWS, JournalRow, chain, verify_file
from tokenfabric.controller.ledger_store import open_store
from tokenfabric.usage_signing import UsageRecord

T0 = 1_780_000_000.0
AGENT_TOKEN = "agent-token-0123456789abcdef"


@pytest.fixture
def key(tmp_path):
    public = usage_signing.generate_key_file(tmp_path / "agent.key")
    return usage_signing.load_key_file(tmp_path / "agent.key"), public


def records(key, n, epoch="e1", start=1, prev="", backend="gpu1"):
    out = []
    for seq in range(start, start + n):
        rec = UsageRecord(backend, epoch, seq, int(T0 * 1000) + seq, 1, "llama", 10 * seq,
                          seq, 1, prev)
        out.append((rec, usage_signing.sign(key, rec)))
        prev = rec.digest()
    return out


def build(target, key) -> str:
    path = target
    ledger = Ledger(path)
    recs = records(key[0], 30)
    for i in range(0, 30, 3):
        ledger.record_signed("gpu1", "gpu1-agent", recs[i:i + 3], now=T0 + i)
    ledger.record(None, "gpu2", [Usage(2, "qwen", 5, 6)], now=T0 + 40, agent="ops")
    ledger.record_totals(None, "gpu3", [Usage(1, "llama", 7, 8)], now=T0 + 41, agent="gpu3",
                         epoch="boot")
    ledger.close()
    return path


def tamper(target: str, script: str, args: tuple = ()) -> None:
    """Run SQL on the ledger behind the controller's back (an attacker with write access)."""
    store = open_store(target)
    try:
        store.begin_write()
        for statement in script.split(";"):
            store.execute(statement, args)
        store.commit()
    finally:
        store.close()


def tokens_file(tmp_path, public) -> str:
    path = tmp_path / "tokens.yaml"
    path.write_text(yamlio.dump({AGENT_TOKEN: {"name": "gpu1-agent", "role": "agent",
                                                  "backends": ["gpu1"], "public_key": public}}))
    return str(path)


def run_verify(*args):
    return subprocess.run([sys.executable, "-m", "tokenfabric.cli", "ledger", "verify", *args],
                          capture_output=True, text=True, timeout=60)


def test_an_untouched_ledger_verifies(tmp_path, key, ledger_target):
    path = build(ledger_target, key)
    report = verify_file(path, {"gpu1-agent": [base64.b64decode(key[1])]})
    # gpu1's epoch row and 30 signed records, 1 plain item, gpu3's epoch row and growth
    assert report.ok and report.rows == 34 and report.signed_rows == 30
    assert report.unsigned_rows == 2 and report.signatures_checked == 1  # one unbroken run
    every = verify_file(path, {"gpu1-agent": [base64.b64decode(key[1])]}, all_signatures=True)
    assert every.ok and every.signatures_checked == 30
    done = run_verify("--ledger", path, "--tokens", tokens_file(tmp_path, key[1]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "34 rows" in done.stdout and "hash chain: intact" in done.stdout
    head = done.stdout.split("head ")[1].split()[0]
    assert run_verify("--ledger", path, "--expect-head", head[:16]).returncode == 0
    assert run_verify("--ledger", path, "--expect-head", "0" * 16).returncode == 1


@pytest.mark.parametrize("edit,named", [
    ("UPDATE journal SET completion_tokens = 9999 WHERE id = 7", "row 7: does not match"),
    ("DELETE FROM journal WHERE id = 12", "rows 12..12 are missing"),
    ("UPDATE journal SET id = -1 WHERE id = 20; UPDATE journal SET id = 20 WHERE id = 21; "
     "UPDATE journal SET id = 21 WHERE id = -1", "row 20: does not match"),
    ("DELETE FROM journal WHERE id = 1", "rows 1..1 are missing"),
])
def test_verify_names_the_tampered_row(tmp_path, key, ledger_target, edit, named):
    path = build(ledger_target, key)
    tamper(path, edit)
    done = run_verify("--ledger", path, "--tokens", tokens_file(tmp_path, key[1]))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "TAMPERED: " in done.stdout and named in done.stdout


def test_an_edit_of_the_per_minute_table_shows(key, ledger_target):
    """GET /ledger and ledger.csv read the per-minute table: verify sums the journal
    against it."""
    path = build(ledger_target, key)
    assert verify_file(path).table_problems == []
    ledger = Ledger(path)
    minute = max(r.minute for r in ledger.query())
    ledger.close()
    tamper(path, "UPDATE usage SET completion_tokens = completion_tokens + 1000 "
           "WHERE minute = ? AND tenant_id = 1", (minute,))
    done = run_verify("--ledger", path)
    assert done.returncode == 1
    assert f"TAMPERED (per-minute table): minute {minute} tenant 1 model 'llama'" in done.stdout
    assert "hash chain: intact" in done.stdout  # the journal itself was not touched


def test_a_rewritten_chain_still_fails_on_the_signatures(tmp_path, key, ledger_target):
    """Whoever can rewrite the ledger can recompute every hash, but not sign for the agent."""
    path = build(ledger_target, key)
    db = open_store(path)
    rows = db.execute(SELECT_ROWS).fetchall()
    edited = [list(r[:16]) for r in rows]
    edited[9][8] = 10 ** 6  # row 10's completion tokens (gpu1's 9th record)
    rebuilt = chain(1, GENESIS, [JournalRow(*r[1:]) for r in edited])
    db.begin_write()
    db.execute("DELETE FROM journal")
    db.executemany(f"INSERT INTO journal VALUES ({', '.join('?' * 17)})", rebuilt)
    db.commit()
    db.close()
    assert verify_file(path).ok  # the chain alone cannot tell
    done = run_verify("--ledger", path, "--tokens", tokens_file(tmp_path, key[1]))
    assert done.returncode == 1
    assert "row 11: does not link to gpu1's previous record" in done.stdout


def test_signed_records_retries_replays_gaps_forks_epochs(key, ledger_target):
    ledger = Ledger(ledger_target)
    recs = records(key[0], 6)
    assert ledger.record_signed("gpu1", "a", recs[:2], now=T0).added == 2
    # a retry of the same records: nothing counted twice
    again = ledger.record_signed("gpu1", "a", recs[:3], now=T0 + 1)
    assert (again.added, again.duplicates) == (1, 2)
    assert ledger.totals() == {1: (60, 6, 3)}
    # an old sequence number with other content: a replay, refused
    forged = UsageRecord("gpu1", "e1", 2, 0, 1, "llama", 1, 1, 1, "")
    with pytest.raises(UsageRefused) as refused:
        ledger.record_signed("gpu1", "a", [(forged, usage_signing.sign(key[0], forged))])
    assert refused.value.kind == "replay"
    # a record that does not link to the previous one: a fork, refused
    fork = UsageRecord("gpu1", "e1", 4, 0, 1, "llama", 1, 1, 1, "ab" * 32)
    with pytest.raises(UsageRefused) as refused:
        ledger.record_signed("gpu1", "a", [(fork, usage_signing.sign(key[0], fork))])
    assert refused.value.kind == "fork"
    # records 4 and 5 never arrive: 6 is recorded and flagged
    gap = ledger.record_signed("gpu1", "a", recs[5:], now=T0 + 2)
    assert gap.added == 1 and gap.gaps == ["4-5"]
    # a restart: a new epoch, its sequence from 1; the old epoch is closed
    fresh = ledger.record_signed("gpu1", "a", records(key[0], 1, epoch="e2"), now=T0 + 3)
    assert (fresh.new_epoch, fresh.previous_epoch) == ("e2", "e1")
    with pytest.raises(UsageRefused):
        ledger.record_signed("gpu1", "a", records(key[0], 1, epoch="e1", start=7))
    ledger.close()
    report = verify_file(ledger_target, {"a": [base64.b64decode(key[1])]})
    assert report.ok and [g.message.split(": ")[1] for g in report.gaps] == ["gap:4-5"]
