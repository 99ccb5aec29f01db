"""The token ledger: prompt and completion tokens per tenant, model and minute.

Rows come from the host agents' usage reports: either the usage since the last
report, deduplicated by a report id, or (preferred) the agent's cumulative totals,
whose growth is counted, so that retries and lost reports need no id at all.
The rows live in SQLite (a file in WAL mode with synchronous=FULL, the default) or in
PostgreSQL (`--ledger postgresql://...`, synchronous_commit on), behind one storage
interface (controller/ledger_store.py): a report is acknowledged (HTTP 2xx) only after
its transaction committed and the WAL was flushed to disk, so it survives a kill -9 of
the controller and a power cut. A report id makes recording idempotent: an agent
that retries after a timeout never double counts.

Reports that arrive together (the REST handler calls the ledger from several threads)
share one commit: a caller that finds nobody writing writes every report queued so far
in one transaction, each report inside a savepoint (a refused report undoes only its
own statements), and each caller returns only once that commit is durable. If
the group's transaction fails, every report of it is written again on its own, so each
gets its own outcome and none is acknowledged without a commit (see _submit).

Every usage the ledger counts is also a row of the journal (controller/ledger_chain.py):
rows chained by hash, with the agent's signature and sequence number when its usage is
signed, so that `tokenfabric ledger verify` shows an edited, deleted or reordered row.
Cumulative totals never go backwards: lower totals are refused (UsageRefused) unless the
agent declared a new epoch (a restart), which is journalled as an `epoch` row.

Switch counters (bytes and packets per tenant, read over P4Runtime) are sampled
into the same database, so that a time range can put what the agents say the
tenants used beside what the switches saw.
"""

from __future__ import annotations

import csv
import io
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenfabric.controller import statement
from tokenfabric.controller.csv_cells import safe_row
from tokenfabric.controller.ledger_chain import COLUMNS, JournalRow, chain
from tokenfabric.controller.ledger_chain import GENESIS as GENESIS_HASH
from tokenfabric.controller.ledger_store import Cursor, Store, allocate_backend_id, open_store
from tokenfabric.usage_signing import UsageRecord
from tokenfabric.wire import CrossCheckView

log = logging.getLogger(__name__)


INT64 = 2**63
JOURNAL_INSERT = f"INSERT INTO journal ({', '.join(COLUMNS)}, hash)"
# rows per INSERT: SQLite binds at most 32766 values in one statement (17 per journal row)
MAX_ROWS_PER_INSERT = 500
REPORT_ID_RETENTION_S = 7 * 24 * 3600  # agents retry for seconds; a week is plenty
SIGNED_CACHE_SEQS = 512  # per backend: the recent records whose signatures are remembered
# reports in one group commit at most: bounds how long the write lock is held
MAX_GROUP = 64


class UsageRefused(Exception):
    """A report's usage cannot be counted; nothing of the report was recorded.

    kind: backwards (lower cumulative totals in the same epoch), too_large (over the
    per-report bound), replay (an old record whose content differs from the one
    recorded, or a record of an epoch that ended), fork (a record that does not link
    to the agent's previous one)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class SignedOutcome:
    """What a report of signed records did to the ledger."""

    added: int = 0
    duplicates: int = 0  # records recorded before with the same signature: a retry
    gaps: list[str] = field(default_factory=list)  # "5-7": records that never arrived
    usage: list[Usage] = field(default_factory=list)  # what the new records added
    new_epoch: str | None = None  # the agent declared this new epoch (a restart)
    previous_epoch: str | None = None


@dataclass
class _Pending:
    """One report waiting for the commit that writes it (Ledger._submit)."""

    work: Callable[[bool], Any]  # the report's statements; its argument: use the caches
    cached: Callable[[], bool] | None  # True: the caches answer its reads; None: it reads
    result: Any = None
    error: BaseException | None = None
    done: bool = False  # result or error is final: its commit (or failure) is over


@dataclass(frozen=True)
class Usage:
    tenant_id: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    requests: int = 1


@dataclass(frozen=True)
class UsageRow:
    minute: int
    tenant_id: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    requests: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Ledger:
    """A SQLite file (a path) or a PostgreSQL database (a postgresql:// URL); safe to call
    from several threads (one connection, one lock)."""

    def __init__(self, target: str | Path) -> None:
        self.path = str(target)
        self._lock = threading.Lock()
        self._db: Store = open_store(self.path)
        self._last_prune = 0.0
        # What this process last wrote, to skip the reads of the next signed report when
        # nobody else wrote meanwhile (see _signed_from_cache): the journal's head, and
        # per backend its (epoch, last seq, last digest) and recent seq -> signature.
        self._head_cache: tuple[int, str] | None = None
        self._signed_cache: dict[str, tuple[tuple[str, int, str], dict[int, str]]] = {}
        # per backend of cumulative totals: its agent_epochs row and its usage_totals rows
        self._totals_cache: dict[str, tuple[tuple | None, dict[tuple[int, str],
                                                               tuple[int, int, int]]]] = {}
        self.reconnects = 0  # PostgreSQL connections re-opened after a drop
        self.cache_misses = 0  # signed reports written again after another writer's
        self._queue: list[_Pending] = []  # reports waiting for a group commit
        # around the queue and `_writing` only, never around I/O
        self._queue_ready = threading.Condition(threading.Lock())
        self._writing = False  # a caller is writing a group
        self.group_commits = 0  # commits that wrote two or more reports
        self.grouped_reports = 0  # the reports those commits wrote
        self.group_failures = 0  # groups whose transaction failed (reports then alone)

    @property
    def engine(self) -> str:
        return self._db.engine

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ writes

    def record(self, report_id: str | None, backend: str, usage: Iterable[Usage],
               now: float | None = None, agent: str = "",
               max_tokens: int | None = None) -> bool:
        """Add one report's usage; False (and nothing added) if its id was recorded before."""
        now = time.time() if now is None else now
        usage = list(usage)

        def add(minute: int, cached: bool) -> None:
            _check_bound(usage, max_tokens)
            last = _head(self._head_query())
            self._add_usage(minute, usage)
            self._journal([_row(now, agent, backend, u) for u in usage], last)

        return self._in_report(report_id, backend, now, add)

    def record_totals(self, report_id: str | None, backend: str, totals: Iterable[Usage],
                      now: float | None = None, agent: str = "", epoch: str | None = None,
                      max_tokens: int | None = None, events: list[str] | None = None) -> bool:
        """Add the growth of an agent's cumulative totals since its last report.

        Idempotent by construction: a retried or duplicated report has grown by
        nothing, and a lost report's usage is counted with the next one. Totals
        lower than the last ones are refused (UsageRefused "backwards") unless the
        report names an epoch other than the backend's last one: the agent restarted,
        its totals count from zero, and an `epoch` row (and `events`) says so.
        """
        now = time.time() if now is None else now
        totals = list(totals)
        events_before = len(events) if events is not None else 0

        def add(minute: int, cached: bool) -> None:
            if events is not None:  # a second attempt (group failed, stale view) says it once
                del events[events_before:]
            from_cache = self._totals_from_cache(backend) if cached else None
            if from_cache is not None:
                last, state, known = from_cache
            else:
                last, state, known = self._totals_state(backend)
            rows: list[JournalRow] = []
            if epoch is not None:
                epoch_row = self._switch_epoch(now, agent, backend, epoch, events, state,
                                               bool(known))
                if epoch_row is not None:
                    rows.append(epoch_row)
                    if epoch_row.flags == "reset":
                        self._db.execute("DELETE FROM usage_totals WHERE backend = ?",
                                         (backend,))
                        known = {}
            growth = []
            reported: dict[tuple[int, str], tuple[int, int, int]] = {}
            for u in totals:
                new = (u.prompt_tokens, u.completion_tokens, u.requests)
                row = known.get((u.tenant_id, u.model))
                if row is not None and any(n < o for n, o in zip(new, row, strict=True)):
                    raise UsageRefused(
                        "backwards", f"usage_total of tenant {u.tenant_id} model {u.model!r} "
                        f"went backwards ({_fmt(row)} -> {_fmt(new)}) in the same epoch; a "
                        "restarted agent declares a new `epoch`")
                grown = new if row is None else tuple(
                    n - o for n, o in zip(new, row, strict=True))
                known[(u.tenant_id, u.model)] = new  # a pair named twice grows once
                reported[(u.tenant_id, u.model)] = new
                if any(grown):
                    growth.append(Usage(u.tenant_id, u.model, *grown))
            _check_bound(growth, max_tokens)
            if from_cache is not None and not rows and not growth:
                # nothing new: write nothing (a view that went stale meanwhile, which no
                # journal row of this report would catch, must not overwrite newer totals)
                self._head_cache = last
                return
            self._insert_rows(
                "INSERT INTO usage_totals (backend, tenant_id, model, prompt_tokens, "
                "completion_tokens, requests)",
                [(backend, t, m, *new) for (t, m), new in reported.items()],
                " ON CONFLICT (backend, tenant_id, model) DO UPDATE SET "
                "prompt_tokens = excluded.prompt_tokens, "
                "completion_tokens = excluded.completion_tokens, "
                "requests = excluded.requests")
            self._add_usage(minute, growth)
            rows.extend(_row(now, agent, backend, u) for u in growth)
            self._journal(rows, last)
            self._totals_cache[backend] = ((epoch,) if epoch is not None else state, known)

        return self._in_report(report_id, backend, now, add,
                               cached=lambda: self._totals_from_cache(backend) is not None)

    def _totals_state(self, backend: str) -> tuple[tuple[int, str], tuple | None,
                                                   dict[tuple[int, str], tuple[int, int, int]]]:
        """What a totals report reads: the journal's head, the backend's agent_epochs row
        (None: none yet), its last cumulative totals. On PostgreSQL the three go out
        together (pipeline) and come back in one round trip."""
        head = self._head_query()
        state_query = self._db.execute("SELECT epoch FROM agent_epochs WHERE backend = ?",
                                       (backend,))
        known_query = self._db.execute(
            "SELECT tenant_id, model, prompt_tokens, completion_tokens, requests "
            "FROM usage_totals WHERE backend = ?", (backend,))
        last = _head(head)
        state = state_query.fetchone()
        known = {(t, m): (p, c, r) for t, m, p, c, r in known_query.fetchall()}
        return last, (tuple(state) if state is not None else None), known

    def _totals_from_cache(self, backend: str) -> tuple[
            tuple[int, str], tuple | None, dict[tuple[int, str], tuple[int, int, int]]] | None:
        """_totals_state's answer from what this process wrote last (a copy), without a
        read; None when it does not know. Safe as _signed_from_cache is: another writer's
        change of the backend's totals or epoch comes with journal rows, so a report that
        appends rows after a stale head fails on the journal's key and is written again
        from reads, and one that appends none writes nothing."""
        if self._head_cache is None or backend not in self._totals_cache:
            return None
        state, known = self._totals_cache[backend]
        return self._head_cache, state, dict(known)

    def record_signed(self, backend: str, agent: str,
                      records: list[tuple[UsageRecord, str]], now: float | None = None,
                      max_tokens: int | None = None) -> SignedOutcome:
        """Add signed records (signatures already verified by the caller) in seq order.

        A record already recorded with the same signature is a retry (skipped); one
        whose content differs, or that is older than the epoch's last, is a replay;
        one that does not link to the epoch's previous record is a fork (both refuse
        the whole report). A record after a hole in the sequence is recorded and
        flagged (the hole is in `gaps`). A new epoch restarts the sequence."""
        now = time.time() if now is None else now
        outcome = SignedOutcome()
        records = sorted(records, key=lambda r: r[0].seq)  # one epoch (the caller checks)

        def add(minute: int, cached: bool) -> None:
            # a second attempt (stale view, dropped connection) starts from nothing
            outcome.duplicates, outcome.gaps = 0, []
            outcome.new_epoch = outcome.previous_epoch = None
            rows: list[JournalRow] = []
            fresh: list[Usage] = []
            from_cache = self._signed_from_cache(backend, records) if cached else None
            last, state, recorded = from_cache or self._signed_state(backend, records)
            for rec, signature in records:
                if (rec.epoch, rec.seq, signature) in recorded:
                    outcome.duplicates += 1
                    continue
                if state is None or rec.epoch != state[0]:
                    if self._epoch_seen(backend, rec.epoch):
                        raise UsageRefused("replay", f"record {rec.seq} belongs to epoch "
                                           f"{rec.epoch}, which has ended")
                    outcome.previous_epoch = state[0] if state else None
                    outcome.new_epoch = rec.epoch
                    rows.append(JournalRow(_ms(now), "epoch", agent, backend, 0, "", 0, 0, 0,
                                           epoch=rec.epoch,
                                           flags=f"after:{state[0]}" if state else ""))
                    state = (rec.epoch, 0, "")
                _, last_seq, last_digest = state
                flags = ""
                if rec.seq <= last_seq:
                    raise UsageRefused("replay", f"record {rec.seq} of epoch {rec.epoch} is "
                                       f"older than the last one recorded ({last_seq}) and "
                                       "differs from what was recorded")
                if rec.seq == last_seq + 1 and last_seq and rec.prev != last_digest:
                    raise UsageRefused("fork", f"record {rec.seq} does not link to record "
                                       f"{last_seq} (prev digest differs)")
                if rec.seq > last_seq + 1:
                    hole = f"{last_seq + 1}-{rec.seq - 1}"
                    outcome.gaps.append(hole)
                    flags = f"gap:{hole}"
                rows.append(JournalRow(
                    _ms(now), "usage", agent, backend, rec.tenant_id, rec.model,
                    rec.prompt_tokens, rec.completion_tokens, rec.requests, rec.epoch, rec.seq,
                    rec.time_ms, rec.prev, signature, flags))
                fresh.append(Usage(rec.tenant_id, rec.model, rec.prompt_tokens,
                                   rec.completion_tokens, rec.requests))
                state = (rec.epoch, rec.seq, rec.digest())
            _check_bound(fresh, max_tokens)
            self._add_usage(minute, [u for u in fresh
                                     if u.prompt_tokens or u.completion_tokens or u.requests])
            self._journal(rows, last)
            if state is not None and rows:  # nothing new: the state stays as it is
                self._set_epoch(backend, *state)
                self._remember_signed(backend, state, rows)
            outcome.added = len(fresh)
            outcome.usage = fresh

        # whatever its size: binding the values client-side (the one-message batch) costs
        # ~1 us a value, less than the round trip of the reads it saves (measured)
        self._in_report(None, backend, now, add,
                        cached=lambda: self._signed_from_cache(backend, records) is not None)
        return outcome

    def _signed_from_cache(self, backend: str, records: list[tuple[UsageRecord, str]],
                           ) -> tuple[tuple[int, str], tuple, set[tuple[str, int, str]]] | None:
        """_signed_state's answer from what this process wrote last, without a read; None
        when it does not know (another epoch, a seq older than it remembers).

        Safe because every change of a backend's signed state comes with journal rows:
        if another writer (a replica) appended meanwhile, the journal row id this report
        takes is already taken, the INSERT fails on the primary key, and the report is
        written again from fresh reads (_in_report)."""
        if self._head_cache is None or backend not in self._signed_cache:
            return None
        state, seen = self._signed_cache[backend]
        recorded: set[tuple[str, int, str]] = set()
        for rec, _ in records:
            if rec.epoch != state[0]:
                return None
            if rec.seq <= state[1]:
                if rec.seq not in seen:
                    return None
                recorded.add((rec.epoch, rec.seq, seen[rec.seq]))
        return self._head_cache, state, recorded

    def _remember_signed(self, backend: str, state: tuple[str, int, str],
                         rows: list[JournalRow]) -> None:
        old_state, seen = self._signed_cache.get(backend, (("", 0, ""), {}))
        if old_state[0] != state[0]:
            seen = {}
        for row in rows:
            if row.kind == "usage" and row.epoch == state[0]:
                seen[row.seq] = row.signature
        if len(seen) > SIGNED_CACHE_SEQS:  # the newest seqs: retries resend recent ones
            seen = dict(sorted(seen.items())[-SIGNED_CACHE_SEQS // 2:])
        self._signed_cache[backend] = (state, seen)

    def _set_epoch(self, backend: str, epoch: str, last_seq: int, last_digest: str) -> None:
        # a totals report remembers its backend's epoch anew after this; a signed one
        # leaves the totals view stale (one backend sending both: unusual, but exact)
        self._totals_cache.pop(backend, None)
        self._db.execute(
            "INSERT INTO agent_epochs (backend, epoch, last_seq, last_digest) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (backend) DO UPDATE SET epoch = excluded.epoch, "
            "last_seq = excluded.last_seq, last_digest = excluded.last_digest",
            (backend, epoch, last_seq, last_digest))

    def _signed_state(self, backend: str, records: list[tuple[UsageRecord, str]],
                      ) -> tuple[tuple[int, str], tuple | None, set[tuple[str, int, str]]]:
        """What a signed report needs to read, in one statement (every statement costs a
        round of messages on PostgreSQL): the journal's head; the backend's epoch, last
        seq and digest (None: none yet); (epoch, seq, signature) of the journal's rows of
        the backend in the records' range of sequence numbers."""
        seqs = [rec.seq for rec, _ in records] or [0]
        last: tuple[int, str] = (0, GENESIS_HASH)
        state = None
        recorded: set[tuple[str, int, str]] = set()
        for what, number, text, more in self._db.execute(
                "SELECT 'head', id, hash, '' FROM (SELECT id, hash FROM journal "
                "ORDER BY id DESC LIMIT 1) AS last_row "
                "UNION ALL SELECT 'state', last_seq, epoch, last_digest FROM agent_epochs "
                "WHERE backend = ? "
                "UNION ALL SELECT 'seen', seq, epoch, signature FROM journal "
                "WHERE backend = ? AND seq BETWEEN ? AND ? AND kind = 'usage'",
                (backend, backend, min(seqs), max(seqs))).fetchall():
            if what == "head":
                last = (number, text)
            elif what == "state":
                state = (text, number, more)
            else:
                recorded.add((text, number, more))
        return last, state, recorded

    def _epoch_seen(self, backend: str, epoch: str) -> bool:
        return self._db.execute(
            "SELECT 1 FROM journal WHERE backend = ? AND epoch = ? AND kind = 'epoch'",
            (backend, epoch)).fetchone() is not None

    def _switch_epoch(self, now: float, agent: str, backend: str, epoch: str,
                      events: list[str] | None, state: tuple | None,
                      has_totals: bool) -> JournalRow | None:
        """Make `epoch` the backend's (unsigned totals; `state`: its agent_epochs row);
        the `epoch` journal row when it changed, flagged "reset" when that ended another
        epoch (the totals restart from zero)."""
        if state is not None and state[0] == epoch:
            return None
        reset = state is not None or has_totals
        if reset and self._epoch_seen(backend, epoch):
            raise UsageRefused("replay", f"epoch {epoch} of {backend} has ended")
        self._signed_cache.pop(backend, None)  # its signed view (if any) is stale now
        self._set_epoch(backend, epoch, 0, "")
        if reset and events is not None:
            events.append(f"new epoch {epoch}: cumulative totals restart from zero "
                          f"(previous epoch {state[0] if state else 'none'})")
        return JournalRow(_ms(now), "epoch", agent, backend, 0, "", 0, 0, 0, epoch=epoch,
                          flags="reset" if reset else "")

    def _head_query(self) -> Cursor:
        return self._db.execute("SELECT id, hash FROM journal ORDER BY id DESC LIMIT 1")

    def _journal(self, rows: list[JournalRow], last: tuple[int, str]) -> None:
        """Append rows to the chain after `last` (the head read inside the caller's
        transaction, under its write lock)."""
        if rows:
            chained = chain(last[0] + 1, last[1], rows)
            self._insert_rows(JOURNAL_INSERT, chained)
            self._head_cache = (last[0] + len(chained), chained[-1][-1])
        else:
            self._head_cache = last

    def _in_report(self, report_id: str | None, backend: str, now: float,
                   add: Callable[[int, bool], None],
                   cached: Callable[[], bool] | None = None) -> bool:
        """Run `add(minute, cached)` in one committed transaction, once per report id.

        cached(): True when `add` can use what this process wrote last instead of reading;
        when that was stale (another writer appended: a duplicate key) it runs again
        with reads.
        """
        minute = _ms(now) // 60_000 * 60  # the journal rows' minute, to the millisecond

        def work(cached: bool) -> bool:
            if report_id is not None and cached:
                # no read: a duplicate id fails on the key, and the report is written
                # again from reads, which then finds the id (False)
                self._db.execute("INSERT INTO reports (report_id, backend, received) "
                                 "VALUES (?, ?, ?)", (report_id, backend, now))
            elif report_id is not None:
                # RETURNING, not rowcount: a pipelined statement has no count yet
                fresh = self._db.execute(
                    "INSERT INTO reports (report_id, backend, received) VALUES (?, ?, ?) "
                    "ON CONFLICT (report_id) DO NOTHING RETURNING 1",
                    (report_id, backend, now)).fetchall()
                if not fresh:
                    return False
            add(minute, cached)
            if now - self._last_prune > 3600:
                self._db.execute("DELETE FROM reports WHERE received < ?",
                                 (now - REPORT_ID_RETENTION_S,))
                self._last_prune = now
            return True

        return self._submit(_Pending(work, cached))

    def _submit(self, report: _Pending) -> Any:
        """Write `report` and return once its commit is durable (or raise its error).

        Group commit without a thread or a timer: a caller that finds nobody writing
        becomes the writer and writes every report queued so far in one transaction;
        the callers that queued meanwhile wait (on a condition, not on the connection)
        and return as soon as the commit that holds theirs is over. A caller alone
        writes its report alone, as before."""
        with self._queue_ready:
            self._queue.append(report)
        while True:
            with self._queue_ready:
                while self._writing and not report.done:
                    self._queue_ready.wait()
                if report.done:
                    break
                self._writing = True  # this caller writes the next group
                group = self._queue[:MAX_GROUP]  # the reports ahead of it first
                del self._queue[:MAX_GROUP]
            try:
                with self._lock:
                    self._write_group(group)
            finally:
                with self._queue_ready:
                    self._writing = False
                    self._queue_ready.notify_all()
        if report.error is not None:
            raise report.error
        return report.result

    def _write_group(self, group: list[_Pending]) -> None:
        """Commit `group` once; if that fails, each report on its own. Every report is
        done at the end, with its result or its error, never acknowledged uncommitted."""
        try:
            if len(group) > 1:
                try:
                    self._write_together(group)
                except Exception as exc:  # noqa: BLE001 (each report alone says what it is)
                    self.group_failures += 1
                    log.debug("ledger: a group of %d reports failed (%s); writing each "
                              "alone", len(group), exc)
                else:
                    self.group_commits += 1
                    self.grouped_reports += len(group)
                    for report in group:
                        report.done = True
                    return
            for report in group:
                report.result, report.error = None, None
                try:
                    report.result = self._write_alone(report)
                except Exception as exc:  # noqa: BLE001 (re-raised in its caller)
                    report.error = exc
                report.done = True
        finally:
            for report in group:  # an interrupt in the writing thread: not written
                if not report.done:
                    report.result = None
                    report.error = RuntimeError("ledger write interrupted")
                    report.done = True

    def _write_alone(self, report: _Pending) -> Any:
        if report.cached is not None and report.cached():
            try:
                return self._write(report.work, True)
            except self._db.unique_violation:
                self.cache_misses += 1  # another writer appended: read, write again
        return self._write(report.work, False)

    def _write_together(self, group: list[_Pending]) -> None:
        """Every report of `group` in one committed transaction, each in a savepoint: a
        report refused (UsageRefused) undoes its own statements and the others commit."""
        cacheable = [r.cached is not None and r.cached() for r in group]
        attempts = 0

        def work(batch: bool) -> None:
            nonlocal attempts
            attempts += 1  # a second attempt (the connection dropped) reads everything
            for report, use_cache in zip(group, cacheable, strict=True):
                report.result, report.error = None, None
                mark = self._db.savepoint()
                try:
                    report.result = report.work(use_cache and attempts == 1)
                except UsageRefused as exc:  # decided here, before any statement failed
                    self._db.rollback_to(mark)
                    report.error = exc
                    continue
                self._db.release(mark)

        # all of them answered by the caches: no reads, the one-message batch
        self._write(work, all(cacheable))

    def _write(self, work: Callable[[bool], Any], cached: bool) -> Any:
        """`work` in one committed write transaction; a dropped database connection
        (PostgreSQL restarted, network) is re-opened and the transaction run once more.
        Safe to repeat: a report whose COMMIT was lost in the drop is recognised by its
        report id, its records' signatures or its cumulative totals."""
        try:
            return self._write_once(work, cached)
        except self._db.connection_lost as exc:
            log.warning("ledger: connection to %s lost (%s); re-opening and retrying once",
                        self._db.target, exc)
            self._db.reconnect()
            self.reconnects += 1
            return self._write_once(work, False)

    def _write_once(self, work: Callable[[bool], Any], cached: bool) -> Any:
        # what the cache answers needs no reads: the writes go out in one batch
        self._db.begin_write(batch=cached)
        try:
            result = work(cached)
            if result is False:
                self._db.rollback()
            else:
                self._db.commit()
            return result
        except BaseException:
            self._head_cache = None  # whatever was written did not happen
            self._signed_cache.clear()
            self._totals_cache.clear()
            self._db.rollback()
            raise

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Rows of a read; a dropped connection is re-opened and the read sent again."""
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except self._db.connection_lost:
                self._db.reconnect()
                self.reconnects += 1
                return self._db.execute(sql, args).fetchall()

    def _add_usage(self, minute: int, usage: list[Usage]) -> None:
        """Add to the per-minute rows (one round trip: executemany is pipelined)."""
        if not usage:
            return
        for u in usage:  # a number no 64-bit column holds: refused the same on each engine
            if not all(-INT64 <= v < INT64 for v in (u.tenant_id, u.prompt_tokens,
                                                     u.completion_tokens, u.requests)):
                raise OverflowError(f"usage of tenant {u.tenant_id} model {u.model!r} does "
                                    "not fit 64-bit integers")
        # one row per key: PostgreSQL refuses an upsert that touches a row twice
        summed: dict[tuple[int, str], list[int]] = {}
        for u in usage:
            acc = summed.setdefault((u.tenant_id, u.model), [0, 0, 0])
            acc[0] += u.prompt_tokens
            acc[1] += u.completion_tokens
            acc[2] += u.requests
        self._insert_rows(
            "INSERT INTO usage (minute, tenant_id, model, prompt_tokens, "
            "completion_tokens, requests)",
            [(minute, t, m, *acc) for (t, m), acc in summed.items()],
            " ON CONFLICT (minute, tenant_id, model) DO UPDATE SET "
            "prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens, "
            "completion_tokens = usage.completion_tokens + excluded.completion_tokens, "
            "requests = usage.requests + excluded.requests")

    def _insert_rows(self, insert: str, rows: list[tuple], tail: str = "") -> None:
        """`insert` VALUES (...), (...) `tail`: one statement for many rows, not one each
        (on PostgreSQL every statement costs a message and a parse/bind)."""
        for start in range(0, len(rows), MAX_ROWS_PER_INSERT):  # none without rows
            chunk = rows[start:start + MAX_ROWS_PER_INSERT]
            one = f"({', '.join('?' * len(chunk[0]))})"
            self._db.execute(f"{insert} VALUES {', '.join([one] * len(chunk))}{tail}",
                             [v for row in chunk for v in row])

    def record_counters(self, switch: str, counters: dict[int, tuple[int, int, int]],
                        now: float | None = None) -> None:
        """Store one read of a switch's per-tenant counters: tenant_id -> (bytes, packets,
        connections)."""
        now = time.time() if now is None else now
        rows = [(now, switch, t, b, p, c) for t, (b, p, c) in sorted(counters.items())]
        with self._lock:
            self._write(lambda _: self._db.executemany(
                "INSERT INTO switch_counters (ts, switch, tenant_id, bytes, packets, conns) "
                "VALUES (?, ?, ?, ?, ?, ?)", rows), False)

    def record_port_bytes(self, switch: str, ports: dict[int, int],
                          now: float | None = None) -> None:
        """Store one read of a switch's per-port received bytes: port -> bytes."""
        now = time.time() if now is None else now
        rows = [(now, switch, port, b) for port, b in sorted(ports.items())]
        with self._lock:
            self._write(lambda _: self._db.executemany(
                "INSERT INTO port_counters (ts, switch, port, rx_bytes) VALUES (?, ?, ?, ?)",
                rows), False)

    def port_growth(self, since: float, until: float, baseline_s: float = 120.0,
                    ) -> dict[tuple[str, int], tuple[int, int]]:
        """(switch, port) -> (bytes received, samples) from the last sample before `since`
        (at most `baseline_s` earlier) to the last one before `until`; samples counts
        those after the baseline, 0 without a baseline (bytes before the first sample
        are unknown). A counter lower than the one before (a switch restart) counts from
        zero."""
        rows = self._read(
            "SELECT switch, port, rx_bytes, ts FROM port_counters WHERE ts >= ? AND "
            "ts < ? ORDER BY switch, port, ts", (since - baseline_s, until))
        growth: dict[tuple[str, int], list[int]] = {}
        last: dict[tuple[str, int], int] = {}
        for switch, port, value, ts in rows:
            key = (switch, port)
            acc = growth.setdefault(key, [0, 0])
            prev = last.get(key)
            last[key] = value
            if ts < since or prev is None:
                continue  # the baseline: the last sample before the window
            acc[1] += 1
            acc[0] += value - prev if value >= prev else value
        baselined = {(sw, p) for sw, p, _, ts in rows if ts < since}
        return {k: (a[0], a[1]) if k in baselined else (0, 0) for k, a in growth.items()}

    def billed_by_backend(self, since: float | None = None, until: float | None = None,
                          ) -> dict[str, tuple[int, int]]:
        """backend -> (prompt, completion) tokens of the journal rows received in range."""
        clauses, args = ["kind = 'usage'"], []
        if since is not None:
            clauses.append("received_ms >= ?")
            args.append(_ms(since))
        if until is not None:
            clauses.append("received_ms < ?")
            args.append(_ms(until))
        rows = self._read(
            "SELECT backend, CAST(SUM(prompt_tokens) AS BIGINT), "
            "CAST(SUM(completion_tokens) AS BIGINT) FROM journal "
            f"WHERE {' AND '.join(clauses)} GROUP BY backend", args)
        return {b: (p, c) for b, p, c in rows}

    def remember_backend_id(self, name: str, backend_id: int) -> None:
        """Keep the id an agent's backend got, so that it gets it again after a restart."""
        def work(_: bool) -> None:
            self._db.execute("DELETE FROM backend_ids WHERE backend_id = ? AND name != ?",
                             (backend_id, name))
            self._db.execute("INSERT INTO backend_ids (name, backend_id) VALUES (?, ?) "
                             "ON CONFLICT (name) DO UPDATE SET "
                             "backend_id = excluded.backend_id", (name, backend_id))

        with self._lock:
            self._write(work, False)

    def allocate_backend_id(self, name: str, taken: Collection[int],
                            max_id: int) -> int | None:
        """The id of backend `name`, chosen and kept in one write transaction, so that
        replicas on one database agree (ledger_store.allocate_backend_id)."""
        with self._lock:
            return self._write(  # type: ignore[no-any-return]
                lambda _: allocate_backend_id(self._db, name, taken, max_id), False)

    def keep_operator_state(self, kind: str, target: str, value: str,
                            detail: str = "") -> None:
        """Note an operator's change (replicas: the next leader applies it)."""
        def work(_: bool) -> None:
            self._db.execute(
                "INSERT INTO operator_state (kind, target, value, detail, changed) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, target) DO UPDATE SET "
                "value = excluded.value, detail = excluded.detail, "
                "changed = excluded.changed", (kind, target, value, detail, time.time()))

        with self._lock:
            self._write(work, False)

    def operator_state(self) -> list[tuple[str, str, str, str]]:
        """(kind, target, value, detail) of every operator change noted, oldest first."""
        return [(str(k), str(t), str(v), str(d)) for k, t, v, d in self._read(
            "SELECT kind, target, value, detail FROM operator_state ORDER BY changed")]

    def backend_ids(self) -> dict[str, int]:
        return dict(self._read("SELECT name, backend_id FROM backend_ids"))

    # ------------------------------------------------------------ reads

    def has_report(self, report_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM reports WHERE report_id = ?", (report_id,)))

    def query(self, tenant_id: int | None = None, model: str | None = None,
              since: float | None = None, until: float | None = None,
              limit: int | None = None) -> list[UsageRow]:
        """Rows per minute, tenant and model; `since` inclusive, `until` exclusive (unix s)."""
        where, args = _filters(tenant_id, model, since, until)
        sql = ("SELECT minute, tenant_id, model, prompt_tokens, completion_tokens, requests "
               f"FROM usage {where} ORDER BY minute, tenant_id, model")
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._read(sql, args)
        return [UsageRow(*r) for r in rows]

    def usage_by_model(self, tenant_id: int, since: float | None = None,
                       until: float | None = None) -> dict[str, tuple[int, int, int]]:
        """model -> (prompt, completion, requests) of a tenant, from the journal."""
        with self._lock:
            return statement.usage_by_model(self._db, tenant_id, since, until)

    def head(self) -> tuple[int, str]:
        """The journal's last row id and hash (publish it: it anchors the chain)."""
        rows = self._read("SELECT id, hash FROM journal ORDER BY id DESC LIMIT 1")
        return (rows[0][0], rows[0][1]) if rows else (0, GENESIS_HASH)

    def totals(self, since: float | None = None,
               until: float | None = None) -> dict[int, tuple[int, int, int]]:
        """tenant_id -> (prompt, completion, requests) over the range."""
        where, args = _filters(None, None, since, until)
        rows = self._read(
            "SELECT tenant_id, CAST(SUM(prompt_tokens) AS BIGINT), "
            "CAST(SUM(completion_tokens) AS BIGINT), CAST(SUM(requests) AS BIGINT) "
            f"FROM usage {where} GROUP BY tenant_id", args)
        return {t: (p, c, r) for t, p, c, r in rows}

    def cross_check(self, since: float | None = None,
                    until: float | None = None) -> list[CrossCheckView]:
        """Per tenant: ledger tokens beside the growth of the switches' counters."""
        totals = self.totals(since, until)
        growth = self.counter_growth(since, until)
        out = []
        for tenant in sorted(set(totals) | set(growth)):
            p, c, r = totals.get(tenant, (0, 0, 0))
            b, pk, cn, n = growth.get(tenant, (0, 0, 0, 0))
            out.append(CrossCheckView(
                tenant_id=tenant, prompt_tokens=p, completion_tokens=c, requests=r,
                switch_bytes=b, switch_packets=pk, switch_connections=cn, counter_samples=n))
        return out

    def counter_growth(self, since: float | None = None, until: float | None = None,
                       ) -> dict[int, tuple[int, int, int, int]]:
        """tenant_id -> (bytes, packets, connections, samples): growth summed over switches.

        Counters are cumulative; a value lower than the one before means the switch
        restarted, and the new value counts as growth from zero.
        """
        where, args = _filters(None, None, since, until, time_column="ts")
        rows = self._read(
            "SELECT switch, tenant_id, bytes, packets, conns FROM switch_counters "
            f"{where} ORDER BY switch, tenant_id, ts", args)
        growth: dict[int, list[int]] = {}
        last: dict[tuple[str, int], tuple[int, ...]] = {}
        for switch, tenant, *values in rows:
            acc = growth.setdefault(tenant, [0, 0, 0, 0])
            acc[3] += 1
            prev = last.get((switch, tenant))
            if prev is not None:
                for i, (now_v, prev_v) in enumerate(zip(values, prev, strict=True)):
                    acc[i] += now_v - prev_v if now_v >= prev_v else now_v
            last[(switch, tenant)] = tuple(values)
        return {t: (a[0], a[1], a[2], a[3]) for t, a in growth.items()}

    def export_csv(self, rows: list[UsageRow]) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["minute", "minute_utc", "tenant_id", "model", "prompt_tokens",
                         "completion_tokens", "total_tokens", "requests"])
        for r in rows:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.minute))
            writer.writerow(safe_row([r.minute, stamp, r.tenant_id, r.model, r.prompt_tokens,
                                      r.completion_tokens, r.total_tokens, r.requests]))
        return buf.getvalue()


def _head(query: Cursor) -> tuple[int, str]:
    """The journal's last (id, hash), (0, GENESIS) when empty."""
    row = query.fetchone()
    return (row[0], row[1]) if row else (0, GENESIS_HASH)


def _ms(now: float) -> int:
    return int(round(now * 1000))


def _fmt(values: Iterable[int]) -> str:
    return "/".join(str(v) for v in values)


def _row(now: float, agent: str, backend: str, u: Usage) -> JournalRow:
    return JournalRow(_ms(now), "usage", agent, backend, u.tenant_id, u.model, u.prompt_tokens,
                      u.completion_tokens, u.requests)


def _check_bound(usage: list[Usage], max_tokens: int | None) -> None:
    if max_tokens is None:
        return
    total = sum(u.prompt_tokens + u.completion_tokens for u in usage)
    if total > max_tokens:
        raise UsageRefused("too_large", f"the report bills {total} tokens; at most "
                           f"{max_tokens} fit in the time since the backend's last report")


def _filters(tenant_id: int | None, model: str | None, since: float | None,
             until: float | None, time_column: str = "minute") -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if tenant_id is not None:
        clauses.append("tenant_id = ?")
        args.append(tenant_id)
    if model is not None:
        clauses.append("model = ?")
        args.append(model)
    if since is not None:
        # a minute row counts when its minute starts inside the range
        clauses.append(f"{time_column} >= ?")
        args.append(since)
    if until is not None:
        clauses.append(f"{time_column} < ?")
        args.append(until)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), args
