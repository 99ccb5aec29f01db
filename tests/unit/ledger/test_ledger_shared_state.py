"""What replicas share in the ledger's database besides usage (issue 18), on both
engines: backend ids chosen in one write transaction (two writers at once agree), and
the operator's changes kept for the next leader."""

from __future__ import annotations

import threading

from tokenfabric.controller.ledger import Ledger

MAX_ID = 6


def test_a_backend_keeps_its_id_and_new_ones_take_the_lowest_free(ledger_target):
    led = Ledger(ledger_target)
    try:
        assert led.allocate_backend_id("gpu2", {1}, MAX_ID) == 2  # 1: a fabric backend
        assert led.allocate_backend_id("gpu3", {1, 2}, MAX_ID) == 3
        assert led.allocate_backend_id("gpu2", {1}, MAX_ID) == 2  # again: the same
        # gpu2 deregistered (not in the model): its id stays reserved for it
        assert led.allocate_backend_id("gpu4", {1, 3}, MAX_ID) == 4
        # the fabric file now gives gpu2's id to a static backend: gpu2 gets another
        assert led.allocate_backend_id("gpu2", {1, 2, 3, 4}, MAX_ID) == 5
        assert led.backend_ids() == {"gpu2": 5, "gpu3": 3, "gpu4": 4}
        # every id handed out once: one not in the model is taken from a remembered name
        assert led.allocate_backend_id("gpu6", {1, 2, 3, 4, 5}, MAX_ID) == 6
        assert led.allocate_backend_id("gpu7", {1, 2, 4, 5, 6}, MAX_ID) == 3
        assert led.backend_ids() == {"gpu2": 5, "gpu4": 4, "gpu6": 6, "gpu7": 3}
        assert led.allocate_backend_id("gpu8", set(range(1, MAX_ID + 1)), MAX_ID) is None
        assert "gpu8" not in led.backend_ids()
    finally:
        led.close()


def test_two_writers_allocating_at_once_agree(ledger_target):
    """Two Ledgers on one database (two replicas), each allocating new names from its
    own thread at the same time, and then each other's names: one id per name, distinct,
    the same from both (on SQLite: two connections to one file, BEGIN IMMEDIATE)."""
    a, b = Ledger(ledger_target), Ledger(ledger_target)
    got: dict[str, dict[str, int | None]] = {"a": {}, "b": {}}
    start = threading.Barrier(2, timeout=10)

    def allocate(led: Ledger, key: str, names: list[str]) -> None:
        start.wait()
        for name in names:
            got[key][name] = led.allocate_backend_id(name, set(), 200)

    names_a = [f"a{i}" for i in range(40)]
    names_b = [f"b{i}" for i in range(40)]
    try:
        threads = [threading.Thread(target=allocate, args=(a, "a", names_a)),
                   threading.Thread(target=allocate, args=(b, "b", names_b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        ids = {**got["a"], **got["b"]}
        assert len(ids) == 80 and len(set(ids.values())) == 80, ids
        for name in names_b:
            assert a.allocate_backend_id(name, set(), 200) == ids[name]
        for name in names_a:
            assert b.allocate_backend_id(name, set(), 200) == ids[name]
        assert a.backend_ids() == b.backend_ids() == ids
    finally:
        a.close()
        b.close()


def test_operator_state_keeps_the_latest_value_per_thing(ledger_target):
    led = Ledger(ledger_target)
    try:
        assert led.operator_state() == []
        led.keep_operator_state("drain", "gpu1", "1", "alice")
        led.keep_operator_state("mode", "llama", "p2c", "alice")
        text = "tenants: []\n# ' \" ; -- hostile text stays exact\n"
        led.keep_operator_state("policy", "", text, "by-rest.yaml")
        led.keep_operator_state("drain", "gpu1", "0", "bob")  # the latest wins
        rows = led.operator_state()
        assert sorted(rows) == sorted([("mode", "llama", "p2c", "alice"),
                                       ("policy", "", text, "by-rest.yaml"),
                                       ("drain", "gpu1", "0", "bob")])
        assert rows[-1] == ("drain", "gpu1", "0", "bob")  # oldest first
    finally:
        led.close()
    again = Ledger(ledger_target)  # it is durable: another process reads it
    try:
        assert ("policy", "", text, "by-rest.yaml") in again.operator_state()
    finally:
        again.close()
