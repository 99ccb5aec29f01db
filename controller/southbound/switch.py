"""One P4Runtime switch: connection, arbitration, pipeline, reads, batched writes, reconcile.

The switch's lifecycle is the organizing idea (as in finsy): a session is a
gRPC channel plus a StreamChannel on which we sent our MasterArbitrationUpdate.
Every time a session comes up, and every time the switch tells us that the
primary changed, the ready handlers run again: the built-in one pushes the
pipeline if the switch's cookie differs from ours and, when we are primary,
reconciles the switch to the last desired state (read, diff, write only the
difference). A session that ends (switch restart, network, primary gone) is
retried with bounded exponential backoff until `stop()`.

Election ids: every controller process has one election id for all its
switches. P4Runtime makes the highest id of the connected controllers the
primary; the others are backups and never write. When the primary's stream
ends the switch promotes the next-highest and tells it with an arbitration
update whose status is OK; its handlers then run and it adopts the switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import grpc
from google.rpc import code_pb2, status_pb2
from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

from controller import log
from controller.entries import DesiredState, Entity, TableEntry
from controller.gctools import gc_paused
from controller.southbound import weights
from controller.southbound.codec import Codec
from controller.southbound.errors import (
    NotPrimaryError,
    PipelineError,
    SouthboundError,
    SwitchUnavailable,
    TranslationError,
    UpdateFailure,
    WriteError,
)
from controller.southbound.p4info import P4InfoIndex, Pipeline
from controller.southbound.plan import DELETE, INSERT, MODIFY, RESET, Plan, Update, plan
from tokenfabric.p4names import Counters, Tables

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # The switch is on 127.0.0.1 or a lab netns: never go through a proxy.
    ("grpc.enable_http_proxy", 0),
]

_UPDATE_TYPES = {INSERT: p4runtime_pb2.Update.INSERT, MODIFY: p4runtime_pb2.Update.MODIFY,
                 DELETE: p4runtime_pb2.Update.DELETE, RESET: p4runtime_pb2.Update.MODIFY}


class Role(enum.Enum):
    DISCONNECTED = "disconnected"
    PRIMARY = "primary"
    BACKUP = "backup"


@dataclass
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
class ReconcileResult:
    """What one apply/reconcile did; `writes` is the number of updates sent."""

    switch: str
    applied: bool
    reason: str = ""  # why not applied: "backup", "disconnected"
    inserted: int = 0
    modified: int = 0
    deleted: int = 0
    write_rpcs: int = 0
    pipeline_pushed: bool = False
    read_switch: bool = True  # False: diffed against this session's mirror, no Read
    held: int = 0  # entities the switch held before
    desired: int = 0
    seconds: float = 0.0

    @property
    def writes(self) -> int:
        return self.inserted + self.modified + self.deleted


@dataclass
class SwitchStats:
    """Counters since the Switch object was made (tests assert on them)."""

    sessions: int = 0  # sessions that got an arbitration answer
    pipeline_pushes: int = 0
    reconciles: int = 0
    reads: int = 0  # full reads of the switch's state
    updates_written: int = 0
    write_rpcs: int = 0
    last: ReconcileResult | None = None
    history: deque = field(default_factory=lambda: deque(maxlen=32))


@dataclass(frozen=True)
class CounterValue:
    packets: int
    bytes: int


Handler = Callable[["Switch"], Awaitable[None]]


def _uint128(value: int) -> p4runtime_pb2.Uint128:
    return p4runtime_pb2.Uint128(high=value >> 64, low=value & (2**64 - 1))


def _from_uint128(value: p4runtime_pb2.Uint128) -> int:
    return (value.high << 64) | value.low


class Switch:
    """A P4Runtime switch driven by this controller process."""

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
        # (codec, {id(entity): (entity, normalized)}) of the last state normalized
        self._normalize_memo: tuple[Codec | None, dict[int, tuple[Entity, Entity]]] = (None, {})
        self._desired: DesiredState | None = None
        self._want: DesiredState | None = None  # _desired normalized for the program
        self._mirror: DesiredState | None = None  # what the switch holds, while known
        self._handlers: list[Handler] = []
        self._channel: grpc.aio.Channel | None = None
        self._stub: p4runtime_pb2_grpc.P4RuntimeStub | None = None
        self._task: asyncio.Task | None = None
        self._lifecycle: asyncio.Task | None = None
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
        await self._close_channel()
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
        want = await asyncio.to_thread(self._normalized_paused, desired) \
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

    async def read_state(self, collapse_weights: bool = True) -> DesiredState:
        """Everything the switch holds: table entries, members, groups, meter configs."""
        held = await self._read_held()
        if self.config.weights == "expand" and collapse_weights:
            return DesiredState({e.key(): e for e in weights.collapse(held.entities.values())})
        return held

    async def ensure_pipeline(self) -> bool:
        """Push our pipeline unless the switch runs it already; True when pushed."""
        async with self._lock:
            return await self._ensure_pipeline_locked()

    async def read_counters(self, name: str,
                            index: int | None = None) -> dict[int, CounterValue]:
        """One cell (index) or the whole array of an indexed counter."""
        info = self.index.counter(name)
        pb = p4runtime_pb2.Entity()
        pb.counter_entry.counter_id = info.id
        if index is not None:
            if not 0 <= index < info.size:
                raise TranslationError(f"counter {info.name} index {index} not in "
                                       f"0..{info.size - 1}")
            pb.counter_entry.index.index = index
        out = {}
        for entity in await self.read_entities([pb]):
            entry = entity.counter_entry
            out[entry.index.index] = CounterValue(entry.data.packet_count, entry.data.byte_count)
        return out

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
            pb = p4runtime_pb2.Entity()
            pb.counter_entry.counter_id = info.id
            pb.counter_entry.index.index = index
            entities.append(pb)
        return {e.counter_entry.index.index: CounterValue(e.counter_entry.data.packet_count,
                                                          e.counter_entry.data.byte_count)
                for e in await self.read_entities(entities)}

    async def read_port_bytes(self) -> dict[int, int]:
        """Per port a backend sits on: the bytes the switch forwarded from it, i.e. with
        DSR the backend's replies (the `reply_bytes` cell that the port's `reply_source`
        entry names; docs/ledger.md). The same answer as an OpenFlow switch's port
        statistics, so the billing cross-check has one code path for both."""
        cells: dict[int, int] = {}  # port -> backend id
        for entity in (self._desired or DesiredState()).entities.values():
            if isinstance(entity, TableEntry) and entity.table == Tables.REPLY_SOURCE:
                port = dict(entity.match)["ingress_port"]
                cells[port.value] = dict(entity.action.params)["backend_id"]
        counts = await self.read_counter_cells(Counters.REPLY_BYTES, set(cells.values()))
        return {port: counts[bid].bytes if bid in counts else 0
                for port, bid in sorted(cells.items())}

    async def read_direct_counters(self, table: str) -> dict[tuple, CounterValue]:
        """The direct counter of every entry of `table`, by the entry's TableEntry.key()."""
        info = self.index.table(table)
        if not info.direct_counter_ids:
            raise TranslationError(f"table {info.name} has no direct counter")
        pb = p4runtime_pb2.Entity()
        pb.direct_counter_entry.table_entry.table_id = info.id
        out = {}
        for entity in await self.read_entities([pb]):
            entry = entity.direct_counter_entry
            out[self.codec.decode_key(entry.table_entry)] = CounterValue(
                entry.data.packet_count, entry.data.byte_count)
        return out

    async def read_meters(self, name: str | None = None) -> DesiredState:
        """The configured cells of one meter (or of all meters)."""
        infos = [self.index.meter(name)] if name else self.index.meters()
        entities = []
        for info in infos:
            pb = p4runtime_pb2.Entity()
            pb.meter_entry.meter_id = info.id
            entities.append(pb)
        return self._decode_all(await self.read_entities(entities))

    async def read_entities(self, entities: list[p4runtime_pb2.Entity]) \
            -> list[p4runtime_pb2.Entity]:
        """A raw P4Runtime Read of (wildcard) entities."""
        if not entities:
            return []
        stub = self._require_stub()
        request = p4runtime_pb2.ReadRequest(device_id=self.config.device_id,
                                            entities=entities)
        if self.config.role_name:
            request.role = self.config.role_name
        out: list[p4runtime_pb2.Entity] = []
        try:
            async for response in stub.Read(request, timeout=self.config.rpc_timeout):
                out.extend(response.entities)
        except grpc.aio.AioRpcError as exc:
            raise SouthboundError(f"switch {self.name}: Read failed: {exc.code().name} "
                                  f"{exc.details()}") from None
        return out

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
        rpcs = 0
        size = max(1, self.config.batch_size)
        for start in range(0, len(updates), size):
            await self._write_batch(updates[start:start + size])
            rpcs += 1
        return rpcs

    def status(self) -> dict:
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
            "last_reconcile": None if last is None else {
                "applied": last.applied, "reason": last.reason, "inserted": last.inserted,
                "modified": last.modified, "deleted": last.deleted, "seconds": last.seconds},
            "last_error": self.last_error,
        }

    # ---- session and lifecycle ---------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._arbitrated = False
            try:
                await self._session()
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

    async def _session(self) -> None:
        """One channel + stream; returns (or raises) when the stream ends."""
        # gRPC's own reconnect backoff (1 s and up by default) would add to ours
        first, most = int(self.config.backoff_initial * 1000), int(self.config.backoff_max * 1000)
        backoff_ms = [("grpc.initial_reconnect_backoff_ms", first),
                      ("grpc.min_reconnect_backoff_ms", first),
                      ("grpc.max_reconnect_backoff_ms", most)]
        self._channel = grpc.aio.insecure_channel(self.config.address,
                                                  options=GRPC_OPTIONS + backoff_ms)
        await asyncio.wait_for(self._channel.channel_ready(), self.config.connect_timeout)
        self._stub = p4runtime_pb2_grpc.P4RuntimeStub(self._channel)
        stream = self._stub.StreamChannel()
        request = p4runtime_pb2.StreamMessageRequest()
        arbitration = request.arbitration
        arbitration.device_id = self.config.device_id
        arbitration.election_id.CopyFrom(_uint128(self.config.election_id))
        if self.config.role_name:
            arbitration.role.name = self.config.role_name
        await stream.write(request)
        first = await asyncio.wait_for(stream.read(), self.config.connect_timeout)
        if first is grpc.aio.EOF:
            raise SwitchUnavailable(f"switch {self.name}: stream closed during arbitration")
        if not first.HasField("arbitration"):
            raise SwitchUnavailable(f"switch {self.name}: expected an arbitration answer, "
                                    f"got {first.WhichOneof('update')}")
        self.stats.sessions += 1
        self._arbitrated = True
        self._on_arbitration(first.arbitration, new_session=True)
        while True:
            message = await stream.read()
            if message is grpc.aio.EOF:
                log.warning("switch %s: stream closed by the switch", self.name)
                return
            which = message.WhichOneof("update")
            if which == "arbitration":
                self._on_arbitration(message.arbitration, new_session=False)
            elif which == "error":
                log.warning("switch %s: stream error: %s", self.name, message.error)
            else:
                log.debug("switch %s: ignoring stream message %s", self.name, which)

    def _on_arbitration(self, update: p4runtime_pb2.MasterArbitrationUpdate,
                        new_session: bool) -> None:
        self.primary_election_id = _from_uint128(update.election_id)
        role = Role.PRIMARY if update.status.code == code_pb2.OK else Role.BACKUP
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
        await self._close_channel()

    async def _close_channel(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)

    def _require_stub(self) -> p4runtime_pb2_grpc.P4RuntimeStub:
        if self._stub is None:
            raise SwitchUnavailable(f"switch {self.name} ({self.config.address}) "
                                    f"is not connected")
        return self._stub

    # ---- pipeline ----------------------------------------------------------------

    async def _get_installed(self, response_type: int) \
            -> p4runtime_pb2.ForwardingPipelineConfig | None:
        stub = self._require_stub()
        request = p4runtime_pb2.GetForwardingPipelineConfigRequest(
            device_id=self.config.device_id, response_type=response_type)
        try:
            response = await stub.GetForwardingPipelineConfig(
                request, timeout=self.config.rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                return None  # the switch runs no program yet
            raise
        return response.config

    async def _ensure_pipeline_locked(self) -> bool:
        Get = p4runtime_pb2.GetForwardingPipelineConfigRequest
        if self._pipeline is None:
            # Adopt the switch's program (a controller given no program, or a reader).
            config = await self._get_installed(Get.P4INFO_AND_COOKIE)
            if config is None or not config.HasField("p4info"):
                raise PipelineError(f"switch {self.name} runs no P4 program and none was given")
            self.installed_cookie = config.cookie.cookie if config.HasField("cookie") else None
            self._codec = Codec(P4InfoIndex(config.p4info))
            self._want = None
            return False
        config = await self._get_installed(Get.COOKIE_ONLY)
        installed = config.cookie.cookie if config is not None and config.HasField("cookie") \
            else None
        self.installed_cookie = installed
        if installed == self._pipeline.cookie:
            log.info("switch %s: pipeline cookie %#x already installed", self.name, installed)
            return False
        if not self.is_primary:
            log.info("switch %s: runs cookie %s, not ours, but we are backup: not pushing",
                     self.name, installed)
            return False
        request = p4runtime_pb2.SetForwardingPipelineConfigRequest(
            device_id=self.config.device_id,
            action=p4runtime_pb2.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT)
        request.election_id.CopyFrom(_uint128(self.config.election_id))
        if self.config.role_name:
            request.role = self.config.role_name
        request.config.p4info.CopyFrom(self._pipeline.p4info)
        request.config.p4_device_config = self._pipeline.device_config
        request.config.cookie.cookie = self._pipeline.cookie
        try:
            await self._require_stub().SetForwardingPipelineConfig(
                request, timeout=max(self.config.rpc_timeout, 60.0))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise NotPrimaryError(f"switch {self.name}: not primary: {exc.details()}") \
                    from None
            raise PipelineError(f"switch {self.name} refused the pipeline: "
                                f"{exc.code().name} {exc.details()}") from None
        self.installed_cookie = self._pipeline.cookie
        self.stats.pipeline_pushes += 1
        log.info("switch %s: pushed pipeline cookie %#x (was %s)", self.name,
                 self._pipeline.cookie, None if installed is None else hex(installed))
        return True

    # ---- reconcile ---------------------------------------------------------------

    def _normalized_paused(self, desired: DesiredState) -> DesiredState:
        with gc_paused():  # tens of thousands of new objects: see controller/gctools.py
            return self._normalized(desired)

    def _normalized(self, desired: DesiredState) -> DesiredState:
        entities: Iterable[Entity] = desired.entities.values()
        if self.config.weights == "expand":
            entities = weights.expand(entities)
        # The compiler hands the same entity objects again while the policy is the same
        # (thousands of tenant entries): normalize each object once, not at every push.
        codec = self.codec
        memo = self._normalize_memo if self._normalize_memo[0] is codec else (codec, {})
        seen: dict[int, tuple[Entity, Entity]] = {}
        out = DesiredState()
        for entity in entities:
            hit = memo[1].get(id(entity))
            normal = hit[1] if hit is not None and hit[0] is entity else codec.normalize(entity)
            seen[id(entity)] = (entity, normal)  # holds entity: its id stays its own
            out.add(normal)
        self._normalize_memo = (codec, seen)
        return out

    async def _reconcile_locked(self, pipeline_pushed: bool = False,
                                read_switch: bool = True) -> ReconcileResult:
        started = time.monotonic()
        desired = self._desired or DesiredState()
        if not self.is_primary:
            return ReconcileResult(self.name, False, self.role.value,
                                   desired=len(desired.entities))
        if self._want is None:
            self._want = self._normalized(desired)
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
                result.write_rpcs += rpcs
                self.stats.write_rpcs += rpcs
                self.stats.updates_written += len(phase)
                for update in phase:
                    if update.type == INSERT:
                        result.inserted += 1
                    elif update.type in (DELETE, RESET):
                        result.deleted += 1
                    else:
                        # a meter cell set for the first time counts as an insert
                        key = update.entity.key()
                        if key in held.entities:
                            result.modified += 1
                        else:
                            result.inserted += 1
            self._mirror = DesiredState(dict(want.entities))
        finally:
            result.seconds = time.monotonic() - started
            self.stats.last = result
            self.stats.history.append(result)
        log.info("switch %s: reconciled: +%d ~%d -%d in %d RPCs, %.3f s", self.name,
                 result.inserted, result.modified, result.deleted, result.write_rpcs,
                 result.seconds)
        return result

    async def _read_held(self) -> DesiredState:
        index = self.index
        entities = []
        for table in index.tables():
            if table.is_const:
                continue
            pb = p4runtime_pb2.Entity()
            pb.table_entry.table_id = table.id
            entities.append(pb)
        for profile in index.profiles():
            member = p4runtime_pb2.Entity()
            member.action_profile_member.action_profile_id = profile.id
            entities.append(member)
            if profile.with_selector:
                group = p4runtime_pb2.Entity()
                group.action_profile_group.action_profile_id = profile.id
                entities.append(group)
        for meter in index.meters():
            pb = p4runtime_pb2.Entity()
            pb.meter_entry.meter_id = meter.id
            entities.append(pb)
        # Group id 0: every multicast group (the beacon plane's relays).
        pb = p4runtime_pb2.Entity()
        pb.packet_replication_engine_entry.multicast_group_entry.multicast_group_id = 0
        entities.append(pb)
        return self._decode_all(await self.read_entities(entities))

    def _decode_all(self, pbs: list[p4runtime_pb2.Entity]) -> DesiredState:
        held = DesiredState()
        for pb in pbs:
            if pb.HasField("table_entry") and pb.table_entry.is_default_action:
                continue
            entity = self.codec.decode(pb)
            if entity is not None:
                held.entities[entity.key()] = entity
        return held

    async def _write_batch(self, updates: list[Update]) -> None:
        stub = self._require_stub()
        request = p4runtime_pb2.WriteRequest(
            device_id=self.config.device_id,
            atomicity=p4runtime_pb2.WriteRequest.CONTINUE_ON_ERROR)
        request.election_id.CopyFrom(_uint128(self.config.election_id))
        if self.config.role_name:
            request.role = self.config.role_name
        for update in updates:
            pb = request.updates.add(type=_UPDATE_TYPES[update.type])
            self.codec.encode(update.entity, pb.entity)
            if update.type == RESET:
                pb.entity.meter_entry.ClearField("config")
        try:
            await stub.Write(request, timeout=self.config.rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise NotPrimaryError(f"switch {self.name}: not primary: {exc.details()}") \
                    from None
            raise WriteError(self.name, _failures(exc, updates), len(updates),
                             f"{exc.code().name}: {exc.details()}") from None


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


def _failures(exc: grpc.aio.AioRpcError, updates: list[Update]) -> list[UpdateFailure]:
    """The per-update errors of a failed batch (P4Runtime: google.rpc.Status details)."""
    details = None
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            details = status_pb2.Status.FromString(value)
    failures = []
    if details is not None and len(details.details) == len(updates):
        for i, (any_error, update) in enumerate(zip(details.details, updates, strict=True)):
            error = p4runtime_pb2.Error()
            if not any_error.Unpack(error) or error.canonical_code == code_pb2.OK:
                continue
            failures.append(UpdateFailure(i, update.type, update.entity,
                                          code_pb2.Code.Name(error.canonical_code),
                                          error.message))
    if not failures:  # the batch failed as a whole
        failures = [UpdateFailure(i, u.type, u.entity, exc.code().name, exc.details() or "")
                    for i, u in enumerate(updates)]
    return failures


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
