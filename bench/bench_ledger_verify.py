"""Benchmark: `ledger verify` over a 1,000,000-row journal, against merely reading the rows.

What it does, in one run:
- builds a journal of --rows rows (default 1,000,000) in a temporary SQLite file,
  the way the controller writes it (controller/ledger_chain.chain): --agents agents,
  each with its own Ed25519 key and epoch, their signed usage records interleaved,
  every record linked to its agent's previous one;
- baseline: reading every row (the same SELECT, nothing computed);
- verify (controller/ledger_chain.verify_file, what `tokenfabric ledger verify
  --tokens` runs): the hash chain of every row, every signed row's link to its
  agent's previous record, the signatures that end each agent's unbroken run, and
  the per-minute table against the journal's sums.
  Only those are checked by signature in this mode, so the build signs only them
  and the first --signed rows really (signing a million rows would take minutes);
  the rest carry a well-formed signature that this mode does not look at;
- then one edited, one deleted and one swapped row, each at a random position:
  verify must name it (and takes about as long: the walk goes on for the signatures);
- --all-signatures on the first --signed rows (each signature checked): the
  per-row cost of checking every signature, which the 1M-row figure does not include.

Run: python bench/bench_ledger_verify.py [--rows 1000000] [--agents 20] [--signed 5000]
"""

from __future__ import annotations

import argparse
import base64
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tokenfabric import usage_signing
from tokenfabric.controller.ledger_chain import (
    GENESIS,
    INSERT_ROW,
    JOURNAL_SCHEMA,
    SELECT_ROWS,
    JournalRow,
    chain,
    verify_file,
)
from tokenfabric.controller.ledger_store import SCHEMA_V1 as SCHEMA
from tokenfabric.usage_signing import UsageRecord

T0_MS = 1_780_000_000_000
BATCH = 20_000


def build(path: str, rows: int, agents: int, signed: int, seed: int) -> dict[str, list[bytes]]:
    """The journal file; returns agent name -> public keys (as the tokens file gives them)."""
    rng = random.Random(seed)
    keys = [Ed25519PrivateKey.generate() for _ in range(agents)]
    epochs = [f"{seed:04x}{a:04x}" for a in range(agents)]
    seqs = [0] * agents
    prevs = [""] * agents
    last_of = {rows - 1 - i: (rows - 1 - i) % agents for i in range(agents)}
    filler = base64.b64encode(bytes(64)).decode()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.executescript(JOURNAL_SCHEMA)
    prev_hash, next_id = GENESIS, 1
    batch: list[JournalRow] = []
    for i in range(rows):
        a = i % agents
        seqs[a] += 1
        rec = UsageRecord(f"gpu{a:02d}", epochs[a], seqs[a], T0_MS + i * 10,
                          1 + rng.randrange(50), "llama-3-8b", rng.randrange(4000),
                          rng.randrange(1000), 1 + rng.randrange(4), prevs[a])
        real = i < signed or i in last_of
        signature = usage_signing.sign(keys[a], rec) if real else filler
        prevs[a] = rec.digest()
        batch.append(JournalRow(T0_MS + i * 10 + 5, "usage", f"agent{a:02d}", rec.backend,
                                rec.tenant_id, rec.model, rec.prompt_tokens,
                                rec.completion_tokens, rec.requests, rec.epoch, rec.seq,
                                rec.time_ms, rec.prev, signature))
        if len(batch) == BATCH or i == rows - 1:
            params = chain(next_id, prev_hash, batch)
            db.execute("BEGIN")
            db.executemany(INSERT_ROW, params)
            db.execute("COMMIT")
            next_id += len(params)
            prev_hash = params[-1][-1]
            batch = []
    # the per-minute table the controller keeps beside the journal (verify compares them)
    db.executescript(SCHEMA)
    db.execute("BEGIN")
    db.execute("INSERT INTO usage (minute, tenant_id, model, prompt_tokens, completion_tokens, "
               "requests) SELECT received_ms / 60000 * 60, tenant_id, model, "
               "SUM(prompt_tokens), SUM(completion_tokens), SUM(requests) FROM journal "
               "GROUP BY received_ms / 60000 * 60, tenant_id, model")
    db.execute("COMMIT")
    db.close()
    return {f"agent{a:02d}": [base64.b64decode(usage_signing.public_key_b64(k))]
            for a, k in enumerate(keys)}


def read_all(path: str) -> tuple[int, float]:
    started = time.perf_counter()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    n = 0
    for _ in db.execute(SELECT_ROWS):
        n += 1
    db.close()
    return n, time.perf_counter() - started


def timed_verify(path: str, keys: dict, all_signatures: bool = False) -> tuple:
    started = time.perf_counter()
    report = verify_file(path, keys, all_signatures)
    return report, time.perf_counter() - started


def every_ok(path: str, keys: dict) -> bool:
    """After the tamper checks undid their edits, the file verifies again."""
    return verify_file(path, keys).ok


def tamper_checks(path: str, keys: dict, rows: int, rng: random.Random) -> list[str]:
    """Edit, delete, swap one row each (undone after); verify must name it."""
    db = sqlite3.connect(path, isolation_level=None)
    failures = []

    def check(what: str, row_id: int) -> None:
        report, seconds = timed_verify(path, keys)
        problem = report.chain_problem
        named = problem is not None and (problem.row_id == row_id
                                         or f"rows {row_id}..{row_id}" in problem.message)
        print(f"  {what} row {row_id}: {'named' if named else 'MISSED'} in {seconds:.1f} s "
              f"-> {problem.message if problem else 'no problem found'}")
        if not named:
            failures.append(what)

    edit = rng.randrange(2, rows - 1)
    db.execute("UPDATE journal SET completion_tokens = completion_tokens * 3 WHERE id = ?",
               (edit,))
    check("edited", edit)
    db.execute("UPDATE journal SET completion_tokens = completion_tokens / 3 WHERE id = ?",
               (edit,))
    gone = rng.randrange(2, rows - 1)
    saved = db.execute("SELECT * FROM journal WHERE id = ?", (gone,)).fetchone()
    db.execute("DELETE FROM journal WHERE id = ?", (gone,))
    check("deleted", gone)
    db.execute(f"INSERT INTO journal VALUES ({', '.join('?' * len(saved))})", saved)
    swap = rng.randrange(2, rows - 2)
    db.execute("BEGIN")
    db.execute("UPDATE journal SET id = -1 WHERE id = ?", (swap,))
    db.execute("UPDATE journal SET id = ? WHERE id = ?", (swap, swap + 1))
    db.execute("UPDATE journal SET id = ? WHERE id = -1", (swap + 1,))
    db.execute("COMMIT")
    check("swapped", swap)
    db.execute("BEGIN")
    db.execute("UPDATE journal SET id = -1 WHERE id = ?", (swap,))
    db.execute("UPDATE journal SET id = ? WHERE id = ?", (swap, swap + 1))
    db.execute("UPDATE journal SET id = ? WHERE id = -1", (swap + 1,))
    db.execute("COMMIT")
    db.close()
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--signed", type=int, default=5_000,
                        help="rows at the start with real signatures (the --all-signatures "
                             "measurement runs over these)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--target-s", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        path = str(Path(tmp) / "ledger.db")
        started = time.perf_counter()
        keys = build(path, args.rows, args.agents, args.signed, args.seed)
        print(f"built {args.rows} rows ({args.agents} agents) in "
              f"{time.perf_counter() - started:.1f} s")
        n, read_s = read_all(path)
        report, verify_s = timed_verify(path, keys)
        assert report.ok and report.rows == n == args.rows, vars(report)
        print(f"baseline, reading the rows: {read_s:.2f} s ({n / read_s:,.0f} rows/s)")
        print(f"verify (chain + links + {report.signatures_checked} run-end signatures): "
              f"{verify_s:.2f} s ({n / verify_s:,.0f} rows/s); ratio verify/read "
              f"{verify_s / read_s:.1f}; target <= {args.target_s:.0f} s: "
              f"{'met' if verify_s <= args.target_s else 'NOT met'}")
        chain_only, chain_s = timed_verify(path, None)
        print(f"verify, hash chain only (no tokens file): {chain_s:.2f} s "
              f"({n / chain_s:,.0f} rows/s)")
        failures = tamper_checks(path, keys, args.rows, random.Random(args.seed))
        assert every_ok(path, keys)
        small = str(Path(tmp) / "small.db")
        db = sqlite3.connect(small)
        db.executescript(JOURNAL_SCHEMA)
        db.execute(f"ATTACH DATABASE '{path}' AS big")
        db.execute("INSERT INTO journal SELECT * FROM big.journal WHERE id <= ?",
                   (args.signed,))
        db.commit()
        db.close()
        every, every_s = timed_verify(small, keys, all_signatures=True)
        assert every.ok and every.signatures_checked == args.signed, vars(every)
        per_sig = every_s / args.signed
        print(f"--all-signatures over {args.signed} rows: {every_s:.2f} s "
              f"({per_sig * 1e6:.0f} us/row): {args.rows} rows would take "
              f"~{per_sig * args.rows:.0f} s")
    return 1 if failures or verify_s > args.target_s else 0


if __name__ == "__main__":
    sys.exit(main())
