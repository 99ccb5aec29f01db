"""Group commit (issue 18): reports that arrive together on one Ledger (the REST handler
calls it from several threads) share one transaction and one commit; each caller returns
only after that commit, a refused report undoes only its own statements, and a group
that fails is written report by report, so each caller gets its own outcome. Every test
runs on both engines (the `ledger_target` fixture)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.unit.ledger.test_ledger_replicas import T0, signed
from tokenfabric import usage_signing
from tokenfabric.controller.ledger import Ledger, Usage, UsageRefused
from tokenfabric.controller.ledger_chain import verify_file

WAIT_S = 20.0


def queued_together(led: Ledger, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run `calls` in threads while the test plays a writer that is busy, so that all of
    them queue before any is written (one group); each call's result or exception."""
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 (the test asserts which)
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with led._queue_ready:
        led._writing = True  # a group is being written: every caller queues behind it
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + WAIT_S
        while len(led._queue) < len(calls) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(led._queue) == len(calls), "the callers did not queue"
        assert all(x is None for x in out), "a report returned before any commit"
    finally:
        with led._queue_ready:  # that write is over: one of the callers writes them all
            led._writing = False
            led._queue_ready.notify_all()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    return out


@pytest.fixture
def key(tmp_path):
    usage_signing.generate_key_file(tmp_path / "agent.key")
    return usage_signing.load_key_file(tmp_path / "agent.key")


def test_reports_queued_together_share_one_commit(ledger_target, key):
    """Eight backends' signed reports and two totals reports queued together: one commit
    writes all ten, each caller gets its own outcome, the totals are what the same
    reports give written one by one, and the chain verifies."""
    led = Ledger(ledger_target)
    first = {b: signed(key, f"gpu{b}", 2) for b in range(8)}
    for b in range(8):  # first reports alone: the ledger then knows each backend
        led.record_signed(f"gpu{b}", "agent", first[b], now=T0)
    # the next report of each, linked to its first one's last record
    reports = {b: signed(key, f"gpu{b}", 3, 3, first[b][-1][0].digest()) for b in range(8)}
    calls: list[Callable[[], Any]] = [
        (lambda b=b: led.record_signed(f"gpu{b}", "agent", reports[b], now=T0 + 1))
        for b in range(8)]
    calls += [(lambda n=n: led.record_totals(None, f"plain{n}", [Usage(1, "qwen", 100, 10, 2)],
                                             now=T0 + 1, epoch="boot")) for n in range(2)]
    out = queued_together(led, calls)
    assert [(o.added, o.duplicates, o.gaps) for o in out[:8]] == [(3, 0, [])] * 8
    assert out[8:] == [True, True]
    assert (led.group_commits, led.grouped_reports, led.group_failures) == (1, 10, 0)
    want: dict[int, tuple[int, int, int]] = {1: (200, 20, 4)}
    for recs in [*first.values(), *reports.values()]:
        for rec, _ in recs:
            p, c, r = want.get(rec.tenant_id, (0, 0, 0))
            want[rec.tenant_id] = (p + rec.prompt_tokens, c + rec.completion_tokens, r + 1)
    assert led.totals() == want
    led.close()
    report = verify_file(ledger_target)
    # 8 epoch rows + 8 x 5 records + 2 epoch rows of the totals + 2 usage rows
    assert report.ok and report.rows == 8 + 40 + 2 + 2, report.chain_problem


def test_a_refused_report_undoes_only_its_own_statements(ledger_target, key):
    """In one group: a signed report, a totals report that declares a new epoch (a
    statement already sent) and is then refused as too large, another signed report.
    The refused caller gets UsageRefused and its epoch change is undone; the others
    commit in the same transaction."""
    led = Ledger(ledger_target)
    led.record_totals(None, "plain", [Usage(1, "llama", 10, 1, 1)], now=T0, epoch="e1")
    a, b = signed(key, "gpu1", 2), signed(key, "gpu2", 2)
    out = queued_together(led, [
        lambda: led.record_signed("gpu1", "agent", a, now=T0 + 1),
        lambda: led.record_totals(None, "plain", [Usage(1, "llama", 10**6, 1, 1)],
                                  now=T0 + 1, epoch="e2", max_tokens=1000),
        lambda: led.record_signed("gpu2", "agent", b, now=T0 + 1),
    ])
    assert out[0].added == 2 and out[2].added == 2
    assert isinstance(out[1], UsageRefused) and out[1].kind == "too_large"
    assert (led.group_commits, led.group_failures) == (1, 0)
    # the refused report's new epoch was undone: the same totals in epoch e1 still count
    assert led.record_totals(None, "plain", [Usage(1, "llama", 20, 2, 2)], now=T0 + 2,
                             epoch="e1")
    assert led.totals()[1][0] == 20 + sum(r.prompt_tokens for r, _ in a + b
                                          if r.tenant_id == 1)
    led.close()
    assert verify_file(ledger_target).ok


def test_a_failed_group_is_written_report_by_report(ledger_target, key):
    """A report whose usage no 64-bit column holds fails the group's transaction; each
    report is then written alone: that one fails (OverflowError, nothing of it
    written), the others are recorded once, and an agent's restart is reported once."""
    led = Ledger(ledger_target)
    led.record_totals(None, "plain2", [Usage(5, "llama", 3, 0, 1)], now=T0, epoch="boot1")
    a = signed(key, "gpu1", 2)
    events: list[str] = []
    out = queued_together(led, [
        lambda: led.record_signed("gpu1", "agent", a, now=T0),
        lambda: led.record_totals(None, "plain2", [Usage(5, "llama", 7, 1, 1)], now=T0,
                                  epoch="boot2", events=events),
        lambda: led.record_totals(None, "plain", [Usage(1, "llama", 2**63, 0, 1)], now=T0,
                                  epoch="boot"),
    ])
    assert out[0].added == 2
    assert out[1] is True
    assert isinstance(out[2], OverflowError)
    assert (led.group_commits, led.group_failures) == (0, 1)
    assert led.totals()[5] == (3 + 7, 1, 2)
    assert len(events) == 1 and "new epoch boot2" in events[0]  # written twice, said once
    led.close()
    report = verify_file(ledger_target)
    # gpu1: epoch + 2 records; plain2: epoch + 1, then the new epoch + 1
    assert report.ok and report.rows == 3 + 4, report.chain_problem


def test_a_group_that_cannot_commit_acknowledges_none(tmp_path, key):
    """SQLite: another process holds the file's write lock past the busy timeout; the
    group's transaction and then each report alone fail, and every caller gets the
    error: none is acknowledged, nothing is written."""
    path = str(tmp_path / "ledger.db")
    led = Ledger(path)
    led._db.execute("PRAGMA busy_timeout=50")  # fail fast instead of waiting 5 s
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        out = queued_together(led, [
            (lambda b=b: led.record_signed(f"gpu{b}", "agent", signed(key, f"gpu{b}", 2),
                                           now=T0)) for b in range(3)])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert all(isinstance(o, sqlite3.OperationalError) for o in out), out
    assert led.group_failures == 1 and led.group_commits == 0
    assert led.totals() == {}
    led.close()


def test_cached_group_refusal_and_stale_view(ledger_target, key):
    """A group of signed reports the ledger's caches answer (no reads: on PostgreSQL one
    message): a refused report is dropped from it alone. Then another writer (a
    replica) appends meanwhile: the next group's stale view fails its commit on the
    journal's key, and each report is written again from reads, once."""
    led, replica = Ledger(ledger_target), Ledger(ledger_target)
    recs = {b: signed(key, f"gpu{b}", 6) for b in range(3)}
    for b in range(3):
        led.record_signed(f"gpu{b}", "agent", recs[b][:2], now=T0)
    out = queued_together(led, [
        (lambda b=b: led.record_signed(f"gpu{b}", "agent", recs[b][2:4], now=T0 + 1,
                                       max_tokens=1 if b == 1 else None)) for b in range(3)])
    assert out[0].added == 2 and out[2].added == 2
    assert isinstance(out[1], UsageRefused) and out[1].kind == "too_large"
    assert (led.group_commits, led.group_failures) == (1, 0)
    replica.record_signed("gpu1", "agent", recs[1][2:4], now=T0 + 2)  # led did not see it
    out = queued_together(led, [
        (lambda b=b: led.record_signed(f"gpu{b}", "agent", recs[b][4:], now=T0 + 3))
        for b in range(3)])
    assert [o.added for o in out] == [2, 2, 2]
    assert led.group_failures == 1  # the failure emptied the caches: read, written once
    want: dict[int, tuple[int, int, int]] = {}
    for b in range(3):
        for rec, _ in recs[b]:
            p, c, r = want.get(rec.tenant_id, (0, 0, 0))
            want[rec.tenant_id] = (p + rec.prompt_tokens, c + rec.completion_tokens, r + 1)
    assert led.totals() == replica.totals() == want
    led.close()
    replica.close()
    report = verify_file(ledger_target)
    assert report.ok and report.rows == 3 + 18, report.chain_problem
