"""Count's entries: each port a backend sits on names the reply_bytes cell of the
lowest backend id there (backends sharing a port share its bytes)."""

from __future__ import annotations

from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.entries import Action, Exact, TableEntry
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.p4names import Actions, Tables

FABRIC = """
switches:
  s1: {address: "127.0.0.1:9559", device_id: 0, mac: "02:00:00:00:01:00"}
hosts:
  clients: {switch: s1, port: 1, address: 10.0.1.0, prefix_len: 24, mac: "02:00:00:00:00:01"}
  gpu1: {switch: s1, port: 3, address: 10.0.0.11, mac: "02:00:00:00:00:11"}
  gpu2: {switch: s1, port: 4, address: 10.0.0.12, mac: "02:00:00:00:00:12"}
backends:
  b7: {id: 7, host: gpu1, capacity: 10, models: [m]}
  b3: {id: 3, host: gpu1, capacity: 10, models: [m]}
  b5: {id: 5, host: gpu2, capacity: 10, models: [m]}
"""


def reply_entries(state) -> list[TableEntry]:  # noqa: ANN001
    return sorted(e for e in state.entities.values()
                  if isinstance(e, TableEntry) and e.table == Tables.REPLY_SOURCE)


def test_one_entry_per_backend_port_for_its_lowest_backend():
    states = compile_model(parse_fabric(FABRIC))
    assert reply_entries(states["s1"]) == [
        TableEntry.of(Tables.REPLY_SOURCE, {"ingress_port": Exact(port)},
                      Action.of(Actions.COUNT_REPLY, backend_id=backend))
        for port, backend in ((3, 3), (4, 5))]  # not the clients' port 1
