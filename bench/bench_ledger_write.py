"""Benchmark: ledger write throughput on PostgreSQL against SQLite, same workload, same run.

What it does:
- prepares --reports usage reports the way agents send them: --agents backends, each
  with its own Ed25519 key and epoch, every report --records signed records linked to
  the agent's previous one (signed before the clock starts: the controller verifies
  signatures before the ledger sees them), plus every --totals-every-th report an
  unsigned cumulative-totals report (record_totals) from another backend;
- writes them, in the same order, through controller.ledger.Ledger (what the REST
  handler calls; with one caller, one committed transaction per report) into:
  - baseline: SQLite, a file in a temporary directory, the controller's settings
    (WAL, synchronous=FULL: every commit fsyncs);
  - PostgreSQL: a throw-away server (tokenfabric/pg_temp.py: Debian's postgresql,
    initdb in a temporary directory, 127.0.0.1 only) with its default durability
    (fsync on, synchronous_commit on: every commit waits for the WAL flush);
- --rounds times, alternating the engines, each time on a fresh ledger (the machine
  may be busy with other work: a burst hits both, and the medians are compared);
- checks both ledgers hold the same totals and that each journal verifies;
- prints reports/s and journal rows/s for both (medians), and the ratio
  PostgreSQL / SQLite.

Target (issue 18): PostgreSQL >= 0.5x SQLite. --threads runs that many writers at once
(one Ledger each, as several controller replicas would share a database). --callers
runs that many concurrent callers of one Ledger, as the REST handler's threads are
when several agents report at once: reports that queue while the connection is busy
share one transaction and one commit (group commit, controller/ledger.py), on both
engines alike; each caller still returns only once its report's commit is durable.
"reports a commit" says how many shared one on average (1.00: no grouping).

Measured (docs/ledger.md, "Issue 18, step 3"; quiet disk, load ~2, 5 rounds, old and
new code alternating): small reports 0.45-0.46x before, 0.55-0.57x after (PostgreSQL
1,630 -> 1,876-2,014 reports/s, SQLite ~3,400-3,600 both); 16-record reports
0.46-0.50x before, 0.54-0.55x after; --callers 4: 0.52-0.59x.

Run: python bench/bench_ledger_write.py [--reports 2000] [--agents 8] [--records 2]
     [--rounds 5] [--threads 1 | --callers 1] [--unix-socket]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tokenfabric import usage_signing
from tokenfabric.controller.ledger import Ledger, Usage
from tokenfabric.controller.ledger_chain import VerifyReport, verify_file
from tokenfabric.pg_temp import PostgresUnavailable, TempPostgres
from tokenfabric.usage_signing import UsageRecord

T0 = 1_780_000_000.0
TARGET_RATIO = 0.5

Report = tuple[str, object]  # ("signed", (backend, [(record, signature)])) | ("totals", ...)


def prepare(reports: int, agents: int, records: int, totals_every: int) -> list[Report]:
    keys = [Ed25519PrivateKey.generate() for _ in range(agents)]
    seqs = [0] * agents
    prevs = [""] * agents
    cumulative = [0] * agents
    work: list[Report] = []
    for i in range(reports):
        a = i % agents
        backend = f"gpu{a}"
        batch = []
        for _ in range(records):
            seqs[a] += 1
            rec = UsageRecord(backend, f"boot-{a}", seqs[a], int(T0 * 1000) + i, 1 + i % 5,
                              "llama" if i % 3 else "qwen", 100 + i % 900, 20 + i % 300, 1,
                              prevs[a])
            batch.append((rec, usage_signing.sign(keys[a], rec)))
            prevs[a] = rec.digest()
        work.append(("signed", (backend, batch)))
        if totals_every and i % totals_every == 0:
            cumulative[a] += 1
            n = cumulative[a]
            work.append(("totals", (f"plain{a}", [Usage(1 + a % 5, "llama", 50 * n, 10 * n,
                                                        n)])))
    return work


def write(target: str, work: list[Report], threads: int, callers: int = 1,
          ) -> tuple[float, dict, float]:
    """Seconds to write `work`, split by backend over `threads` writers each with its own
    Ledger, or over `callers` threads sharing one Ledger (the REST handler's concurrent
    calls: their reports share commits); the totals; the mean reports per commit."""
    writers = max(threads, callers)
    ledgers = [Ledger(target) for _ in range(threads)]
    if callers > 1:
        ledgers = ledgers[:1] * callers
    shards: list[list[Report]] = [[] for _ in range(writers)]
    backends = sorted({payload[0] for _, payload in work})  # type: ignore[index]
    for kind, payload in work:
        backend = payload[0]  # type: ignore[index]
        shards[backends.index(backend) % writers].append((kind, payload))

    def run(led: Ledger, shard: list[Report]) -> None:
        for n, (kind, payload) in enumerate(shard):
            now = T0 + n * 0.01
            if kind == "signed":
                backend, batch = payload  # type: ignore[misc]
                led.record_signed(backend, backend + "-agent", batch, now=now)
            else:
                backend, totals = payload  # type: ignore[misc]
                led.record_totals(None, backend, totals, now=now, agent=backend + "-agent",
                                  epoch="boot")

    started = time.perf_counter()
    workers = [threading.Thread(target=run, args=(ledgers[k], shards[k]))
               for k in range(writers)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=3600)
    seconds = time.perf_counter() - started
    totals = ledgers[0].totals()
    distinct = list({id(led): led for led in ledgers}.values())
    grouped = sum(led.grouped_reports for led in distinct)
    commits = len(work) - grouped + sum(led.group_commits for led in distinct)
    for led in distinct:
        led.close()
    return seconds, totals, len(work) / commits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reports", type=int, default=2000)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--records", type=int, default=2, help="signed records per report")
    parser.add_argument("--totals-every", type=int, default=4,
                        help="a cumulative-totals report after every n-th signed one (0: none)")
    parser.add_argument("--threads", type=int, default=1,
                        help="writers with a Ledger each (as replicas sharing a database)")
    parser.add_argument("--callers", type=int, default=1,
                        help="concurrent callers of one Ledger (as the REST handler's "
                        "threads): their reports share commits (group commit)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="runs per engine, alternating; the medians are compared")
    parser.add_argument("--unix-socket", action="store_true",
                        help="connect to PostgreSQL over its Unix socket, not TCP 127.0.0.1")
    args = parser.parse_args()
    if args.threads > 1 and args.callers > 1:
        parser.error("--threads or --callers, not both")

    work = prepare(args.reports, args.agents, args.records, args.totals_every)
    print(f"workload: {len(work)} reports ({args.reports} signed x {args.records} records, "
          f"{len(work) - args.reports} cumulative totals), {args.agents} agents, "
          f"{args.threads} writer thread(s) with a Ledger each, {args.callers} concurrent "
          "caller(s) of one Ledger; a report is acknowledged once its commit is durable; "
          f"PostgreSQL over {'its Unix socket' if args.unix_socket else 'TCP 127.0.0.1'}")
    seconds: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    per_commit: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    totals: dict[str, dict] = {}
    reports: dict[str, VerifyReport] = {}
    try:
        with TempPostgres() as pg, tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
            # rounds alternate the engines, each on a fresh ledger: a burst of load from
            # elsewhere on the machine hits both, and the medians compare
            for n in range(args.rounds):
                targets = {"sqlite": str(Path(tmp) / f"ledger-{n}.db"),
                           "postgresql": pg.create_database(f"bench{n}",
                                                            unix_socket=args.unix_socket)}
                for engine, target in targets.items():
                    spent, totals[engine], grouped = write(target, work, args.threads,
                                                           args.callers)
                    seconds[engine].append(spent)
                    per_commit[engine].append(grouped)
                    reports[engine] = verify_file(target)
                    print(f"  round {n + 1} {engine:>10}: {len(work) / spent:,.0f} reports/s, "
                          f"{grouped:.2f} reports a commit")
    except PostgresUnavailable as exc:
        print(f"PostgreSQL cannot start here: {exc}")
        return 2
    median = {engine: statistics.median(s) for engine, s in seconds.items()}
    for engine, report in reports.items():
        print(f"{engine:>10}: median of {args.rounds}: {len(work)} reports in "
              f"{median[engine]:.2f} s = {len(work) / median[engine]:,.0f} reports/s, "
              f"{report.rows / median[engine]:,.0f} journal rows/s, "
              f"{statistics.median(per_commit[engine]):.2f} reports a commit; journal "
              f"{report.rows} rows, verify {'ok' if report.ok else 'FAILED'}")
    same = totals["sqlite"] == totals["postgresql"]
    print(f"same totals in both: {same}")
    ratio = median["sqlite"] / median["postgresql"]
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"ratio PostgreSQL/SQLite (write throughput, medians): {ratio:.2f}x  "
          f"(target >= {TARGET_RATIO}: {verdict})")
    ok = same and all(r.ok for r in reports.values()) and ratio >= TARGET_RATIO
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
