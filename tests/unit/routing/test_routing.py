"""Routing: weights from reports with hysteresis, drain, stale -> down, mode switch.

Each test compiles the model to the switch entries, so it checks what the
switches would be told, not only the router's bookkeeping.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.manual_clock import Clock
from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.entries import Exact, ProfileGroup, TableEntry
from tokenfabric.controller.fabric import load_fabric
from tokenfabric.controller.model import BackendState, SelectionMode
from tokenfabric.controller.policy.schema import load_policy
from tokenfabric.controller.routing import MAX_GROUP_WEIGHT, Router, headroom, scale_weights

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def setup():
    model = load_fabric(EXAMPLES / "fabric-single.yaml")  # gpu1 capacity 16, gpu2 capacity 8
    model.policy = load_policy(EXAMPLES / "policy-tenants.yaml", model)
    clock = Clock(1000.0)
    return model, Router(model, report_interval=1.0, stale_after=3, clock=clock), clock


def group(model, service="llama"):
    states = compile_model(model)
    sid = model.services[service].service_id
    return states["s1"].entities.get(("group", "backend_selector", sid))


def weights(model) -> dict[int, int]:
    g = group(model)
    return dict(g.members) if g else {}


def pairs(model) -> set[tuple[int, int]]:
    return {(dict(e.action.params)["first_backend"], dict(e.action.params)["second_backend"])
            for e in compile_model(model)["s1"].entities.values()
            if isinstance(e, TableEntry) and e.table == "p2c_pairs"}


def report(router, name, running=0, waiting=0, kv=0.0, **kw):
    return router.on_report(name, running=running, waiting=waiting, kv_cache_usage=kv, **kw)


def test_headroom_formula():
    model, _, _ = setup()
    b = model.backends["gpu1-llama"]  # capacity 16
    assert headroom(b, 0, 0, 0.0) == 100
    assert headroom(b, 8, 0, 0.1) == 50  # occupancy 0.5 dominates
    assert headroom(b, 2, 0, 0.75) == 25  # the KV cache dominates
    assert headroom(b, 16, 10, 0.2) == 5  # saturated: the floor keeps it in the group


def test_scale_weights_is_small_proportional_and_bounded():
    assert scale_weights({"a": 16, "b": 8}) == {"a": 2, "b": 1}
    assert scale_weights({"a": 200, "b": 800}) == {"a": 1, "b": 4}
    assert scale_weights({"a": 100, "b": 5}) == {"a": 17, "b": 1}
    w = scale_weights({"a": 1600, "b": 500, "c": 37})
    assert sum(w.values()) <= MAX_GROUP_WEIGHT and min(w.values()) >= 1
    # within one unit of the 64 the total allows (c's minimum of 1 costs the rest)
    assert abs(w["a"] / sum(w.values()) - 1600 / 2137) <= 1 / sum(w.values())
    many = scale_weights({str(i): 1 for i in range(100)})
    assert set(many.values()) == {1}


def test_initial_weights_follow_capacity():
    model, _, _ = setup()
    assert weights(model) == {1: 2, 2: 1}


def test_weights_move_with_load_and_only_beyond_the_hysteresis_band():
    model, router, _ = setup()
    assert report(router, "gpu1-llama") is True  # first report sets headroom 100
    assert report(router, "gpu2-llama") is True
    before = compile_model(model)
    # small movements (< 15 points of headroom) change nothing: no write to the switch
    assert report(router, "gpu1-llama", running=2) is False  # headroom 88
    assert report(router, "gpu2-llama", kv=0.1) is False  # headroom 90
    assert compile_model(model)["s1"].diff(before["s1"]) == ([], [], [])
    # gpu1 gets busy: 12 of 16 running -> headroom 25, beyond the band
    assert report(router, "gpu1-llama", running=12) is True
    after = compile_model(model)
    ins, mod, dele = after["s1"].diff(before["s1"])
    assert ins == [] and dele == []
    assert [type(e) for e in mod] == [ProfileGroup]  # only the selector's weights
    w = dict(mod[0].members)
    # shares 16*25 : 8*100 = 1 : 2
    assert w[2] == 2 * w[1]
    # back and forth within the band around the written value: nothing
    assert report(router, "gpu1-llama", running=10) is False  # 38, |38-25| < 15
    assert report(router, "gpu1-llama", running=14) is False  # 12


def test_drain_takes_the_backend_out_of_new_choices_but_keeps_delivery():
    model, router, _ = setup()
    for name in model.backends:
        report(router, name)
    assert router.drain("gpu2-llama") is True
    assert model.backends["gpu2-llama"].state == BackendState.DRAINING
    assert weights(model) == {1: 1}
    assert pairs(model) == {(1, 0xFFFF)}
    # the backend entry stays: pinned connections keep reaching it
    entries = compile_model(model)["s1"].entities
    assert ("table", "backend", (("backend_id", Exact(2)),), 0) in entries
    assert router.drain("gpu2-llama") is False  # already draining
    # reports do not undrain it
    assert report(router, "gpu2-llama") is False
    assert model.backends["gpu2-llama"].state == BackendState.DRAINING
    assert router.undrain("gpu2-llama") is True
    assert weights(model) == {1: 2, 2: 1}
    assert pairs(model) == {(1, 2), (2, 1)}


def test_the_stateless_answer_moves_with_the_backend_set_only():
    """A stateless packet takes its pair slot's first candidate (select.p4): the slots
    must not change with the weights the load reports move, only with the set."""
    model, router, clock = setup()

    def slots() -> dict[int, int]:
        return {dict(e.match)["slot"].value: dict(e.action.params)["first_backend"]
                for e in compile_model(model)["s1"].entities.values()
                if isinstance(e, TableEntry) and e.table == "p2c_pairs"}

    for name in model.backends:
        report(router, name)
    before = slots()
    assert set(before.values()) == {1, 2}
    seen_weights = []
    for busy_gpu1, busy_gpu2 in [(12, 0), (0, 6), (16, 8), (0, 0)]:
        clock.now += 1.0
        changed = report(router, "gpu1-llama", running=busy_gpu1)
        changed |= report(router, "gpu2-llama", running=busy_gpu2)
        assert changed, "the weights moved"
        seen_weights.append(weights(model))
        assert slots() == before
    assert len({tuple(sorted(w.items())) for w in seen_weights}) >= 3
    router.drain("gpu2-llama")
    assert set(slots().values()) == {1}


def test_drain_of_every_backend_removes_the_group_and_pairs():
    model, router, _ = setup()
    router.drain("gpu1-llama")
    router.drain("gpu2-llama")
    entities = compile_model(model)["s1"].entities
    assert group(model) is None
    assert ("table", "service_pool", (("service_id", Exact(1)),), 0) not in entities
    assert pairs(model) == set()


def test_stale_reports_mark_a_backend_down_within_three_intervals():
    model, router, clock = setup()
    assert router.stale_seconds == 3.0
    for name in model.backends:
        report(router, name)
    clock.now += 2.9
    report(router, "gpu1-llama")  # gpu1 keeps reporting, gpu2 stops
    assert router.tick() == []
    clock.now += 0.2  # gpu2: 3.1 s since its last report
    assert router.tick() == ["gpu2-llama"]
    assert model.backends["gpu2-llama"].state == BackendState.DOWN
    assert model.backends["gpu1-llama"].state == BackendState.ACTIVE
    assert weights(model) == {1: 1}
    assert router.tick() == []  # no flapping
    # its next report brings it back
    assert report(router, "gpu2-llama") is True
    assert model.backends["gpu2-llama"].state == BackendState.ACTIVE
    assert weights(model) == {1: 2, 2: 1}


def test_a_backend_never_heard_from_is_down_after_the_same_time():
    model, router, clock = setup()
    assert router.tick() == []  # first sight starts its clock
    clock.now += 3.01
    assert sorted(router.tick()) == ["gpu1-llama", "gpu2-llama"]


def test_a_draining_backend_that_goes_stale_comes_back_draining():
    model, router, clock = setup()
    for name in model.backends:
        report(router, name)
    router.drain("gpu2-llama")
    clock.now += 3.5
    report(router, "gpu1-llama")
    router.tick()
    assert model.backends["gpu2-llama"].state == BackendState.DOWN
    report(router, "gpu2-llama")
    assert model.backends["gpu2-llama"].state == BackendState.DRAINING


def test_unhealthy_report_marks_down():
    model, router, _ = setup()
    report(router, "gpu1-llama")
    assert report(router, "gpu1-llama", healthy=False) is True
    assert model.backends["gpu1-llama"].state == BackendState.DOWN
    assert report(router, "gpu1-llama") is True
    assert model.backends["gpu1-llama"].state == BackendState.ACTIVE


def test_mode_switch_is_one_modify_of_the_service_entry():
    model, router, _ = setup()
    before = compile_model(model)
    assert router.set_mode("llama", "p2c") is True
    assert router.set_mode("llama", SelectionMode.P2C) is False
    ins, mod, dele = compile_model(model)["s1"].diff(before["s1"])
    assert ins == [] and dele == [] and len(mod) == 1
    (entry,) = mod
    assert entry.table == "service" and dict(entry.action.params)["mode"] == 1
    old = before["s1"].entities[entry.key()]
    assert {k: v for k, v in entry.action.params if k != "mode"} == \
           {k: v for k, v in old.action.params if k != "mode"}
    with pytest.raises(ValueError):
        router.set_mode("llama", "round-robin")


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9, 64, 100, 300])
def test_p2c_pairs_are_distinct_and_balanced(n):
    from collections import Counter

    from tokenfabric.controller.compile.select import p2c_pairs

    ids = list(range(1, n + 1))
    slots = p2c_pairs(ids, 64)
    assert len(slots) & (len(slots) - 1) == 0 and len(slots) <= 256  # pair_mask + 1
    assert all(a != b for a, b in slots)
    first, second = Counter(a for a, _ in slots), Counter(b for _, b in slots)
    if n <= 256:
        assert set(first) == set(second) == set(ids)  # everyone is a candidate
    assert max(first.values()) - min(first.values()) <= 1
    assert max(second.values()) - min(second.values()) <= 1


def test_unknown_backend_report_is_a_key_error():
    _, router, _ = setup()
    with pytest.raises(KeyError):
        report(router, "nope")
    with pytest.raises(KeyError):
        router.drain("nope")
