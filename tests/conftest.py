"""Markers for tests that need external pieces: they skip, with the reason, where absent."""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenfabric.doctor import VLLM_VENV
from tokenfabric.pg_temp import PostgresUnavailable, TempPostgres
from tokenfabric.tools import find_tool

REPO = Path(__file__).resolve().parent.parent


def path_without(folder: Path, *hidden: str) -> str:
    """A PATH with every program of this one but `hidden`: one folder of links, made in
    `folder` (a machine where those tools were never installed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            link = folder / name
            if name not in hidden and not link.exists() and not link.is_symlink():
                link.symlink_to(os.path.join(directory, name))
    return str(folder)


@functools.cache
def netns_ability() -> str | None:
    """None where this process may create network namespaces, else the reason it may not."""
    if os.geteuid() != 0:
        return "needs root"
    if not find_tool("unshare") or not find_tool("ip"):
        return "needs unshare and ip (iproute2)"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    return None if probe.returncode == 0 else "cannot create network namespaces"


def _missing(marker: str) -> str | None:
    if marker == "bmv2":
        return None if find_tool("simple_switch_grpc") else (
            "simple_switch_grpc (BMv2) not found on PATH or in /opt/p4/bin")
    if marker == "p4c":
        return None if find_tool("p4c-bm2-ss") else "p4c-bm2-ss not found"
    if marker == "mininet":
        if not (find_tool("mn") and find_tool("mnexec")):
            return "Mininet (mn, mnexec) not installed: apt-get install mininet"
        return None if find_tool("ovs-vsctl") else "Open vSwitch not installed"
    if marker == "root":
        return netns_ability()
    if marker == "ovs":  # a private ovsdb-server + ovs-vswitchd per test (userspace datapath)
        if not (find_tool("ovs-vswitchd") and find_tool("ovsdb-server")
                and find_tool("ovs-vsctl") and find_tool("ovs-ofctl")):
            return "Open vSwitch not installed: apt-get install openvswitch-switch"
        return netns_ability()
    if marker == "vllm":
        python = VLLM_VENV / "bin" / "python"
        return None if python.exists() else f"no vLLM venv at {VLLM_VENV} (.ci/run makes it)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker in ("bmv2", "p4c", "mininet", "root", "vllm", "ovs"):
            if marker in item.keywords:
                reason = _missing(marker)
                if reason:
                    item.add_marker(pytest.mark.skip(reason=f"{marker}: {reason}"))
                    break


# ---------------------------------------------------------------- ledger engines

LEDGER_ENGINES = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[TempPostgres | str]:
    """One throw-away PostgreSQL server for the session (tokenfabric/pg_temp.py), or the
    reason it cannot start here."""
    try:
        import psycopg  # noqa: F401 - the controller extra's driver
    except ImportError:
        yield "psycopg not installed (pip install 'tokenfabric[controller]')"
        return
    server = TempPostgres()
    try:
        server.start()
    except (PostgresUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        server.stop()
        yield f"cannot start PostgreSQL: {exc}"
        return
    try:
        yield server
    finally:
        server.stop()


_databases = itertools.count(1)


@pytest.fixture(params=LEDGER_ENGINES)
def ledger_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's ledger lives, once per engine: a SQLite file in tmp_path, or a new
    database on the session's PostgreSQL server (the test skips, with the reason, where
    that cannot start)."""
    if request.param == "sqlite":
        return str(tmp_path / "sub" / "ledger.db")
    server = request.getfixturevalue("postgres_server")
    if isinstance(server, str):
        pytest.skip(f"postgresql: {server}")
    return server.create_database(f"ledger_{os.getpid()}_{next(_databases)}")
