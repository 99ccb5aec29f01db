"""The ledger on each engine (a real SQLite file, a real PostgreSQL server): durability
settings, migrations, idempotency, filters, cross-check, concurrent writers."""

import threading

import pytest

from tokenfabric.controller.ledger import Ledger, Usage, UsageRefused
from tokenfabric.controller.ledger_chain import verify_file
from tokenfabric.controller.ledger_store import MIGRATIONS, open_store

T0 = 1_800_000_000  # a minute boundary


@pytest.fixture
def ledger(ledger_target):
    led = Ledger(ledger_target)
    yield led
    led.close()


def test_commits_are_durable(ledger, tmp_path):
    """A commit returns once the write-ahead log is on disk, on either engine."""
    if ledger.engine == "sqlite":
        assert ledger._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        ledger.record("x", "b", [Usage(1, "m", 1, 1)])
        assert (tmp_path / "sub" / "ledger.db-wal").exists()
    else:
        assert ledger._db.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        assert ledger._db.execute("SHOW fsync").fetchone()[0] == "on"


def test_migrations_are_versioned_and_run_once(ledger_target):
    led = Ledger(ledger_target)
    assert led._db.schema_version() == max(MIGRATIONS)
    led.record("r", "b", [Usage(1, "m", 1, 1)], now=T0)
    led.close()
    led = Ledger(ledger_target)  # opening again applies nothing twice and keeps the rows
    assert led._db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == len(
        MIGRATIONS)
    assert led.totals() == {1: (1, 1, 1)}
    led.close()


def test_a_sqlite_file_from_before_migrations_is_adopted(tmp_path):
    """A ledger file written before schema_version existed: its tables are migration 1's,
    so it is adopted as version 1, nothing of it changes, and the newer migrations run."""
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(MIGRATIONS[1])
    old.execute("INSERT INTO usage VALUES (?, 1, 'm', 5, 6, 1)", (T0,))
    old.commit()
    old.close()
    led = Ledger(path)
    versions = [v for (v,) in led._db.execute("SELECT version FROM schema_version "
                                              "ORDER BY version").fetchall()]
    assert versions == sorted(MIGRATIONS) and led.totals() == {1: (5, 6, 1)}
    led.close()


def test_writers_on_two_connections_keep_one_chain(ledger_target):
    """Two Ledger objects (as two controller processes would) append to the journal
    together: the write lock (SQLite's file lock, PostgreSQL's advisory lock) keeps its
    ids without holes and its hash chain intact."""
    first, second = Ledger(ledger_target), Ledger(ledger_target)

    def work(led, k):
        for i in range(40):
            led.record(f"{k}-{i}", f"b{k}", [Usage(k, "m", 1, 2)], now=T0 + i)

    threads = [threading.Thread(target=work, args=(led, k))
               for k, led in enumerate((first, second, first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert first.totals() == {k: (40, 80, 40) for k in range(4)}
    first.close()
    second.close()
    report = verify_file(ledger_target)
    assert report.ok and report.rows == 160, report.chain_problem


def test_a_read_only_store_refuses_writes(ledger_target):
    Ledger(ledger_target).close()
    store = open_store(ledger_target, read_only=True)
    try:
        with pytest.raises(Exception, match="(?i)read.only|readonly"):
            store.execute("DELETE FROM usage")
    finally:
        store.close()


def test_same_report_id_counts_once(ledger):
    assert ledger.record("b1/r1", "b1", [Usage(1, "m", 10, 20)], now=T0)
    assert not ledger.record("b1/r1", "b1", [Usage(1, "m", 10, 20)], now=T0 + 1)
    assert ledger.has_report("b1/r1") and not ledger.has_report("b1/r2")
    [row] = ledger.query()
    assert (row.prompt_tokens, row.completion_tokens, row.requests) == (10, 20, 1)
    # without an id there is nothing to deduplicate on: each call counts
    ledger.record(None, "b1", [Usage(1, "m", 1, 1)], now=T0)
    ledger.record(None, "b1", [Usage(1, "m", 1, 1)], now=T0)
    assert ledger.query()[0].prompt_tokens == 12


def test_rows_per_tenant_model_minute(ledger):
    ledger.record("a", "b", [Usage(1, "m", 1, 2), Usage(1, "m", 3, 4, requests=2),
                             Usage(2, "m", 5, 6), Usage(1, "n", 7, 8)], now=T0 + 59.9)
    ledger.record("b", "b", [Usage(1, "m", 100, 100)], now=T0 + 60)
    rows = [(r.minute, r.tenant_id, r.model, r.prompt_tokens, r.completion_tokens, r.requests)
            for r in ledger.query()]
    assert rows == [(T0, 1, "m", 4, 6, 3), (T0, 1, "n", 7, 8, 1), (T0, 2, "m", 5, 6, 1),
                    (T0 + 60, 1, "m", 100, 100, 1)]
    assert [r.minute for r in ledger.query(since=T0 + 1)] == [T0 + 60]
    assert [r.minute for r in ledger.query(until=T0 + 60)] == [T0, T0, T0]
    assert [r.model for r in ledger.query(tenant_id=1, model="n")] == ["n"]
    assert ledger.query(tenant_id=9) == []
    assert ledger.totals() == {1: (111, 114, 5), 2: (5, 6, 1)}


def test_a_failed_transaction_adds_nothing(ledger):
    with pytest.raises(OverflowError):  # the API bounds every number; this proves atomicity
        ledger.record("bad", "b", [Usage(1, "m", 1, 1), Usage(1, "m", 2**70, 1)], now=T0)
    assert ledger.query() == [] and not ledger.has_report("bad")
    assert ledger.record("bad", "b", [Usage(1, "m", 1, 1)], now=T0)  # the id is still free


def test_concurrent_writers_lose_nothing(ledger):
    def work(k):
        for i in range(50):
            ledger.record(f"{k}-{i}", "b", [Usage(k, "m", 1, 2)], now=T0)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.totals() == {k: (50, 100, 50) for k in range(4)}


def test_counter_growth_handles_restarts_and_switches(ledger):
    ledger.record_counters("s1", {1: (100, 1, 1), 2: (0, 0, 0)}, now=T0)
    ledger.record_counters("s1", {1: (400, 4, 2), 2: (10, 1, 1)}, now=T0 + 10)
    ledger.record_counters("s1", {1: (50, 1, 1)}, now=T0 + 20)  # s1 restarted: reset to 0
    ledger.record_counters("s2", {1: (1000, 9, 5)}, now=T0 + 5)
    ledger.record_counters("s2", {1: (1500, 12, 6)}, now=T0 + 15)
    assert ledger.counter_growth() == {1: (300 + 50 + 500, 3 + 1 + 3, 1 + 1 + 1, 5),
                                       2: (10, 1, 1, 2)}
    assert ledger.counter_growth(since=T0 + 10) == {1: (50 + 0, 1 + 0, 1, 3),
                                                    2: (0, 0, 0, 1)}


def test_cross_check_side_by_side(ledger):
    ledger.record("r", "b", [Usage(1, "m", 40, 60)], now=T0)
    ledger.record_counters("s1", {1: (0, 0, 0), 3: (0, 0, 0)}, now=T0)
    ledger.record_counters("s1", {1: (5000, 50, 4), 3: (700, 7, 1)}, now=T0 + 30)
    rows = {r.tenant_id: r for r in ledger.cross_check()}
    assert rows[1].bytes_per_token == 50.0 and rows[1].switch_packets == 50
    assert rows[1].switch_connections == 4
    # traffic the switch saw for a tenant no agent reported: visible, not hidden
    assert rows[3].prompt_tokens == 0 and rows[3].switch_bytes == 700
    assert rows[3].bytes_per_token is None


def test_reopen_keeps_everything(ledger_target):
    path = ledger_target
    led = Ledger(path)
    led.record("r1", "b", [Usage(1, "m", 3, 4)], now=T0)
    led.close()
    led = Ledger(path)
    assert led.has_report("r1") and not led.record("r1", "b", [Usage(1, "m", 3, 4)])
    assert led.totals() == {1: (3, 4, 1)}
    led.close()


def test_csv_export(ledger):
    ledger.record("r", "b", [Usage(7, 'model,"quoted"', 1, 2)], now=T0)
    text = ledger.export_csv(ledger.query())
    assert text.splitlines() == [
        "minute,minute_utc,tenant_id,model,prompt_tokens,completion_tokens,total_tokens,"
        "requests",
        f'{T0},2027-01-15T08:00:00Z,7,"model,""quoted""",1,2,3,1']


def test_cumulative_totals_count_their_growth(ledger):
    def totals(p, c, r, tenant=1, model="m"):
        return [Usage(tenant, model, p, c, r)]

    assert ledger.record_totals(None, "b1", totals(10, 20, 1), now=T0)
    assert ledger.record_totals(None, "b1", totals(10, 20, 1), now=T0)  # a retry: no growth
    ledger.record_totals(None, "b1", totals(25, 50, 2), now=T0 + 1)
    # a lost report: the next totals carry its usage
    ledger.record_totals(None, "b1", totals(40, 80, 4), now=T0 + 3)
    assert ledger.totals() == {1: (40, 80, 4)}
    # another backend's totals are its own
    ledger.record_totals(None, "b2", totals(5, 5, 1), now=T0 + 3)
    assert ledger.totals() == {1: (45, 85, 5)}
    # totals that go down in the same epoch are refused, and nothing changes
    with pytest.raises(UsageRefused, match="went backwards") as refused:
        ledger.record_totals(None, "b1", totals(3, 4, 1), now=T0 + 60)
    assert refused.value.kind == "backwards"
    assert ledger.totals() == {1: (45, 85, 5)}
    # the agent restarted and says so (a new epoch): its totals count from zero
    events = []
    ledger.record_totals(None, "b1", totals(3, 4, 1), now=T0 + 60, epoch="boot2",
                         events=events)
    assert ledger.totals() == {1: (48, 89, 6)}
    assert "new epoch boot2" in events[0]
    assert [(r.minute, r.prompt_tokens) for r in ledger.query()] == [(T0, 45), (T0 + 60, 3)]
    # with a report id, a duplicate is refused outright
    assert ledger.record_totals("x", "b1", totals(9, 9, 2), now=T0 + 60)
    assert not ledger.record_totals("x", "b1", totals(9, 9, 2), now=T0 + 60)
    assert ledger.totals() == {1: (54, 94, 7)}
