"""`tokenfabric controller|policy|switch`: run the controller, check policy files, open a shell.

Exit codes (tokenfabric/exitcodes.py): 0 ok, 1 failed, 2 usage, 3 something needed
is missing, 4 an input file (fabric, policy, tokens, config) did not validate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import sqlite3
import sys
from typing import Any, NoReturn

import click

from tokenfabric import exitcodes
from tokenfabric.config import ConfigError, load_section

log = logging.getLogger(__name__)


DEFAULTS: dict[str, Any] = {
    "fabric": None,
    "policy": None,
    "listen": "127.0.0.1:8080",
    "tokens": None,
    "ledger": "tokenfabric-ledger.db",
    "election_id": 1,
    "report_timeout_s": 3.0,
    "openflow_listen": "127.0.0.1:6653",
    # the URL agents and other replicas reach this controller at (replicas on a
    # postgresql:// ledger, docs/replicas.md); default http://<listen>
    "advertise_url": None,
    # what one report may bill, per backend and second of reporting (controller/identity.py)
    "max_tokens_per_s": 1_000_000,
    # billed tokens against the bytes backends' ports sent (controller/crosscheck.py)
    "crosscheck_min_bytes_per_token": 150,
    "crosscheck_interval_s": 30.0,
    "crosscheck_window_s": 120.0,
    "crosscheck_lag_s": 60.0,
    "counter_interval_s": 10.0,  # switch counters sampled into the ledger this often
}


def _fail(message: str, code: int) -> NoReturn:
    click.echo(message, err=True)
    raise SystemExit(code)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise click.BadParameter(f"'{text}' is not host:port", param_hint="--listen")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- controller


@click.group("controller")
def controller_group() -> None:
    """Run the controller: P4Runtime southbound, REST API, token ledger."""


@controller_group.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML file with a `controller:` section (file < env < flags).")
@click.option("--fabric", type=click.Path(dir_okay=False), help="Fabric file (docs/fabric.md).")
@click.option("--policy", type=click.Path(dir_okay=False), help="Policy file (docs/policy.md).")
@click.option("--listen", help="REST API address host:port  [default: 127.0.0.1:8080]")
@click.option("--tokens", type=click.Path(dir_okay=False),
              help="Bearer tokens file (docs/rest.md). Without it, auth is off and the API "
                   "may only listen on loopback.")
@click.option("--ledger", help="The token ledger: a SQLite file, or a postgresql:// URL "
              "(docs/ledger.md)  [default: tokenfabric-ledger.db]")
@click.option("--election-id", type=click.IntRange(1, 2**64 - 1),
              help="P4Runtime election id; the highest connected controller is primary. "
                   "Replicas (a postgresql:// ledger): distinct, below 2^32; the leader "
                   "arbitrates with term * 2^32 + it (docs/replicas.md).")
@click.option("--advertise-url",
              help="This replica's REST URL, named to clients by backups "
                   "[default: http://<listen>]")
@click.option("--openflow-listen",
              help="Where OpenFlow switches (driver: openflow) connect, host:port  "
                   "[default: 127.0.0.1:6653; env TOKENFABRIC_OPENFLOW_LISTEN]")
def run_command(config_path: str | None, **flags: Any) -> None:
    """Program every switch of the fabric and serve the REST API until stopped."""
    if not flags.get("openflow_listen") and os.environ.get("TOKENFABRIC_OPENFLOW_LISTEN"):
        flags["openflow_listen"] = os.environ["TOKENFABRIC_OPENFLOW_LISTEN"]
    try:
        cfg = load_section("controller", DEFAULTS, config_path, flags)
    except ConfigError as exc:
        _fail(f"tokenfabric controller: {exc}", exitcodes.INVALID_INPUT)
    if not cfg["fabric"]:
        _fail("tokenfabric controller run: --fabric is required (or controller.fabric in "
              "the config file)", exitcodes.USAGE)
    host, port = parse_listen(cfg["listen"])
    try:
        parse_listen(str(cfg["openflow_listen"]))
    except click.BadParameter:
        _fail(f"tokenfabric controller run: --openflow-listen: '{cfg['openflow_listen']}' "
              "is not host:port", exitcodes.USAGE)
    try:
        timeout = float(cfg["report_timeout_s"])
        election_id = int(cfg["election_id"])
    except (TypeError, ValueError):
        timeout = election_id = 0
    if not 0 < timeout <= 3600 or not 0 < election_id < 2**64:
        _fail("tokenfabric controller run: report_timeout_s must be in (0, 3600] seconds and "
              "election_id in 1..2^64-1", exitcodes.INVALID_INPUT)
    checks = _billing_settings(cfg)
    from tokenfabric.controller.app import (  # the FastAPI stack loads only here
        build_controller,
        serve,
    )
    from tokenfabric.controller.ledger_store import StoreError, is_postgres, redact
    from tokenfabric.controller.replica import (
        MAX_BASE_ELECTION_ID,
        Replica,
        ReplicaError,
        SqliteOwner,
    )

    advertise = str(cfg["advertise_url"] or f"http://{host}:{port}")
    if not advertise.startswith(("http://", "https://")):
        _fail(f"tokenfabric controller run: --advertise-url: '{advertise}' is not an "
              "http(s):// URL", exitcodes.USAGE)
    owner: SqliteOwner | None = None
    if is_postgres(cfg["ledger"]):
        if election_id > MAX_BASE_ELECTION_ID:
            _fail("tokenfabric controller run: on a postgresql:// ledger controllers run as "
                  f"replicas, whose election_id must be in 1..{MAX_BASE_ELECTION_ID}",
                  exitcodes.INVALID_INPUT)
    else:
        try:
            owner = SqliteOwner(str(cfg["ledger"]))
        except ReplicaError as exc:
            _fail(f"tokenfabric controller run: {exc}", exitcodes.USAGE)
        except OSError as exc:
            _fail(f"tokenfabric controller run: cannot lock the ledger "
                  f"{cfg['ledger']}: {exc}", exitcodes.FAILED)

    try:
        ctl = build_controller(fabric=cfg["fabric"], policy=cfg["policy"], tokens=cfg["tokens"],
                               ledger=cfg["ledger"], election_id=election_id,
                               report_timeout_s=timeout,
                               openflow_listen=str(cfg["openflow_listen"]))
    except FileNotFoundError as exc:
        _fail(f"tokenfabric controller run: {exc}", exitcodes.INVALID_INPUT)
    except ValueError as exc:  # SpecError, TokenFileError: already file:line messages
        _fail(f"tokenfabric controller run: invalid input:\n{exc}", exitcodes.INVALID_INPUT)
    except (sqlite3.Error, OSError, StoreError) as exc:
        _fail(f"tokenfabric controller run: cannot open the ledger {redact(str(cfg['ledger']))}"
              f": {exc}", exitcodes.FAILED)
    if owner is None:
        ctl.replica = Replica(str(cfg["ledger"]), advertise, election_id, ctl.southbound,
                              on_lead=ctl.restore_operator_state)
    ctl.max_tokens_per_s = checks["max_tokens_per_s"]
    ctl.crosscheck.min_bytes_per_token = checks["crosscheck_min_bytes_per_token"]
    ctl.crosscheck.interval_s = checks["crosscheck_interval_s"]
    ctl.crosscheck.window_s = checks["crosscheck_window_s"]
    ctl.crosscheck.lag_s = checks["crosscheck_lag_s"]
    ctl.counter_interval_s = checks["counter_interval_s"]
    if not ctl.tokens.enabled and not _is_loopback(host):
        _fail(f"tokenfabric controller run: refusing to listen on {host} without --tokens "
              "(auth is off without a token file; only loopback is allowed then)",
              exitcodes.USAGE)
    log.info("controller: API on http://%s:%d, ledger %s", host, port,
             redact(str(cfg["ledger"])))
    try:
        asyncio.run(serve(ctl, host, port))
    except OSError as exc:
        _fail(f"tokenfabric controller run: {exc}", exitcodes.FAILED)
    finally:
        if owner is not None:
            owner.release()


def _billing_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The bound on reports and the cross-check's settings, checked (exit 4 when bad)."""
    out: dict[str, Any] = {}
    for key, kind, lo in (("max_tokens_per_s", int, 1),
                          ("crosscheck_min_bytes_per_token", int, 0),
                          ("crosscheck_interval_s", float, 1.0),
                          ("crosscheck_window_s", float, 1.0),
                          ("crosscheck_lag_s", float, 0.0),
                          ("counter_interval_s", float, 0.5)):
        value: Any = cfg.get(key)
        try:
            number = kind(value)
        except (TypeError, ValueError):
            number = None
        if number is None or isinstance(value, bool) or number < lo:
            _fail(f"tokenfabric controller run: {key} must be a number >= {lo}, not {value!r}",
                  exitcodes.INVALID_INPUT)
        out[key] = number
    return out


# ---------------------------------------------------------------- policy


@click.group("policy")
def policy_group() -> None:
    """Check QoS policy files (docs/policy.md)."""


@policy_group.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--fabric", type=click.Path(dir_okay=False),
              help="Also check the services the policy names against this fabric file.")
def validate_command(files: tuple[str, ...], fabric: str | None) -> None:
    """Validate policy FILES: one `file:line: field: problem` per error, exit 4 on any.

    A valid file is also compiled to switch entries, so that what only the switches
    limit (classes, queues, table sizes) is caught here too.
    """
    from tokenfabric.controller.policy.cli_support import summarize_file, validate_file

    bad = 0
    for name in files:
        errors = validate_file(name, fabric)
        if errors:
            bad += 1
            for line in errors:
                click.echo(line, err=True)
            continue
        summary = summarize_file(name, fabric)
        click.echo(f"{name}: valid ({summary[0]})")
    if bad:
        raise SystemExit(exitcodes.INVALID_INPUT)


# ---------------------------------------------------------------- switch


@click.group("switch")
def switch_group() -> None:
    """Inspect a switch of the fabric."""


@switch_group.command("shell")
@click.argument("name")
@click.option("--fabric", required=True, type=click.Path(dir_okay=False),
              help="Fabric file that names the switch.")
def shell_command(name: str, fabric: str) -> None:
    """Open p4runtime-shell on switch NAME as a reader (election id 0): it reads
    everything and never takes over from the controller."""
    from tokenfabric.controller.fabric import load_fabric
    from tokenfabric.controller.policy.source import SpecError

    try:
        model = load_fabric(fabric)
    except SpecError as exc:
        _fail("\n".join(exc.errors), exitcodes.INVALID_INPUT)
    switch = model.fabric.switches.get(name)
    if switch is None:
        _fail(f"no switch '{name}' in {fabric} (it has: "
              f"{', '.join(sorted(model.fabric.switches)) or 'none'})", exitcodes.USAGE)
    try:
        from tokenfabric.controller.switch_shell import open_shell
        from tokenfabric.dataplane import TOKEN_ROUTER_JSON, TOKEN_ROUTER_P4INFO
    except ImportError as exc:
        _fail(f"tokenfabric switch shell: unavailable ({exc})", exitcodes.MISSING)
    built = TOKEN_ROUTER_P4INFO.is_file() and TOKEN_ROUTER_JSON.is_file()
    sys.exit(open_shell(switch.address, switch.device_id,
                        TOKEN_ROUTER_P4INFO if built else None,
                        TOKEN_ROUTER_JSON if built else None))
