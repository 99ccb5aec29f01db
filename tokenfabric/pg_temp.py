"""A throw-away PostgreSQL server: initdb in a temporary directory, listening on
127.0.0.1 only, stopped and deleted at the end. For the ledger's tests and benchmark
(and a lab run): Debian's package (apt-get install postgresql) brings the binaries in
/usr/lib/postgresql/<version>/bin, outside PATH.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user
(which Debian's package creates) through runuser. Trust authentication: the server
takes connections from 127.0.0.1 only, and lives as long as the test.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tokenfabric.tools import find_tool, free_port

START_TIMEOUT_S = 60


class PostgresUnavailable(Exception):
    """No PostgreSQL server can be started here; the message says why."""


def find_bin() -> Path | None:
    """The folder of initdb/pg_ctl: Debian's newest version, else PATH."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name)
                      if Path(p).parent.parent.name.isdigit() else 0)
    if versions:
        return Path(versions[-1]).parent
    initdb = find_tool("initdb")
    return Path(initdb).parent if initdb else None


class TempPostgres:
    """`with TempPostgres() as pg: pg.create_database("x"); pg.url("x")`."""

    def __init__(self) -> None:
        self.bin = find_bin()
        self.port = 0
        self.dir: Path | None = None
        self._as_user: list[str] = []

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        assert self.dir is not None and self.bin is not None
        done = subprocess.run([*self._as_user, str(self.bin / args[0]), *args[1:]],
                              cwd=self.dir, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if done.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PostgresUnavailable(f"{args[0]} failed ({done.returncode}): "
                                      f"{done.stderr.strip()[-2000:]}\n{tail}".strip())

    def start(self) -> TempPostgres:
        if self.bin is None:
            raise PostgresUnavailable("PostgreSQL not installed (initdb not found in "
                                      "/usr/lib/postgresql/*/bin or on PATH): "
                                      "apt-get install postgresql")
        self.dir = Path(tempfile.mkdtemp(prefix="tokenfabric-pg-"))
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no `postgres` user "
                                          "to run the server as") from None
            if not find_tool("runuser"):
                raise PostgresUnavailable("running as root without runuser (util-linux)")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self._run("initdb", "-D", "data", "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-instructions")
        # fsync and synchronous_commit stay at their defaults (on): a commit is durable
        self._run("pg_ctl", "start", "-D", "data", "-w", "-t", str(START_TIMEOUT_S),
                  "-l", "server.log", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} "
                  f"-c unix_socket_directories={self.dir}")
        return self

    def url(self, database: str = "postgres", unix_socket: bool = False) -> str:
        """TCP on 127.0.0.1, or the server's Unix socket (in its temporary directory)."""
        if unix_socket:
            return f"postgresql://postgres@/{database}?host={self.dir}&port={self.port}"
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, unix_socket: bool = False) -> str:
        """A new empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name, unix_socket)

    def restart(self) -> None:
        """Stop the server (every connection drops) and start it again on the same port."""
        self._run("pg_ctl", "restart", "-D", "data", "-m", "fast", "-w", "-t",
                  str(START_TIMEOUT_S), "-l", "server.log")

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            if (self.dir / "data" / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-D", "data", "-m", "fast", "-w", "-t", "30")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
