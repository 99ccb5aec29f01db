"""One P4Runtime switch: its lifecycle, as in finsy.

A session (controller/southbound/session.py) is a gRPC channel plus a
StreamChannel on which we sent our MasterArbitrationUpdate. Every time a session
comes up, and every time the switch tells us that the primary changed, the ready
handlers run again: the built-in one pushes the pipeline if the switch's cookie
differs from ours (pipeline.py) and, when we are primary, reconciles the switch
to the last desired state (reconcile.py: read, diff, write only the difference,
through rpc.py's batched Writes). A session that ends (switch restart, network,
primary gone) is retried with bounded exponential backoff until `stop()`.

Election ids: every controller process has one election id for all its
switches. P4Runtime makes the highest id of the connected controllers the
primary; the others are backups and never write. When the primary's stream
ends the switch promotes the next-highest and tells it with an arbitration
update whose status is OK; its handlers then run and it adopts the switch.
`election_id`, `is_primary`, `primary_election_id` read it back;
`set_election_id` re-arbitrates on the open stream (a replica taking over).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, replace
from typing import Any

import grpc
from p4.v1 import p4runtime_pb2

from tokenfabric.controller.drivers import CounterValue, DriverStats, ReconcileResult, Role
from tokenfabric.controller.entries import Action, DesiredState, EntityKey, Exact, TableEntry
from tokenfabric.controller.southbound import weights
from tokenfabric.controller.southbound.codec import Codec
from tokenfabric.controller.southbound.errors import (
    NotPrimaryError,
    PipelineError,
    SouthboundError,
    SwitchUnavailable,
    TranslationError,
)
from tokenfabric.controller.southbound.p4info import P4InfoIndex, Pipeline
from tokenfabric.controller.southbound.pipeline import ensure_pipeline
from tokenfabric.controller.southbound.plan import Plan, Update, plan
from tokenfabric.controller.southbound.reconcile import (
    Normalizer,
    count_phase,
    decode_all,
    read_all_request,
    wildcard,
)
from tokenfabric.controller.southbound.rpc import Rpc
from tokenfabric.controller.southbound.session import Election, Session, Standing
from tokenfabric.p4names import Counters, Tables

log = logging.getLogger(__name__)


__all__ = ["CounterValue", "Handler", "ReconcileResult", "Role", "Switch", "SwitchConfig",
           "SwitchStats"]


@dataclass(frozen=True)
class SwitchConfig:
    name: str
    address: str  # host:port of the switch's P4Runtime server
    device_id: int = 0
    election_id: int = 1  # the highest id among connected controllers is primary
    pipeline: Pipeline | None = None  # None: adopt the P4Info the switch already runs
    weights: str = "native"  # "native" (BMv2/PI emulates weights) or "expand"
    batch_size: int = 1000  # updates per Write RPC
    rpc_timeout: float = 30.0
    connect_timeout: float = 5.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    role_name: str = ""  # P4Runtime role; "" is the default (full-access) role


@dataclass
class SwitchStats(DriverStats):
    """DriverStats and the P4Runtime switch's own counters."""

    pipeline_pushes: int = 0
    reads: int = 0  # full reads of the switch's state
    write_rpcs: int = 0


Handler = Callable[["Switch"], Awaitable[None]]


class Switch:
    """A P4Runtime switch driven by this controller process (a SwitchDriver)."""

    keeps_token_buckets = True  # admit.p4 decides in the dataplane

    def __init__(self, config: SwitchConfig) -> None:
        if config.weights not in ("native", "expand"):
            raise ValueError(f"weights must be 'native' or 'expand', got {config.weights!r}")
        self.config = config
        self.name = config.name
        self.role = Role.DISCONNECTED
        self.primary_election_id: int | None = None
        self.stats = SwitchStats()
        self.last_error: str = ""
        self.installed_cookie: int | None = None
        self._pipeline = config.pipeline
        self._codec: Codec | None = Codec(config.pipeline.index) if config.pipeline else None
        self._applies = 0  # apply() calls so far: the latest one's state is remembered
        self._normalize = Normalizer(expand_weights=config.weights == "expand")
        self._desired: DesiredState | None = None
        self._want: DesiredState | None = None  # _desired normalized for the program
        self._mirror: DesiredState | None = None  # what the switch holds, while known
        self._handlers: list[Handler] = []
        self._session: Session | None = None
        self._rpc: Rpc | None = None
        self._task: asyncio.Task[None] | None = None
        self._lifecycle: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._settled = asyncio.Event()  # the handlers of the current session/role ran
        self._lock = asyncio.Lock()  # one reconcile or pipeline push at a time
        self._generation = 0
        self._arbitrated = False

    # ---- public API --------------------------------------------------------------

    @property
    def is_primary(self) -> bool:
        return self.role is Role.PRIMARY

    @property
    def election_id(self) -> int:
        return self.config.election_id

    async def set_election_id(self, election_id: int) -> None:
        """Arbitrate again with another election id on the open stream (a higher one than
        the primary's makes us primary); the answer arrives as an arbitration update,
        after which the ready handlers run: wait_role() waits for it."""
        if not 0 < election_id < 2**128:
            raise ValueError(f"election id must be in 1..2^128-1, got {election_id}")
        self.config = replace(self.config, election_id=election_id)
        if self._rpc is not None:
            self._rpc = replace(self._rpc, election_id=election_id)
        if self._session is None:
            return  # not connected: the next session arbitrates with the new id
        try:
            await self._session.arbitrate(self._election())
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError,
                SouthboundError, OSError) as exc:
            # the stream is ending (grpc says InvalidStateError once the call is done): the
            # retry loop opens the next session with the new id (already in self.config), so
            # the takeover happens there, not here
            self.last_error = _describe(exc)
            log.warning("switch %s: re-arbitration with election id %d not sent (%s); "
                        "the next session carries it", self.name, election_id,
                        self.last_error)

    @property
    def codec(self) -> Codec:
        if self._codec is None:
            raise PipelineError(f"switch {self.name}: no P4 program known yet")
        return self._codec

    @property
    def index(self) -> P4InfoIndex:
        return self.codec.index

    @property
    def desired(self) -> DesiredState | None:
        return self._desired

    def add_handler(self, handler: Handler) -> None:
        """Run `handler(switch)` after every (re)connect and every change of primary."""
        self._handlers.append(handler)

    async def start(self) -> None:
        """Connect (in the background, retrying until stop())."""
        self.launch()

    def launch(self) -> None:
        """start() for callers that are not coroutines (needs a running event loop)."""
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name=f"p4rt-{self.name}")

    async def stop(self) -> None:
        """End the session: the switch then promotes the next controller (if any)."""
        self._stopping.set()
        for task in (self._lifecycle, self._task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._lifecycle = None
        await self._close_session()
        self.role = Role.DISCONNECTED

    async def wait_settled(self, timeout: float = 10.0) -> Role:
        """Wait until the handlers for the current session and role have run."""
        await asyncio.wait_for(self._settled.wait(), timeout)
        return self.role

    async def wait_role(self, role: Role, timeout: float = 10.0) -> None:
        """Wait until this controller has `role` on the switch and its handlers ran."""
        deadline = time.monotonic() + timeout
        while not (self.role is role and self._settled.is_set()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"switch {self.name}: still {self.role.value} "
                                   f"after {timeout} s, wanted {role.value}")
            await asyncio.sleep(0.02)

    async def apply(self, desired: DesiredState) -> ReconcileResult:
        """Make the switch hold `desired`, writing only the difference.

        The state is remembered: a backup or a disconnected switch gets it as
        soon as it becomes primary / reconnects. Raises TranslationError before
        anything is written when an entity does not fit the P4 program, and
        WriteError when the switch refuses updates.
        """
        # Normalizing checks every entity against the P4 program before anything is
        # remembered or written.
        # (in a thread: the first time, a policy of thousands of tenants takes ~0.2 s)
        self._applies += 1
        mine = self._applies
        want = await asyncio.to_thread(self._normalize.paused, self._codec, desired) \
            if self._codec is not None else None
        if mine != self._applies:  # a later apply came while this one normalized: it wins
            return ReconcileResult(self.name, False, "superseded",
                                   desired=len(desired.entities))
        self._desired, self._want = desired, want
        if self.role is Role.DISCONNECTED:
            return ReconcileResult(self.name, False, "disconnected", desired=len(desired.entities))
        if self.role is Role.BACKUP:
            return ReconcileResult(self.name, False, "backup", desired=len(desired.entities))
        async with self._lock:
            return await self._reconcile_locked(read_switch=False)

    async def reconcile(self) -> ReconcileResult:
        """Read what the switch holds, diff against the desired state, write the difference.

        `apply` skips the read while this session's mirror of the switch is
        valid (every write since the last read succeeded); `reconcile` always
        reads, so it also repairs what changed behind the controller's back.
        """
        async with self._lock:
            return await self._reconcile_locked(read_switch=True)

    async def set_over_budget(self, tenants: frozenset[int]) -> None:
        """Nothing to do: the switch's own token buckets decide (admit.p4)."""

    async def recheck_load_bound(self) -> bool:
        """Nothing to do: select.p4 checks affinity's bound from the load registers."""
        return False

    async def read_state(self, collapse_weights: bool = True) -> DesiredState:
        """Everything the switch holds: table entries, members, groups, meter configs."""
        held = await self._read_held()
        if self.config.weights == "expand" and collapse_weights:
            return DesiredState({e.key(): e for e in weights.collapse(held.entities.values())})
        return held

    async def read_counters(self, name: str, index: int | None = None,
                            cells: Collection[int] | None = None) -> dict[int, CounterValue]:
        """One cell (index), some cells (`cells`; those outside the array are left out), or
        the whole array of an indexed counter. A whole array is as many entities as cells
        (4096 for the tenant counters), each decoded by the pure-Python protobuf on the
        caller's event loop: read only the cells you need where the loop serves others."""
        if index is not None:
            return await self.read_counter_cells(name, [index])
        info = self.index.counter(name)
        if cells is not None:
            return await self.read_counter_cells(
                name, [c for c in cells if 0 <= c < info.size])
        return _counter_values(await self.read_entities(
            [wildcard("counter_entry", "counter_id", info.id)]))

    async def read_counter_cells(self, name: str,
                                 indices: Iterable[int]) -> dict[int, CounterValue]:
        """Some cells of an indexed counter, in one Read (a whole array of BMv2's is slow
        to read: each cell is its own lookup)."""
        info = self.index.counter(name)
        entities = []
        for index in sorted(set(indices)):
            if not 0 <= index < info.size:
                raise TranslationError(f"counter {info.name} index {index} not in "
                                       f"0..{info.size - 1}")
            pb = wildcard("counter_entry", "counter_id", info.id)
            pb.counter_entry.index.index = index
            entities.append(pb)
        return _counter_values(await self.read_entities(entities))

    async def read_port_bytes(self) -> dict[int, int]:
        """Per port a backend sits on: the bytes the switch forwarded from it, i.e. with
        DSR the backend's replies (the `reply_bytes` cell that the port's `reply_source`
        entry names; docs/ledger.md). The same answer as an OpenFlow switch's port
        statistics, so the billing cross-check has one code path for both."""
        cells: dict[int, int] = {}  # port -> backend id
        for entity in (self._desired or DesiredState()).entities.values():
            if isinstance(entity, TableEntry) and entity.table == Tables.REPLY_SOURCE \
                    and isinstance(entity.action, Action):
                port = dict(entity.match)["ingress_port"]
                if isinstance(port, Exact):
                    cells[port.value] = dict(entity.action.params)["backend_id"]
        counts = await self.read_counter_cells(Counters.REPLY_BYTES, set(cells.values()))
        return {port: counts[bid].bytes if bid in counts else 0
                for port, bid in sorted(cells.items())}

    async def read_direct_counters(self, table: str) -> dict[EntityKey, CounterValue]:
        """The direct counter of every entry of `table`, by the entry's TableEntry.key()."""
        info = self.index.table(table)
        if not info.direct_counter_ids:
            raise TranslationError(f"table {info.name} has no direct counter")
        pb = p4runtime_pb2.Entity()
        pb.direct_counter_entry.table_entry.table_id = info.id
        out: dict[EntityKey, CounterValue] = {}
        for entity in await self.read_entities([pb]):
            entry = entity.direct_counter_entry
            out[self.codec.decode_key(entry.table_entry)] = CounterValue(
                entry.data.packet_count, entry.data.byte_count)
        return out

    async def read_meters(self, name: str | None = None) -> DesiredState:
        """The configured cells of one meter (or of all meters)."""
        infos = [self.index.meter(name)] if name else self.index.meters()
        entities = [wildcard("meter_entry", "meter_id", info.id) for info in infos]
        return decode_all(self.codec, await self.read_entities(entities))

    async def read_entities(self, entities: list[p4runtime_pb2.Entity]) \
            -> list[p4runtime_pb2.Entity]:
        """A raw P4Runtime Read of (wildcard) entities."""
        return await self._require_rpc().read(entities)

    async def write(self, updates: list[Update]) -> int:
        """Send `updates` (normalized entities) in batches; returns the number of RPCs.

        A raw write: the next apply reads the switch again instead of trusting
        its mirror.
        """
        self._mirror = None
        return await self._write_updates(updates)

    async def _write_updates(self, updates: list[Update]) -> int:
        if not self.is_primary:
            raise NotPrimaryError(f"switch {self.name}: this controller is "
                                  f"{self.role.value}, not primary")
        return await self._require_rpc().write(updates, self.codec)

    def status(self) -> dict[str, Any]:
        """A JSON-able view for REST and CLI."""
        last = self.stats.last
        return {
            "name": self.name, "address": self.config.address,
            "device_id": self.config.device_id, "role": self.role.value,
            "election_id": self.config.election_id,
            "primary_election_id": self.primary_election_id,
            "pipeline_cookie": self._pipeline.cookie if self._pipeline else None,
            "installed_cookie": self.installed_cookie,
            "sessions": self.stats.sessions, "pipeline_pushes": self.stats.pipeline_pushes,
            "reconciles": self.stats.reconciles, "updates_written": self.stats.updates_written,
            "last_reconcile": None if last is None else last.view(),
            "last_error": self.last_error,
        }

    # ---- session and lifecycle ---------------------------------------------------

    def _election(self) -> Election:
        return Election(self.config.device_id, self.config.election_id, self.config.role_name)

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._arbitrated = False
            try:
                await self._run_session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure ends the session, never the retry loop
                self.last_error = _describe(exc)
                expected = isinstance(exc, (grpc.aio.AioRpcError, SouthboundError, OSError,
                                            TimeoutError))
                log.warning("switch %s (%s): session ended: %s", self.name,
                            self.config.address, self.last_error, exc_info=not expected)
            finally:
                await self._end_session()
            if self._stopping.is_set():
                break
            attempt = 0 if self._arbitrated else attempt + 1
            delay = min(self.config.backoff_max, self.config.backoff_initial * 2 ** attempt)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _run_session(self) -> None:
        """One channel + stream; returns (or raises) when the stream ends."""
        config = self.config
        session = self._session = Session(self.name, config.address, config.connect_timeout,
                                           (config.backoff_initial, config.backoff_max))
        first = await session.open(self._election())
        assert session.stub is not None  # open() made it
        self._rpc = Rpc(self.name, session.stub, config.device_id, config.election_id,
                        config.role_name, config.rpc_timeout, config.batch_size)
        self.stats.sessions += 1
        self._arbitrated = True
        self._on_arbitration(first, new_session=True)
        async for standing in session.updates():
            self._on_arbitration(standing, new_session=False)

    def _on_arbitration(self, standing: Standing, new_session: bool) -> None:
        self.primary_election_id = standing.primary_election_id
        role = standing.role
        if role is self.role and not new_session:
            return
        log.info("switch %s: %s (election id %d, primary's %d)", self.name, role.value,
                 self.config.election_id, self.primary_election_id)
        self.role = role
        self._generation += 1
        self._mirror = None  # another controller may have written meanwhile
        self._settled.clear()
        if self._lifecycle and not self._lifecycle.done():
            self._lifecycle.cancel()
        self._lifecycle = asyncio.create_task(self._run_handlers(self._generation),
                                              name=f"p4rt-{self.name}-ready")

    async def _run_handlers(self, generation: int) -> None:
        try:
            for handler in [_builtin_ready, *self._handlers]:
                try:
                    await handler(self)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # one failing handler must not stop the others
                    self.last_error = _describe(exc)
                    log.error("switch %s: ready handler %s failed: %s", self.name,
                              getattr(handler, "__name__", handler), self.last_error)
        finally:
            if generation == self._generation:
                self._settled.set()

    async def _end_session(self) -> None:
        if self._lifecycle and not self._lifecycle.done():
            self._lifecycle.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._lifecycle
        if self.role is not Role.DISCONNECTED:
            self._generation += 1
        self.role = Role.DISCONNECTED
        self._mirror = None
        self._settled.clear()
        await self._close_session()

    async def _close_session(self) -> None:
        session, self._session, self._rpc = self._session, None, None
        if session is not None:
            await session.close()

    def _require_rpc(self) -> Rpc:
        if self._rpc is None:
            raise SwitchUnavailable(f"switch {self.name} ({self.config.address}) "
                                    f"is not connected")
        return self._rpc

    # ---- pipeline ----------------------------------------------------------------

    async def _ensure_pipeline_locked(self) -> bool:
        state = await ensure_pipeline(self._require_rpc(), self._pipeline, self.is_primary)
        self.installed_cookie = state.installed_cookie
        if state.adopted_p4info is not None:
            self._codec = Codec(P4InfoIndex(state.adopted_p4info))
            self._want = None
        if state.pushed:
            self.stats.pipeline_pushes += 1
        return state.pushed

    # ---- reconcile ---------------------------------------------------------------

    async def _reconcile_locked(self, pipeline_pushed: bool = False,
                                read_switch: bool = True) -> ReconcileResult:
        started = time.monotonic()
        desired = self._desired or DesiredState()
        if not self.is_primary:
            return ReconcileResult(self.name, False, self.role.value,
                                   desired=len(desired.entities))
        if self._want is None:
            self._want = self._normalize(self.codec, desired)
        want = self._want
        mirror, self._mirror = self._mirror, None  # valid again only if every write succeeds
        if read_switch or mirror is None:
            held = await self._read_held()
            self.stats.reads += 1
        else:
            held = mirror
        todo: Plan = plan(want, held)
        result = ReconcileResult(self.name, True, pipeline_pushed=pipeline_pushed,
                                 read_switch=held is not mirror,
                                 held=len(held.entities), desired=len(want.entities))
        self.stats.reconciles += 1
        try:
            for phase in todo.phases:
                rpcs = await self._write_updates(phase)
                self.stats.write_rpcs += rpcs
                self.stats.updates_written += len(phase)
                inserted, modified, deleted = count_phase(phase, held)
                result = replace(result, write_rpcs=result.write_rpcs + rpcs,
                                 inserted=result.inserted + inserted,
                                 modified=result.modified + modified,
                                 deleted=result.deleted + deleted)
            self._mirror = DesiredState(dict(want.entities))
        finally:
            result = replace(result, seconds=time.monotonic() - started)
            self.stats.record(result)
        log.info("switch %s: reconciled: +%d ~%d -%d in %d RPCs, %.3f s", self.name,
                 result.inserted, result.modified, result.deleted, result.write_rpcs,
                 result.seconds)
        return result

    async def _read_held(self) -> DesiredState:
        return decode_all(self.codec, await self.read_entities(read_all_request(self.index)))


async def _builtin_ready(switch: Switch) -> None:
    """The first ready handler: pipeline, then the desired state (primary only)."""
    async with switch._lock:
        if switch.role is Role.DISCONNECTED:
            return
        pushed = await switch._ensure_pipeline_locked()
        # Without a desired state yet (a controller that just started), adopt what
        # the switch holds: reconciling to "nothing" would wipe a working fabric.
        if switch.is_primary and switch.desired is not None:
            await switch._reconcile_locked(pipeline_pushed=pushed)


def _counter_values(entities: list[p4runtime_pb2.Entity]) -> dict[int, CounterValue]:
    return {e.counter_entry.index.index: CounterValue(e.counter_entry.data.packet_count,
                                                      e.counter_entry.data.byte_count)
            for e in entities}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
