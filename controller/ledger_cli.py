"""`tokenfabric ledger verify|statement`: check a ledger file and bill from it.

Both read the ledger directly (read-only): the SQLite file, or the PostgreSQL database
of a `postgresql://` URL. They run beside a live controller or on a copy, and need no
controller process.
"""

from __future__ import annotations

import datetime
import json
import time

import click

from tokenfabric import exitcodes
from tokenfabric.controller import statement
from tokenfabric.controller.auth import TokenFileError, TokenStore
from tokenfabric.controller.ledger_chain import VerifyReport, verify_file
from tokenfabric.controller.ledger_store import redact

DEFAULT_LEDGER = "tokenfabric-ledger.db"


@click.group("ledger")
def ledger_group() -> None:
    """The token ledger: tamper checks and statements (docs/ledger.md)."""


@ledger_group.command("verify")
@click.option("--ledger", "path", default=DEFAULT_LEDGER, show_default=True,
              help="The controller's ledger: a SQLite file or a postgresql:// URL.")
@click.option("--tokens", type=click.Path(dir_okay=False),
              help="The controller's tokens file: signatures are checked against its "
                   "public keys (without it, only the hash chain is checked).")
@click.option("--all-signatures", is_flag=True,
              help="Check every row's signature, not one per unbroken run of an agent's "
                   "records (slower: ~0.1-0.4 ms per row).")
@click.option("--expect-head", help="The head hash published earlier (GET /api/v1/ledger/head"
              "): rows cut off at the end show as a different head.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_command(path: str, tokens: str | None, all_signatures: bool,
                   expect_head: str | None, as_json: bool) -> None:
    """Walk the journal's hash chain and the agents' signatures; exit 1 on the first
    edited, deleted or reordered row (named by id), 0 when everything holds."""
    keys = None
    if tokens:
        try:
            keys = TokenStore.from_file(tokens).public_keys()
        except TokenFileError as exc:
            click.echo(f"tokenfabric ledger verify: {exc}", err=True)
            raise SystemExit(exitcodes.INVALID_INPUT) from None
    started = time.perf_counter()
    try:
        report = verify_file(path, keys, all_signatures)
    except FileNotFoundError as exc:
        click.echo(f"tokenfabric ledger verify: {exc}", err=True)
        raise SystemExit(exitcodes.MISSING) from None
    except Exception as exc:  # not a ledger file, no such database, server unreachable
        click.echo(f"tokenfabric ledger verify: {redact(path)}: cannot read the journal: "
                   f"{exc}", err=True)
        raise SystemExit(exitcodes.INVALID_INPUT) from None
    seconds = time.perf_counter() - started
    head_ok = expect_head is None or report.head.startswith(expect_head.lower())
    if as_json:
        click.echo(json.dumps(_as_dict(report, seconds, head_ok), indent=2))
    else:
        _print(path, report, seconds, keys is not None, expect_head, head_ok)
    if not report.ok or not head_ok:
        raise SystemExit(exitcodes.FAILED)


def _as_dict(report: VerifyReport, seconds: float, head_ok: bool) -> dict:
    return {"ok": report.ok and head_ok, "rows": report.rows, "head": report.head,
            "head_matches": head_ok, "seconds": round(seconds, 3),
            "chain_problem": vars(report.chain_problem) if report.chain_problem else None,
            "signature_problems": [vars(p) for p in report.signature_problems],
            "signatures_checked": report.signatures_checked,
            "signed_rows": report.signed_rows, "unsigned_rows": report.unsigned_rows,
            "gaps": [vars(p) for p in report.gaps],
            "table_problems": report.table_problems,
            "unknown_agents": sorted(report.unknown_agents)}


def _print(path: str, report: VerifyReport, seconds: float, with_keys: bool,
           expect_head: str | None, head_ok: bool) -> None:
    click.echo(f"{redact(path)}: {report.rows} rows in {seconds:.2f} s; head {report.head}")
    if report.chain_problem:
        click.echo(f"TAMPERED: {report.chain_problem.message}")
    else:
        click.echo("hash chain: intact")
    if expect_head and not head_ok:
        click.echo(f"TAMPERED: the head is not the expected {expect_head} (rows cut off or "
                   "rewritten at the end)")
    if with_keys:
        click.echo(f"signatures: {report.signed_rows} signed rows, "
                   f"{report.signatures_checked} signatures checked, "
                   f"{len(report.signature_problems)} problem(s); "
                   f"{report.unsigned_rows} unsigned rows")
        for problem in report.signature_problems:
            click.echo(f"BAD SIGNATURE: {problem.message}")
        if report.unknown_agents:
            click.echo("no public key in the tokens file for: "
                       + ", ".join(sorted(report.unknown_agents)))
    for table_problem in report.table_problems:
        click.echo(f"TAMPERED (per-minute table): {table_problem}")
    for gap in report.gaps:
        click.echo(f"gap (accepted and flagged at ingest): {gap.message}")


def parse_time(text: str | None, option: str) -> float | None:
    """Unix seconds, or an ISO 8601 date/time (UTC unless it names a zone)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"'{text}' is neither unix seconds nor an ISO 8601 date "
                                 "like 2026-12-01 or 2026-12-01T10:00:00Z",
                                 param_hint=option) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    return stamp.timestamp()


@ledger_group.command("statement")
@click.option("--ledger", "path", default=DEFAULT_LEDGER, show_default=True,
              help="The controller's ledger: a SQLite file or a postgresql:// URL.")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False),
              help="The policy file whose contracts price the tokens (docs/policy.md).")
@click.option("--tenant", required=True, help="Tenant name or id.")
@click.option("--from", "since", help="Start, inclusive: ISO 8601 (UTC) or unix seconds.")
@click.option("--to", "until", help="End, exclusive: ISO 8601 (UTC) or unix seconds.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv",
              show_default=True)
def statement_command(path: str, policy_path: str, tenant: str, since: str | None,
                      until: str | None, fmt: str) -> None:
    """A tenant's tokens per model over [--from, --to), priced by its contract."""
    from tokenfabric.controller.ledger_chain import read_only
    from tokenfabric.controller.policy.schema import load_policy
    from tokenfabric.controller.policy.source import SpecError

    start, end = parse_time(since, "--from"), parse_time(until, "--to")
    try:
        policy = load_policy(policy_path)
    except SpecError as exc:
        click.echo("\n".join(exc.errors), err=True)
        raise SystemExit(exitcodes.INVALID_INPUT) from None
    except OSError as exc:
        click.echo(f"tokenfabric ledger statement: {policy_path}: {exc}", err=True)
        raise SystemExit(exitcodes.INVALID_INPUT) from None
    found = statement.find_tenant(policy, tenant)
    if found is None:
        click.echo(f"tokenfabric ledger statement: no tenant '{tenant}' in {policy_path}",
                   err=True)
        raise SystemExit(exitcodes.USAGE)
    try:
        db = read_only(path)
    except FileNotFoundError as exc:
        click.echo(f"tokenfabric ledger statement: {exc}", err=True)
        raise SystemExit(exitcodes.MISSING) from None
    except Exception as exc:  # no such database, server unreachable
        click.echo(f"tokenfabric ledger statement: {redact(path)}: {exc}", err=True)
        raise SystemExit(exitcodes.INVALID_INPUT) from None
    try:
        usage = statement.usage_by_model(db, found.tenant_id, start, end)
    except Exception as exc:  # not a ledger (sqlite3.Error, psycopg.Error)
        click.echo(f"tokenfabric ledger statement: {redact(path)}: {exc}", err=True)
        raise SystemExit(exitcodes.INVALID_INPUT) from None
    finally:
        db.close()
    result = statement.build(found, policy.contracts.get(found.contract), usage, start, end)
    click.echo(statement.to_csv(result) if fmt == "csv" else json.dumps(result, indent=2),
               nl=fmt == "json")
