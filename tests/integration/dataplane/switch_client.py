"""The controller's own southbound, driven synchronously for the dataplane tests.

Tests and the benchmark program one switch entity by entity (insert, modify,
delete) and read counters. They do it through controller.southbound.Switch
(session, arbitration, pipeline push, codec, batched writes) so that every
P4Runtime message the tests send is encoded as the controller encodes it; this
module only runs that asyncio object on an event loop of its own thread.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from tokenfabric.controller.entries import DesiredState, Entity, MeterConfig
from tokenfabric.controller.southbound.p4info import Pipeline
from tokenfabric.controller.southbound.plan import DELETE, INSERT, MODIFY, Update
from tokenfabric.controller.southbound.switch import Role, Switch, SwitchConfig

T = TypeVar("T")
TIMEOUT = 60.0
# A fresh cookie per load makes the Switch push the program even when the switch
# runs it already: a push is what resets tables, counters and registers.
_cookies = itertools.count(1)


class SwitchClient:
    """One primary session to one device, with the pipeline pushed by `set_pipeline`."""

    def __init__(self, address: str, device_id: int = 0, election_id: int = 1) -> None:
        self.address, self.device_id, self.election_id = address, device_id, election_id
        self.switch: Switch | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"switch-client-{address}")
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(TIMEOUT)

    def set_pipeline(self, bmv2_json: Path, p4info: Path) -> None:
        """Push the program; this also resets every register, counter and table."""
        pipeline = Pipeline.from_files(p4info, bmv2_json)
        pipeline = replace(pipeline, cookie=next(_cookies))
        self._run(self._connect(pipeline))

    async def _connect(self, pipeline: Pipeline) -> None:
        if self.switch is not None:
            await self.switch.stop()
        self.switch = Switch(SwitchConfig(name=self.address, address=self.address,
                                          device_id=self.device_id,
                                          election_id=self.election_id, pipeline=pipeline))
        await self.switch.start()
        await self.switch.wait_role(Role.PRIMARY, timeout=TIMEOUT)
        if self.switch.stats.pipeline_pushes != 1:
            raise RuntimeError(f"{self.address}: the pipeline was not pushed "
                               f"({self.switch.last_error})")

    def _switch(self) -> Switch:
        if self.switch is None:
            raise RuntimeError("no pipeline pushed yet")
        return self.switch

    # -- writes: one batch each ---------------------------------------------

    def insert(self, *entities: Entity) -> None:
        self.write(INSERT, entities)

    def modify(self, *entities: Entity) -> None:
        self.write(MODIFY, entities)

    def delete(self, *entities: Entity) -> None:
        self.write(DELETE, entities)

    def write(self, kind: str, entities: Iterable[Entity]) -> None:
        switch = self._switch()
        # MeterConfig cells exist from the start: they can only be modified.
        updates = [Update(MODIFY if isinstance(e, MeterConfig) else kind,
                          switch.codec.normalize(e)) for e in entities]
        self._run(switch.write(updates))

    def apply(self, state: DesiredState) -> None:
        """The controller's reconcile: read what the switch holds, write the difference."""
        result = self._run(self._switch().apply(state))
        if not result.applied:
            raise RuntimeError(f"{self.address}: not applied: {result}")

    def reconcile(self) -> tuple[int, int, int]:
        """Read the switch back and write what differs: (inserted, modified, deleted)."""
        result = self._run(self._switch().reconcile())
        return result.inserted, result.modified, result.deleted

    # -- reads ----------------------------------------------------------------

    def counter(self, name: str, index: int) -> tuple[int, int]:
        """(packets, bytes) of one cell of an indexed counter."""
        cell = self._run(self._switch().read_counters(name, index))[index]
        return cell.packets, cell.bytes

    def packets(self, name: str, index: int) -> int:
        return self.counter(name, index)[0]

    def counter_cells(self, name: str) -> dict[int, tuple[int, int]]:
        """Every cell of an indexed counter: index -> (packets, bytes)."""
        cells = self._run(self._switch().read_counters(name))
        return {index: (c.packets, c.bytes) for index, c in cells.items()}

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        if self.switch is not None:
            self._run(self.switch.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> SwitchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
