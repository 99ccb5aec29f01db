"""The ledger's storage: one interface, two engines (SQLite, PostgreSQL).

The Ledger (controller/ledger.py) writes its SQL once, in the subset both engines
speak: `?` placeholders, `INSERT ... ON CONFLICT`, `CAST(SUM(x) AS BIGINT)`. An
engine supplies what differs: connecting, the placeholder style, column types in the
schema, how a write transaction serialises (SQLite: BEGIN IMMEDIATE takes the file's
write lock; PostgreSQL: a transaction-scoped advisory lock, so that appending to the
journal, which reads the last id and hash and writes the next, is one writer at a
time across every process sharing the database), and the migrations table.

`open_store(target)`: a path (or ":memory:") is a SQLite file, a `postgresql://` or
`postgres://` URL a PostgreSQL database (psycopg 3, the controller extra).

Migrations are versioned: `schema_version` holds the versions applied; migration 1 is
the schema as it was before engines existed, so an existing SQLite file (whose tables
already exist: CREATE ... IF NOT EXISTS) is adopted as version 1 unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from tokenfabric.controller.ledger_chain import JOURNAL_SCHEMA, USAGE_COLUMNS

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# pg_advisory_xact_lock key of every ledger write: "tokenfab" as bytes, an arbitrary
# constant other applications sharing the database are unlikely to use
WRITE_LOCK_KEY = 0x746F6B656E666162
TRANSLATED_CACHE = 1000  # distinct SQL texts whose $n form is kept

SCHEMA_V1 = f"""
CREATE TABLE IF NOT EXISTS reports (
    report_id TEXT PRIMARY KEY,
    backend   TEXT NOT NULL,
    received  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    minute            INTEGER NOT NULL,  -- unix seconds, a multiple of 60
{USAGE_COLUMNS}
    PRIMARY KEY (minute, tenant_id, model)
);
CREATE TABLE IF NOT EXISTS switch_counters (
    ts        REAL NOT NULL,
    switch    TEXT NOT NULL,
    tenant_id INTEGER NOT NULL,
    bytes     INTEGER NOT NULL,
    packets   INTEGER NOT NULL,
    conns     INTEGER NOT NULL  -- connections admitted
);
CREATE INDEX IF NOT EXISTS switch_counters_ts ON switch_counters (ts);
CREATE TABLE IF NOT EXISTS usage_totals (  -- the last cumulative totals an agent reported
    backend           TEXT NOT NULL,
{USAGE_COLUMNS}
    PRIMARY KEY (backend, tenant_id, model)
);
CREATE TABLE IF NOT EXISTS backend_ids (  -- agents' backends keep their id across restarts
    name       TEXT PRIMARY KEY,
    backend_id INTEGER NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS reports_received ON reports (received);
CREATE TABLE IF NOT EXISTS port_counters (  -- bytes a switch received on a backend's port
    ts       REAL NOT NULL,
    switch   TEXT NOT NULL,
    port     INTEGER NOT NULL,
    rx_bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS port_counters_ts ON port_counters (ts);
""" + JOURNAL_SCHEMA

# Migration 2 (issue 18, replicas): agents report to every controller replica, each of
# which may write a signed record; the schema itself says a record is one row, whichever
# replica wrote it (the advisory lock already serialises writers: this is the guarantee
# that does not depend on the code path), and a replica's leadership term (its P4Runtime
# election ids rise with it, controller/replica.py) lives beside the ledger.
SCHEMA_V2 = """
CREATE UNIQUE INDEX IF NOT EXISTS journal_record_once ON journal (backend, epoch, seq)
    WHERE kind = 'usage' AND seq > 0;
CREATE TABLE IF NOT EXISTS replica_leader (  -- one row: the replica that leads, and its term
    one       INTEGER PRIMARY KEY CHECK (one = 1),
    term      INTEGER NOT NULL,
    url       TEXT NOT NULL,
    election  INTEGER NOT NULL,
    since     REAL NOT NULL
);
"""

# Migration 3 (issue 18, replicas): what an operator changed over REST at the leader
# (a drain, a service's mode, a policy applied), so that a replica taking over applies
# it before its first push instead of starting from the files (docs/replicas.md).
SCHEMA_V3 = """
CREATE TABLE IF NOT EXISTS operator_state (  -- one row per thing changed, the latest value
    kind    TEXT NOT NULL,  -- 'drain' | 'mode' | 'policy'
    target  TEXT NOT NULL,  -- the backend, the service, '' for the policy
    value   TEXT NOT NULL,  -- '1' drained / '0' not, the mode, the policy's YAML text
    detail  TEXT NOT NULL,  -- the policy's file name; who changed it
    changed REAL NOT NULL,
    PRIMARY KEY (kind, target)
);
"""

# version -> DDL in SQLite's types; PostgreSQL's are derived by `_postgres_types`
MIGRATIONS: dict[int, str] = {1: SCHEMA_V1, 2: SCHEMA_V2, 3: SCHEMA_V3}

VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied REAL NOT NULL
)
"""


class StoreError(Exception):
    """The ledger's database cannot be opened (server unreachable, no psycopg, ...)."""


class ConnectionLost(StoreError):
    """The database connection dropped and could not be re-opened."""


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Any: ...


class Store(Protocol):
    """What the ledger needs of a database; not thread-safe (the Ledger holds a lock)."""

    engine: str  # "sqlite" | "postgresql"
    target: str  # the path or the URL (without its password)
    # what the driver raises for a duplicate key, and for a connection that dropped
    unique_violation: tuple[type[BaseException], ...]
    connection_lost: tuple[type[BaseException], ...]

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...
    def begin_write(self, batch: bool = False) -> None: ...
    def savepoint(self) -> int: ...
    def release(self, mark: int) -> None: ...
    def rollback_to(self, mark: int) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def has_table(self, name: str) -> bool: ...
    def schema_version(self) -> int: ...
    def reconnect(self) -> None: ...
    def close(self) -> None: ...


def is_postgres(target: str | Path) -> bool:
    return str(target).startswith(POSTGRES_SCHEMES)


def open_store(target: str | Path, read_only: bool = False) -> Store:
    """The store at `target`, migrated to the newest schema (read_only: as it is, and
    refusing writes; a missing SQLite file is FileNotFoundError)."""
    if is_postgres(target):
        return PostgresStore(str(target), read_only)
    return SqliteStore(str(target), read_only)


def redact(url: str) -> str:
    """The URL without its password (it goes into messages and logs)."""
    return re.sub(r"^(\w+://[^:/@]+):[^@]*@", r"\1:***@", url)


class SqliteStore:
    """One SQLite file in WAL mode with synchronous=FULL: a commit fsyncs the WAL, so an
    acknowledged report survives power loss, not just a killed process."""

    engine = "sqlite"
    unique_violation: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)
    connection_lost: tuple[type[BaseException], ...] = ()  # a file does not drop

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.target = path
        if read_only:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such ledger file")
            self._db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True,
                                       check_same_thread=False, isolation_level=None)
            return
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        # not executescript: it commits first, and a migration is one transaction
        _migrate(self, lambda ddl: [self._db.execute(s) for s in _statements(ddl)])

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        return self._db.execute(sql, args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def begin_write(self, batch: bool = False) -> None:
        # batch (writes only, no reads): nothing to gain in-process
        self._db.execute("BEGIN IMMEDIATE")  # the write lock now, not at the first write

    def savepoint(self) -> int:
        self._db.execute("SAVEPOINT report")
        return 0

    def release(self, mark: int) -> None:
        self._db.execute("RELEASE SAVEPOINT report")

    def rollback_to(self, mark: int) -> None:
        # ROLLBACK TO keeps the savepoint open: released as well, the transaction goes on
        self._db.execute("ROLLBACK TO SAVEPOINT report")
        self._db.execute("RELEASE SAVEPOINT report")

    def commit(self) -> None:
        self._db.execute("COMMIT")

    def rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def has_table(self, name: str) -> bool:
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                "name = ?", (name,)).fetchone() is not None

    def schema_version(self) -> int:
        return _schema_version(self)

    def reconnect(self) -> None:
        pass  # never needed: connection_lost is empty

    def close(self) -> None:
        self._db.close()


class PostgresStore:
    """A PostgreSQL database over psycopg 3, in autocommit mode with explicit
    transactions. Durability is the server's: with synchronous_commit on (the default)
    COMMIT returns after the WAL was flushed, as SQLite's synchronous=FULL."""

    engine = "postgresql"

    def __init__(self, url: str, read_only: bool = False) -> None:
        try:
            import psycopg
        except ImportError as exc:  # the controller extra brings it
            raise StoreError("a postgresql:// ledger needs psycopg 3: pip install "
                             "'tokenfabric[controller]' (or 'psycopg[binary]')") from exc
        self.target = redact(url)
        self._url = url
        self._read_only = read_only
        self._psycopg = psycopg
        self._errors = psycopg.errors
        self.unique_violation: tuple[type[BaseException], ...] = (
            psycopg.errors.UniqueViolation,)
        # OperationalError: the server closed the connection, went away, restarted
        self.connection_lost: tuple[type[BaseException], ...] = (
            psycopg.OperationalError, psycopg.InterfaceError)
        self._sql: dict[str, str] = {}
        self._pipeline: Any = None
        self._batch: list[bytes] | None = None  # a write-only transaction's statements
        self._split: dict[str, list[bytes]] = {}  # SQL text -> its bytes around each ?
        self._db = self._connect()
        self._literal = self._quoter()
        if not read_only:
            _migrate(self, self._run_ddl)

    def _connect(self) -> Any:
        psycopg = self._psycopg
        try:
            # RawCursor: PostgreSQL's own $1 placeholders, sent as they are; psycopg's
            # %s queries are parsed client-side on every call once over 4 kB or 50
            # parameters, which a report's multi-row INSERT is
            db = psycopg.connect(self._url, autocommit=True, connect_timeout=10,
                                 cursor_factory=psycopg.RawCursor)
        except (psycopg.Error, ValueError) as exc:  # ValueError: a malformed URL
            raise StoreError(str(exc)) from exc  # the callers name the (redacted) URL
        if self._read_only:
            db.execute("SET default_transaction_read_only = on")
        return db

    def reconnect(self) -> None:
        """A new connection in place of one that dropped (server restart, network)."""
        self._pipeline = None
        with contextlib.suppress(Exception):
            self._db.close()
        try:
            self._db = self._connect()
            self._literal = self._quoter()
        except StoreError as exc:
            raise ConnectionLost(f"{self.target}: connection lost and not re-opened: "
                                 f"{exc}") from exc

    def _quoter(self) -> Callable[[Any], bytes]:
        """A value as an SQL literal, quoted for this connection (its encoding and
        standard_conforming_strings) by psycopg's adapters."""
        return self._psycopg.adapt.Transformer(self._db).as_literal  # type: ignore[no-any-return]

    def _run_ddl(self, ddl: str) -> None:
        for statement in _statements(_postgres_types(ddl)):
            self._db.execute(statement)

    def _translate(self, sql: str) -> str:
        # the ledger's SQL has no literal ?, so each ? is the next parameter: $1, $2, ...
        out = self._sql.get(sql)
        if out is None:
            numbers = itertools.count(1)
            out = re.sub(r"\?", lambda _: f"${next(numbers)}", sql)
            if len(self._sql) < TRANSLATED_CACHE:
                self._sql[sql] = out
        return out

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        if self._batch is not None:
            self._batch.append(self._bound(sql, args))
            return _NO_ROWS
        with self._errors_mapped():
            return self._db.execute(self._translate(sql), args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        if self._batch is not None:
            self._batch.extend(self._bound(sql, row) for row in rows)
            return
        with self._errors_mapped():
            self._db.cursor().executemany(self._translate(sql), list(rows))

    def _bound(self, sql: str, args: Sequence[Any]) -> bytes:
        """The statement with its values bound client-side, each quoted by psycopg's
        adapters (what sql.Literal does, without composing an SQL object per value)."""
        parts = self._split.get(sql)
        if parts is None:
            parts = sql.encode().split(b"?")  # the ledger's SQL has no literal ?
            if len(self._split) < TRANSLATED_CACHE:
                self._split[sql] = parts
        if len(parts) != len(args) + 1:
            raise ValueError(f"{len(args)} values for {len(parts) - 1} placeholders")
        literal = self._literal
        out = [parts[0]]
        for value, part in zip(args, parts[1:]):  # noqa: B905 (lengths checked above)
            out.append(literal(value))
            out.append(part)
        return b"".join(out)

    @contextlib.contextmanager
    def _errors_mapped(self) -> Iterator[None]:
        try:
            yield
        except self._errors.NumericValueOutOfRange as exc:
            # as SQLite's driver: a number no 64-bit column holds is an OverflowError
            raise OverflowError(str(exc)) from exc

    def begin_write(self, batch: bool = False) -> None:
        if batch:
            # Writes only (the ledger already knows what it needs to know): every
            # statement, BEGIN to COMMIT, goes in one message, one round trip.
            self._batch = [b"BEGIN", f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})".encode()]
            return
        # A write transaction runs in pipeline mode: statements go out without waiting
        # for their results, so a report costs a round trip per read (whose result the
        # ledger needs) plus one for all the writes and the COMMIT, not one per statement.
        pipeline = self._db.pipeline()
        pipeline.__enter__()
        self._pipeline = pipeline
        self._db.execute("BEGIN")
        # one writer at a time across every controller on this database: the journal's
        # next id and hash are read then written inside the transaction
        self._db.execute(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")

    def savepoint(self) -> int:
        """A point inside the write transaction to undo one report's statements back to
        (a group commit's report that was refused); in a batch, its length so far."""
        if self._batch is not None:
            return len(self._batch)
        self._db.execute("SAVEPOINT report")
        return 0

    def release(self, mark: int) -> None:
        if self._batch is None:
            self._db.execute("RELEASE SAVEPOINT report")

    def rollback_to(self, mark: int) -> None:
        if self._batch is not None:
            del self._batch[mark:]  # not sent yet: forgetting them is the rollback
            return
        self._db.execute("ROLLBACK TO SAVEPOINT report")
        self._db.execute("RELEASE SAVEPOINT report")

    def commit(self) -> None:
        batch, self._batch = self._batch, None
        if batch is not None:
            with self._errors_mapped():  # a simple query: several statements, no parameters
                self._db.execute(b";\n".join([*batch, b"COMMIT"]), prepare=False)
            return
        with self._errors_mapped():
            self._db.execute("COMMIT")
            pipeline, self._pipeline = self._pipeline, None
            if pipeline is not None:
                pipeline.__exit__(None, None, None)  # waits for every result: errors here

    def rollback(self) -> None:
        self._batch = None
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            try:
                pipeline.__exit__(None, None, None)
            except self._errors.Error:
                pass  # the statement that failed: already raised, or rolled back below
        if self._db.closed:
            return  # a dropped connection: the server rolled the transaction back
        if self._db.info.transaction_status != 0:  # 0: IDLE, no transaction open
            self._db.execute("ROLLBACK")

    def has_table(self, name: str) -> bool:
        return bool(self._db.execute("SELECT to_regclass($1) IS NOT NULL",
                                     (name,)).fetchone()[0])

    def schema_version(self) -> int:
        return _schema_version(self)

    def close(self) -> None:
        self._db.close()


class _NoRows:
    """The cursor of a statement queued in a write-only batch: it has no rows yet."""

    rowcount = -1

    def fetchone(self) -> Any:
        raise RuntimeError("a batched write transaction cannot read")

    def fetchall(self) -> list[Any]:
        raise RuntimeError("a batched write transaction cannot read")

    def __iter__(self) -> Any:
        raise RuntimeError("a batched write transaction cannot read")


_NO_ROWS = _NoRows()


def _postgres_types(ddl: str) -> str:
    """SQLite's column types as PostgreSQL's: every integer 64-bit (token counts, unix
    ms), REAL double precision."""
    ddl = re.sub(r"\bINTEGER\b", "BIGINT", ddl)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", ddl)


def _statements(ddl: str) -> list[str]:
    """A DDL script's statements, comments dropped (the schema has no ';' or '--' in a
    string literal)."""
    ddl = re.sub(r"--[^\n]*", "", ddl)
    return [s.strip() for s in ddl.split(";") if s.strip()]


def _schema_version(store: Store) -> int:
    if not store.has_table("schema_version"):
        return 0
    row = store.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def _migrate(store: Store, run_ddl: Callable[[str], Any]) -> None:
    """Apply the migrations newer than the store's version, each in its own write
    transaction (two controllers starting together migrate once)."""
    store.begin_write()
    try:
        run_ddl(VERSION_TABLE)
        current = _schema_version(store)
        for version in sorted(v for v in MIGRATIONS if v > current):
            run_ddl(MIGRATIONS[version])
            store.execute("INSERT INTO schema_version (version, applied) VALUES (?, ?)",
                          (version, time.time()))
        store.commit()
    except BaseException:
        store.rollback()
        raise


def allocate_backend_id(store: Store, name: str, taken: Collection[int],
                        max_id: int) -> int | None:
    """The id of the backend `name`: the one it had (table backend_ids), unless a backend
    of this controller's model now holds it (`taken`), else the lowest id in 1..max_id
    that neither `taken` nor another name's row holds; when every id was handed out
    once, the lowest one not `taken` (another name's row loses it). None: no id free.

    Call inside a write transaction (Ledger.allocate_backend_id): on PostgreSQL its
    advisory lock serialises this across replicas, each reading the rows the others
    committed, so two replicas registering two new backends at once pick two ids, and
    every replica gives a backend the same one; the table's unique constraints on name
    and backend_id hold it whatever the code path."""
    row = store.execute("SELECT backend_id FROM backend_ids WHERE name = ?",
                        (name,)).fetchone()
    if row is not None and int(row[0]) not in taken:
        return int(row[0])
    held = {int(r[0]) for r in store.execute(
        "SELECT backend_id FROM backend_ids WHERE name != ?", (name,)).fetchall()}
    free = next((i for i in range(1, max_id + 1) if i not in taken and i not in held), None)
    if free is None:
        free = next((i for i in range(1, max_id + 1) if i not in taken), None)
        if free is None:
            return None
        store.execute("DELETE FROM backend_ids WHERE backend_id = ? AND name != ?",
                      (free, name))
    store.execute("INSERT INTO backend_ids (name, backend_id) VALUES (?, ?) "
                  "ON CONFLICT (name) DO UPDATE SET backend_id = excluded.backend_id",
                  (name, free))
    return free
