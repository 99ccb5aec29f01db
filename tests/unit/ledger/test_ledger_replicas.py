"""The ledger as controller replicas use it (issue 18): one database, several writers,
each agent's records sent to every replica; and a PostgreSQL server that restarts under
a running ledger."""

from __future__ import annotations

import pytest

from tokenfabric import usage_signing
from tokenfabric.controller.ledger import Ledger, Usage, UsageRefused
from tokenfabric.controller.ledger_chain import verify_file
from tokenfabric.pg_temp import PostgresUnavailable, TempPostgres
from tokenfabric.usage_signing import UsageRecord

T0 = 1_780_000_000.0


def signed(key, backend: str, n: int, start: int = 1, prev: str = "") -> list:
    out = []
    for seq in range(start, start + n):
        rec = UsageRecord(backend, "boot", seq, int(T0 * 1000) + seq, 1 + seq % 3, "llama",
                          10 * seq, seq, 1, prev)
        out.append((rec, usage_signing.sign(key, rec)))
        prev = rec.digest()
    return out


def test_records_sent_to_two_replicas_are_written_once(ledger_target, tmp_path):
    """Two Ledgers on one database (two replicas), every report sent to both, in both
    orders: each record is one journal row, the totals are the records' sum once, the
    chain verifies; the second writer's stale view (it skips reads while it was the last
    writer) is caught by the journal's key and the report written again from reads."""
    usage_signing.generate_key_file(tmp_path / "agent.key")
    key = usage_signing.load_key_file(tmp_path / "agent.key")
    a, b = Ledger(ledger_target), Ledger(ledger_target)
    recs = signed(key, "gpu1", 40)
    for i in range(0, 40, 4):
        batch = recs[i:i + 4]
        first, second = (a, b) if i % 8 else (b, a)
        one = first.record_signed("gpu1", "agent", batch, now=T0 + i)
        two = second.record_signed("gpu1", "agent", batch, now=T0 + i)
        assert (one.added, one.duplicates) == (4, 0)
        assert (two.added, two.duplicates) == (0, 4)
    # a report only one replica saw, then the next batch to the other one first
    a.record_signed("gpu1", "agent", signed(key, "gpu1", 1, 41, recs[-1][0].digest()),
                    now=T0 + 50)
    want = {}
    for rec, _ in recs:
        p, c, r = want.get(rec.tenant_id, (0, 0, 0))
        want[rec.tenant_id] = (p + rec.prompt_tokens, c + rec.completion_tokens, r + 1)
    t = 1 + 41 % 3
    p, c, r = want.get(t, (0, 0, 0))
    want[t] = (p + 410, c + 41, r + 1)
    assert a.totals() == b.totals() == want
    assert a.head() == b.head() and a.head()[0] == 41 + 1  # 41 usage rows + 1 epoch row
    assert a.cache_misses + b.cache_misses >= 1  # the stale view was caught, not trusted
    a.close()
    b.close()
    report = verify_file(ledger_target)
    assert report.ok and report.rows == 42, report.chain_problem


def test_reports_written_without_reads_keep_every_value_exactly(ledger_target, tmp_path):
    """A signed report this process can answer from what it wrote last goes, on
    PostgreSQL, as one message with its values quoted client-side: text with quotes,
    backslashes, `?`, `;`, `--` and non-ASCII comes back byte for byte, big integers
    too, for a 2-record report and for a 40-record one, and the chain verifies."""
    usage_signing.generate_key_file(tmp_path / "agent.key")
    key = usage_signing.load_key_file(tmp_path / "agent.key")
    led = Ledger(ledger_target)
    model = "l'la\\ma ?; DROP TABLE journal; -- \u00e9\u6f22 $1 E'x'"
    prev, recs = "", []
    for seq in range(1, 45):
        big = 2**62 if seq == 44 else 10 * seq  # the minute row sums it: no 2**63 - 1
        rec = UsageRecord("gpu'1", "boot", seq, int(T0 * 1000) + seq, seq % 3, model, big,
                          seq, 1, prev)
        recs.append((rec, usage_signing.sign(key, rec)))
        prev = rec.digest()
    for batch in (recs[:2], recs[2:4], recs[4:44]):  # the 2nd and 3rd: from the cache
        outcome = led.record_signed("gpu'1", "ag'ent", batch, now=T0)
        assert (outcome.added, outcome.duplicates) == (len(batch), 0)
    assert led.cache_misses == 0
    rows = led._read("SELECT seq, model, backend, agent, prompt_tokens, signature FROM journal "
                     "WHERE kind = 'usage' ORDER BY seq")
    assert rows == [(rec.seq, model, "gpu'1", "ag'ent", rec.prompt_tokens, sig)
                    for rec, sig in recs]
    assert led.usage_by_model(1)[model][0] == sum(r.prompt_tokens for r, _ in recs
                                                  if r.tenant_id == 1)
    led.close()
    report = verify_file(ledger_target)
    assert report.ok and report.rows == 45, report.chain_problem


def test_totals_sent_to_two_replicas_count_once(ledger_target):
    """Cumulative totals (with report ids, as agents send them) to two replicas, whose
    views of what they wrote last go stale in turn: every growth counts once, a report
    id is one report on either replica, and totals lower than the newest recorded are
    still refused by the replica that recorded them."""
    a, b = Ledger(ledger_target), Ledger(ledger_target)

    def report(led: Ledger, n: int, prompt: int) -> bool:
        return led.record_totals(f"gpu1/boot-{n}", "gpu1", [Usage(1, "llama", prompt, 1, 1)],
                                 now=T0 + n, epoch="boot")

    assert report(a, 1, 100) and report(b, 1, 100) is False  # one report id, once
    assert report(b, 2, 250)  # a's view (100) is stale now
    assert report(a, 2, 250) is False  # the same report id
    assert report(a, 3, 400)  # a's view said 100: its stale write failed, read again
    assert report(b, 3, 400) is False
    assert report(b, 4, 400)  # no growth: recorded, nothing counted
    assert a.totals() == b.totals() == {1: (400, 1, 1)}
    assert a.cache_misses >= 1
    with pytest.raises(UsageRefused):  # lower than what a recorded, same epoch
        report(a, 5, 300)
    assert a.totals() == {1: (400, 1, 1)}
    a.close()
    b.close()
    report_ = verify_file(ledger_target)
    assert report_.ok and report_.rows == 1 + 3, report_.chain_problem  # epoch + 3 growths


def test_a_duplicate_signed_record_is_refused_by_the_schema(ledger_target, tmp_path):
    """The unique index of migration 2: one (backend, epoch, seq) usage row, whatever code
    path tries to write another."""
    led = Ledger(ledger_target)
    usage_signing.generate_key_file(tmp_path / "agent.key")
    key = usage_signing.load_key_file(tmp_path / "agent.key")
    led.record_signed("gpu1", "agent", signed(key, "gpu1", 1), now=T0)
    store = led._db
    store.begin_write()
    with pytest.raises(store.unique_violation):
        store.execute(
            "INSERT INTO journal (id, received_ms, kind, agent, backend, tenant_id, model, "
            "prompt_tokens, completion_tokens, requests, epoch, seq, record_ms, prev, "
            "signature, flags, hash) VALUES (99, 0, 'usage', 'x', 'gpu1', 1, 'm', 1, 1, 1, "
            "'boot', 1, 0, '', 'other', '', 'h')")
        store.commit()
    store.rollback()
    led.close()


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of this test alone (it gets restarted)."""
    pytest.importorskip("psycopg", reason="psycopg not installed")
    server = TempPostgres()
    try:
        server.start()
    except (PostgresUnavailable, OSError) as exc:
        server.stop()
        pytest.skip(f"postgresql: cannot start: {exc}")
    yield server
    server.stop()


def test_a_restarted_postgresql_is_reconnected_and_the_write_retried(own_postgres, tmp_path):
    """The server restarts (every connection drops): the next write re-opens the
    connection and goes through, once; so does the next read; nothing is counted twice."""
    url = own_postgres.create_database("ledger")
    led = Ledger(url)
    usage_signing.generate_key_file(tmp_path / "agent.key")
    key = usage_signing.load_key_file(tmp_path / "agent.key")
    recs = signed(key, "gpu1", 4)
    led.record_signed("gpu1", "agent", recs[:2], now=T0)
    assert led.record_totals(None, "plain", [Usage(1, "m", 5, 6, 1)], now=T0, epoch="e")
    own_postgres.restart()
    outcome = led.record_signed("gpu1", "agent", recs[2:], now=T0 + 1)  # cached path
    assert outcome.added == 2 and led.reconnects == 1
    own_postgres.restart()
    assert led.record_totals(None, "plain", [Usage(1, "m", 7, 8, 2)], now=T0 + 2, epoch="e")
    assert led.reconnects == 2
    own_postgres.restart()
    assert led.totals()[1] == (sum(r.prompt_tokens for r, _ in recs if r.tenant_id == 1) + 7,
                               sum(r.completion_tokens for r, _ in recs
                                   if r.tenant_id == 1) + 8,
                               sum(1 for r, _ in recs if r.tenant_id == 1) + 2)
    assert led.reconnects == 3
    led.close()
    assert verify_file(url).ok
