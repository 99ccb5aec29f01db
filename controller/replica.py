"""Controller replicas (issue 18, docs/replicas.md): which one leads, and what a backup refuses.

Several controllers share one PostgreSQL ledger, one fabric file and one policy file.
Agents report to every replica (hostagent: `controller_urls`), so each keeps the
model (backends, load, down-marking) current, and the ledger writes each report once
(report ids, record signatures, cumulative totals; controller/ledger.py). Exactly one
replica, the leader, does the fabric-wide work: it pushes entries to the switches,
samples their counters into the ledger, runs the billing cross-check and takes the
operator's mutations; the others serve read-only REST and refuse mutations (409, with
the leader's URL).

Who leads: the replica holding a session-level PostgreSQL advisory lock
(`pg_try_advisory_lock(LEADER_LOCK_KEY)`) on its own connection. One lock for the
whole fabric, on the database every replica needs anyway to bill: a replica that
cannot reach the database cannot lead (it could not write the ledger either), and
P4Runtime mastership, which is per switch, cannot split the fabric-wide work between
two replicas that each reach part of the switches. The lock goes with the session:
when the leader dies (kill -9 closes its socket) or its connection drops, the server
releases it and a backup polling every POLL_S takes it.

The switches follow the lock by P4Runtime arbitration. Each replica has its own
election id `base` (distinct, < 2^32); a backup arbitrates with `base`, the leader with
`term * 2^32 + base`, where `term` is a counter in the ledger database that every new
leader increments (table replica_leader). So a new leader's election id is above every
id any earlier leader used: the switches make it primary and depose an old leader that
is still connected (a fencing token), and a replica that restarts (term 0: `base`)
joins as a backup, never taking the switches back. Taking over is the southbound's
own call, `Southbound.set_election_id` (controller/drivers.py): P4Runtime sends a new
arbitration update with the higher id on each open stream, no new session; the
switch's answer makes this replica primary, and its ready handler then reads the
switch and writes only what differs (controller/southbound/switch.py). OpenFlow
switches have no election id: the call leaves them as they are.

A leader that loses its database connection steps down by exiting (the service
manager restarts it as a backup): its model is no longer the one of record, and the
switches will be taken from it by the next leader's higher election id anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenfabric.controller.drivers import Southbound

log = logging.getLogger(__name__)


# pg_try_advisory_lock key of the leader: "tfleader", distinct from the ledger's write lock
LEADER_LOCK_KEY = 0x74666C6561646572
TERM_SHIFT = 32  # the leader's election id: term << TERM_SHIFT | base
MAX_BASE_ELECTION_ID = 2**TERM_SHIFT - 1
REARBITRATE_TIMEOUT_S = 10.0
POLL_S = 0.2  # how often a backup tries the lock (and a leader checks its connection)
CONNECT_TIMEOUT_S = 3
PRIMARY_HEADER = "X-Tokenfabric-Primary"
ROLE_HEADER = "X-Tokenfabric-Role"

# REST calls a backup takes: reads, and the agents' feed (registrations, reports, KV
# deltas, prefix claims and deregistrations go to every replica, so that each keeps the
# model current)
AGENT_FEED_SUFFIXES = ("/report", "/kv", "/claim")
READ_ONLY_POSTS = ("/policy/validate", "/prefix-index/lookup")


class ReplicaError(Exception):
    """Replicas cannot run this way (e.g. on a SQLite ledger)."""


@dataclass
class ReplicaView:
    role: str  # "primary" | "backup"
    url: str
    election_id: int
    term: int
    primary_url: str | None
    primary_since: float | None


class Replica:
    """This process's part in leader election; `run()` until stopped."""

    def __init__(self, ledger_url: str, url: str, base_election_id: int,
                 southbound: Southbound | None = None,
                 on_lost: Callable[[str], None] | None = None, poll_s: float = POLL_S,
                 on_lead: Callable[[], Awaitable[None]] | None = None) -> None:
        if not 0 < base_election_id <= MAX_BASE_ELECTION_ID:
            raise ReplicaError(f"a replica's election id must be in 1..{MAX_BASE_ELECTION_ID}"
                               f" (the leader's id is term * 2^{TERM_SHIFT} + it), got "
                               f"{base_election_id}")
        self.ledger_url = ledger_url
        self.url = url
        self.base = base_election_id
        self.southbound = southbound
        self.on_lost = on_lost  # called when leadership is lost (default: exit the process)
        # called once the lock is taken, before this replica says it leads (and so before
        # its first push): the operator's changes kept in the database (app.py)
        self.on_lead = on_lead
        self.poll_s = poll_s
        self.is_primary = False
        self.term = 0
        self.election_id = base_election_id
        self.primary_url: str | None = None
        self.primary_since: float | None = None
        self.became_primary_at: float | None = None  # time.time() of this replica's takeover
        self._db: Any = None

    def view(self) -> ReplicaView:
        return ReplicaView("primary" if self.is_primary else "backup", self.url,
                           self.election_id, self.term,
                           self.url if self.is_primary else self.primary_url,
                           self.primary_since)

    # ------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Try the lock (backup) or check the connection (leader) every poll_s."""
        while not stop.is_set():
            try:
                if self.is_primary:
                    await asyncio.to_thread(self._check_alive)
                else:
                    await self._try_lead()
            except Exception as exc:  # database down, network: say so, keep polling
                await self._lost(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_s)
        await asyncio.to_thread(self._close)

    async def first_try(self) -> None:
        """One try for the lock before the switches are connected: a replica that leads
        from the start arbitrates with its leader id at once, instead of opening
        sessions with its base id and opening them again (while a pipeline push of the
        first session may be under way)."""
        try:
            led = await asyncio.to_thread(self._try_lock)
        except Exception as exc:  # the loop tries again and says why
            log.warning("replica %s: ledger database unreachable at start (%s)", self.url, exc)
            await asyncio.to_thread(self._close)
            return
        if led is not None:
            if self.on_lead is not None:
                await self.on_lead()
            self._lead(*led)
            if self.southbound is not None:
                # not connected yet: each first session arbitrates with the leader's id
                await self.southbound.set_election_id(self.election_id)

    def _lead(self, term: int, election_id: int) -> None:
        self.term, self.election_id = term, election_id
        self.is_primary = True
        self.primary_url = self.url
        self.primary_since = self.became_primary_at = time.time()
        log.info("replica %s: leader (term %d, election id %d)", self.url, term, election_id)

    async def _try_lead(self) -> None:
        led = await asyncio.to_thread(self._try_lock)
        if led is None:
            return
        term, election_id = led
        self.term, self.election_id = term, election_id
        await self.raise_election_id(election_id)  # the switches first: the fence is up
        if self.on_lead is not None:
            await self.on_lead()
        self._lead(term, election_id)

    async def _lost(self, exc: BaseException) -> None:
        was_primary = self.is_primary
        await asyncio.to_thread(self._close)
        if not was_primary:
            log.warning("replica %s: ledger database unreachable (%s); retrying",
                        self.url, exc)
            return
        self.is_primary = False
        message = (f"replica {self.url}: lost the leader lock (database connection: {exc}); "
                   "stepping down")
        log.error("%s", message)
        if self.on_lost is not None:
            self.on_lost(message)
        else:  # a restart (systemd, compose) brings it back as a backup with a fresh model
            os._exit(75)  # EX_TEMPFAIL

    async def raise_election_id(self, election_id: int) -> None:
        """Arbitrate again on every switch with `election_id` on its open stream (the
        switch makes the highest id primary, and says so; the ready handler then
        reconciles by difference). A switch whose stream is down gets the id with its
        next session."""
        if self.southbound is None:
            return
        # bounded: arbitration updates that cannot be sent fail the takeover rather than
        # hang it (run() then drops the lock; the next try leads with a higher term)
        await asyncio.wait_for(self.southbound.set_election_id(election_id),
                               REARBITRATE_TIMEOUT_S)

    # ------------------------------------------------------------ database (in a thread)

    def _connect(self) -> Any:
        if self._db is None or self._db.closed:
            import psycopg

            # A leader cut off from the server must notice before the server drops its
            # session (and lock): unacknowledged data fails after 2 s, an idle
            # connection is probed every second (docs/replicas.md, "Partitions").
            self._db = psycopg.connect(self.ledger_url, autocommit=True,
                                       connect_timeout=CONNECT_TIMEOUT_S, keepalives=1,
                                       keepalives_idle=1, keepalives_interval=1,
                                       keepalives_count=2, tcp_user_timeout=2000)
        return self._db

    def _try_lock(self) -> tuple[int, int] | None:
        """(term, election id) when this replica took the lock now; None (and the current
        leader's URL noted) when another holds it."""
        db = self._connect()
        got = db.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,)).fetchone()[0]
        if not got:
            row = db.execute("SELECT url, since FROM replica_leader WHERE one = 1").fetchone()
            self.primary_url, self.primary_since = (row[0], row[1]) if row else (None, None)
            return None
        with db.transaction():
            row = db.execute(
                "INSERT INTO replica_leader (one, term, url, election, since) "
                "VALUES (1, 1, %s, %s, %s) ON CONFLICT (one) DO UPDATE SET "
                "term = replica_leader.term + 1, url = excluded.url, "
                "election = excluded.election, since = excluded.since RETURNING term",
                (self.url, self.base, time.time())).fetchone()
            term = int(row[0])
            election_id = term << TERM_SHIFT | self.base
            db.execute("UPDATE replica_leader SET election = %s WHERE one = 1",
                       (election_id,))
        return term, election_id

    def _check_alive(self) -> None:
        self._connect().execute("SELECT 1").fetchone()

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()


# ---------------------------------------------------------------- one SQLite controller


class SqliteOwner:
    """The one controller of a SQLite ledger: an exclusive lock on `<file>.controller.lock`
    for the process's life, so that a second controller on the same file is refused (a
    file has no shared server to elect a leader through)."""

    def __init__(self, path: str) -> None:
        import fcntl

        self.path = Path(f"{path}.controller.lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a+")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            other = self._file.read().strip() or "?"
            self._file.close()
            self._file = None
            raise ReplicaError(
                f"another controller (pid {other}) runs on the SQLite ledger {path}: a "
                "SQLite ledger has one controller; run replicas on a postgresql:// ledger "
                "(docs/replicas.md)") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def backup_refusal(path: str, method: str) -> bool:
    """True when a backup refuses this REST call: a mutation that is not the agents' feed."""
    if method in ("GET", "HEAD", "OPTIONS"):
        return False
    if path.endswith(READ_ONLY_POSTS):
        return False
    parts = path.rstrip("/").split("/")
    # /api/v1/backends (register) and DELETE /api/v1/backends/{name} (deregister)
    if parts[-1] == "backends" and method == "POST":
        return False
    if len(parts) >= 2 and parts[-2] == "backends" and method == "DELETE":
        return False
    return not path.endswith(AGENT_FEED_SUFFIXES)


def install_backup_guard(app: Any, replica: Replica | None) -> None:
    """A middleware that answers a mutation on a backup with 409 and the leader's URL
    (body `error.details[0].primary`, header X-Tokenfabric-Primary), before any work:
    the backup applies nothing, so the request is never applied twice. And GET
    /api/v1/replica: this replica's role, election id, term and the leader's URL."""
    from fastapi.responses import JSONResponse

    from tokenfabric.controller.api.errors import error_body

    @app.get("/api/v1/replica", tags=["replicas"])
    async def replica_view() -> dict[str, Any]:
        if replica is None:
            return {"role": "primary", "url": None, "election_id": None, "term": None,
                    "primary_url": None, "primary_since": None, "replicas": False}
        return {**vars(replica.view()), "replicas": True}

    if replica is None:
        return

    @app.middleware("http")
    async def refuse_on_backup(request: Any, call_next: Any) -> Any:
        if replica.is_primary or not backup_refusal(request.url.path, request.method):
            response = await call_next(request)
            # agents prefer the leader's answer (drain flags, tenants: hostagent)
            response.headers[ROLE_HEADER] = "primary" if replica.is_primary else "backup"
            return response
        primary = replica.primary_url
        message = ("this controller replica is a backup: send mutations to the primary"
                   + (f" at {primary}" if primary else " (none elected yet: retry)"))
        headers = {PRIMARY_HEADER: primary} if primary else {}
        headers[ROLE_HEADER] = "backup"
        return JSONResponse(error_body("not_primary", message, [{"primary": primary}]),
                            status_code=409, headers=headers)


class PrimaryWatch:
    """Who is primary on a P4Runtime switch, read back from the switch itself: a session
    with a low election id (a backup that never writes, its ready handler only reads)
    that asks the switch every `poll_s`. A switch tells the other sessions when the
    primary changes, but not when the primary raises its own id on its stream (BMv2's
    PI server answers only the raiser), which is how a backup that the switch already
    promoted (its base id) takes over: so the watch sends an arbitration update of its
    own, alternating two low ids, and the switch answers it with the primary's election
    id. For tests and the lab's takeover time."""

    def __init__(self, address: str, device_id: int, election_id: int = 1,
                 poll_s: float = 0.01) -> None:
        from tokenfabric.controller.southbound import Switch, SwitchConfig

        self.switch = Switch(SwitchConfig(name=f"watch-{address}", address=address,
                                          device_id=device_id, election_id=election_id,
                                          backoff_initial=0.02, backoff_max=0.2))
        self.ids = (election_id, election_id + 1)  # both below every replica's
        self.poll_s = poll_s
        self._asker: asyncio.Task[None] | None = None

    @property
    def primary_election_id(self) -> int | None:
        return self.switch.primary_election_id

    async def start(self) -> None:
        await self.switch.start()
        self._asker = asyncio.get_running_loop().create_task(self._ask(), name="watch-ask")

    async def _ask(self) -> None:
        from tokenfabric.controller.drivers import Role

        turn = 0
        while True:  # until stop() cancels it
            await asyncio.sleep(self.poll_s)
            if self.switch.role is Role.DISCONNECTED:
                continue  # the session's own arbitration answers once it is up
            turn += 1
            await self.switch.set_election_id(self.ids[turn % 2])

    async def wait_primary(self, election_id: int, timeout: float) -> float:
        """time.time() when the switch named `election_id` primary (TimeoutError after
        `timeout` s)."""
        deadline = time.monotonic() + timeout
        while self.switch.primary_election_id != election_id:
            if time.monotonic() > deadline:
                raise TimeoutError(f"primary election id still {self.primary_election_id}, "
                                   f"not {election_id}, after {timeout} s")
            await asyncio.sleep(0.005)
        return time.time()

    async def stop(self) -> None:
        if self._asker is not None:
            self._asker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._asker
            self._asker = None
        await self.switch.stop()
