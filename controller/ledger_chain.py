"""The ledger's journal: one row per billed usage record, each row chained to the one before.

A row's hash is SHA-256 over the previous row's hash and the row's canonical
encoding (compact JSON of its columns in a fixed order, id included). Editing a
row changes its hash; deleting one leaves a hole in the ids and breaks the link;
swapping two changes what each position hashes to. `verify` walks the rows in id
order and names the first row at which the chain breaks (an edited row is named
itself, unless whoever edited it also recomputed its hash: then the row after it).
The last row's hash is the chain's head: recorded outside the file (read it from
GET /api/v1/ledger/head) and passed to `verify --expect-head`, it also shows rows
cut off at the end.

Signed rows are further checked against the agents' public keys: each agent's
records link to its previous one (tokenfabric/usage_signing.py), so a signature
check at the end of every unbroken run vouches for the whole run; `all_signatures`
checks every row's signature instead.

Plain SQL both storage engines speak (controller/ledger_store.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenfabric import usage_signing

if TYPE_CHECKING:
    from tokenfabric.controller.ledger_store import Store

GENESIS = "0" * 64

# A usage's columns as the journal, the per-minute table and the agents' last totals
# (controller/ledger_store.py) all declare them: one text, so the three cannot drift.
USAGE_COLUMNS = """    tenant_id         INTEGER NOT NULL,
    model             TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    requests          INTEGER NOT NULL,"""

JOURNAL_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS journal (
    id                INTEGER PRIMARY KEY,  -- 1, 2, 3, ... with no holes
    received_ms       INTEGER NOT NULL,     -- when the controller took it (unix ms)
    kind              TEXT NOT NULL,        -- usage | epoch (an agent declared a new epoch)
    agent             TEXT NOT NULL,        -- the token's name that sent it
    backend           TEXT NOT NULL,
{USAGE_COLUMNS}
    epoch             TEXT NOT NULL,        -- the agent's epoch; '' for unsigned usage
    seq               INTEGER NOT NULL,     -- the record's sequence number; 0 unsigned
    record_ms         INTEGER NOT NULL,     -- the agent's time of the record; 0 unsigned
    prev              TEXT NOT NULL,        -- digest of the agent's previous record
    signature         TEXT NOT NULL,        -- base64 Ed25519; '' unsigned
    flags             TEXT NOT NULL,        -- e.g. gap:5-7 (records 5..7 never arrived)
    hash              TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_seq ON journal (backend, epoch, seq);
CREATE INDEX IF NOT EXISTS journal_received ON journal (received_ms);
CREATE TABLE IF NOT EXISTS agent_epochs (  -- per backend: its current epoch and last record
    backend     TEXT PRIMARY KEY,
    epoch       TEXT NOT NULL,
    last_seq    INTEGER NOT NULL,
    last_digest TEXT NOT NULL
);
"""

# The columns in canonical order (hash excluded); the SELECT of `verify` reads these + hash.
COLUMNS = ("id", "received_ms", "kind", "agent", "backend", "tenant_id", "model",
           "prompt_tokens", "completion_tokens", "requests", "epoch", "seq", "record_ms",
           "prev", "signature", "flags")
SELECT_ROWS = f"SELECT {', '.join(COLUMNS)}, hash FROM journal ORDER BY id"
INSERT_ROW = (f"INSERT INTO journal ({', '.join(COLUMNS)}, hash) "
              f"VALUES ({', '.join('?' * (len(COLUMNS) + 1))})")


@dataclass(frozen=True)
class JournalRow:
    received_ms: int
    kind: str
    agent: str
    backend: str
    tenant_id: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    requests: int
    epoch: str = ""
    seq: int = 0
    record_ms: int = 0
    prev: str = ""
    signature: str = ""
    flags: str = ""

    def values(self, row_id: int) -> tuple:
        return (row_id, self.received_ms, self.kind, self.agent, self.backend, self.tenant_id,
                self.model, self.prompt_tokens, self.completion_tokens, self.requests,
                self.epoch, self.seq, self.record_ms, self.prev, self.signature, self.flags)


def row_hash(prev_hash: str, values: Sequence) -> str:
    """SHA-256 of the previous hash and the row's columns (COLUMNS order), hex."""
    encoded = json.dumps(list(values), separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{prev_hash}{encoded}".encode()).hexdigest()


def chain(first_id: int, prev_hash: str, rows: Iterable[JournalRow]) -> list[tuple]:
    """The INSERT parameters of `rows` appended after (first_id - 1, prev_hash)."""
    out = []
    for i, row in enumerate(rows):
        values = row.values(first_id + i)
        prev_hash = row_hash(prev_hash, values)
        out.append((*values, prev_hash))
    return out


@dataclass
class Problem:
    row_id: int
    message: str


@dataclass
class VerifyReport:
    rows: int = 0
    head: str = GENESIS
    chain_problem: Problem | None = None  # the first break of the hash chain
    signature_problems: list[Problem] = field(default_factory=list)
    signatures_checked: int = 0
    signed_rows: int = 0
    unsigned_rows: int = 0
    gaps: list[Problem] = field(default_factory=list)  # accepted, flagged at ingest
    unknown_agents: set[str] = field(default_factory=set)
    # the per-minute table (GET /ledger, ledger.csv) against the journal's sums
    table_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.chain_problem is None and not self.signature_problems
                and not self.table_problems)


MAX_LISTED = 100  # problems listed beyond the first; the counts keep going


def verify_rows(rows: Iterable[Sequence], keys: dict[str, list[bytes]] | None = None,
                all_signatures: bool = False) -> VerifyReport:
    """Walk journal rows (SELECT_ROWS order and columns) and report what does not hold.

    `keys`: agent (token name) -> its public keys; None skips the signature checks."""
    report = VerifyReport()
    prev_hash = head = GENESIS
    expected_id = 1
    # (backend, epoch) -> [last seq, last digest, open row (its signature vouches for the
    # run so far), the agent's keys]
    runs: dict[tuple[str, str], list] = {}
    dumps = json.dumps
    sha256 = hashlib.sha256
    canonical = usage_signing.canonical_bytes
    for row in rows:
        row_id, stored = row[0], row[16]
        if report.chain_problem is None:
            if row_id != expected_id:
                report.chain_problem = Problem(
                    row_id, f"row {row_id}: rows {expected_id}..{row_id - 1} are missing "
                    "(deleted)" if row_id > expected_id else
                    f"row {row_id}: out of order (expected row {expected_id})")
            else:
                encoded = dumps(list(row[:16]), separators=(",", ":"), ensure_ascii=True)
                if sha256(f"{prev_hash}{encoded}".encode()).hexdigest() != stored:
                    report.chain_problem = Problem(
                        row_id, f"row {row_id}: does not match its hash (edited, or swapped "
                        "with another row)")
            prev_hash = stored
            expected_id = row_id + 1
        report.rows += 1
        head = stored
        if row[2] != "usage":
            continue
        if row[15]:
            report.gaps.append(Problem(row_id, f"row {row_id}: {row[15]}"))
        if not row[14]:
            report.unsigned_rows += 1
            continue
        report.signed_rows += 1
        if keys is None:
            continue
        agent_keys = keys.get(row[3])
        if not agent_keys:
            report.unknown_agents.add(row[3])
            continue
        message = canonical(row[4], row[10], row[11], row[12], row[5], row[6], row[7], row[8],
                            row[9], row[13])
        seq = row[11]
        run = runs.get((row[4], row[10]))
        if run is None:
            run = runs[(row[4], row[10])] = [0, "", None, agent_keys]
        elif seq <= run[0]:
            _sig_problem(report, row_id, f"row {row_id}: record {seq} of {row[4]} repeats "
                         f"(the epoch is already at {run[0]})")
        elif seq == run[0] + 1 and row[13] != run[1]:
            _sig_problem(report, row_id, f"row {row_id}: does not link to {row[4]}'s previous "
                         "record (one of them was edited)")
        elif run[2] is not None and seq != run[0] + 1:
            _check(report, run[2], run[3])  # a gap: the run before it ends there
        run[0], run[1] = seq, sha256(message).hexdigest()
        if all_signatures:
            _check(report, (row_id, message, row[14]), agent_keys)
        else:
            run[2] = (row_id, message, row[14])
    if report.rows:
        report.head = head
    for run in runs.values():
        if run[2] is not None and not all_signatures:
            _check(report, run[2], run[3])
    return report


def read_only(target: str) -> Store:
    """The ledger (a SQLite file or a postgresql:// URL) opened for reading only:
    verifying never changes it."""
    from tokenfabric.controller.ledger_store import open_store  # it imports this module's schema

    return open_store(target, read_only=True)


def verify_file(target: str, keys: dict[str, list[bytes]] | None = None,
                all_signatures: bool = False) -> VerifyReport:
    db = read_only(target)
    try:
        report = verify_rows(db.execute(SELECT_ROWS), keys, all_signatures)
        report.table_problems = compare_minutes(db)
        return report
    finally:
        db.close()


def compare_minutes(db: Store) -> list[str]:
    """Where the per-minute `usage` table (what GET /ledger and ledger.csv show) differs
    from the journal's sums: an edit of the table the chain does not cover. Minutes up
    to the journal's first are skipped (a ledger from before the journal has usage
    there that no journal row holds)."""
    has_usage = db.has_table("usage")
    first = db.execute("SELECT MIN(received_ms) FROM journal").fetchone()[0]
    if not has_usage or first is None:
        return []
    start = first // 60_000 * 60 + 60
    journal = {(m, t, model): (p, c, r) for m, t, model, p, c, r in db.execute(
        "SELECT received_ms / 60000 * 60, tenant_id, model, CAST(SUM(prompt_tokens) AS "
        "BIGINT), CAST(SUM(completion_tokens) AS BIGINT), CAST(SUM(requests) AS BIGINT) "
        "FROM journal WHERE kind = 'usage' "
        "AND received_ms >= ? GROUP BY received_ms / 60000 * 60, tenant_id, model",
        (start * 1000,))}
    table = {(m, t, model): (p, c, r) for m, t, model, p, c, r in db.execute(
        "SELECT minute, tenant_id, model, prompt_tokens, completion_tokens, requests "
        "FROM usage WHERE minute >= ?", (start,))}
    zero = (0, 0, 0)
    problems = []
    for key in sorted(set(journal) | set(table), key=str):
        if journal.get(key, zero) != table.get(key, zero):
            minute, tenant, model = key
            problems.append(f"minute {minute} tenant {tenant} model {model!r}: the per-minute "
                            f"table says {table.get(key, zero)} (prompt, completion, "
                            f"requests), the journal {journal.get(key, zero)}")
            if len(problems) >= MAX_LISTED:
                break
    return problems


def _check(report: VerifyReport, open_row: tuple, agent_keys: list[bytes]) -> None:
    row_id, message, signature = open_row
    report.signatures_checked += 1
    if not any(usage_signing.verify(k, message, signature) for k in agent_keys):
        _sig_problem(report, row_id, f"row {row_id}: its signature does not verify (edited, "
                     "or not signed by the agent's key)")


def _sig_problem(report: VerifyReport, row_id: int, message: str) -> None:
    if len(report.signature_problems) < MAX_LISTED:
        report.signature_problems.append(Problem(row_id, message))
