"""Reload: validate, diff, apply; a failure part-way rolls every switch back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tokenfabric.controller.applier import apply_states
from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.drivers import ReconcileResult
from tokenfabric.controller.entries import DesiredState, Entity
from tokenfabric.controller.fabric import load_fabric
from tokenfabric.controller.policy.reload import reload_policy
from tokenfabric.controller.policy.schema import load_policy

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


class SwitchError(RuntimeError):
    pass


class FakeSwitch:
    """One switch of FakeSwitches: takes a whole desired state, as a driver does."""

    def __init__(self, name: str, fleet: FakeSwitches) -> None:
        self.name, self.fleet = name, fleet

    async def apply(self, desired: DesiredState) -> ReconcileResult:
        return self.fleet.write(self.name, desired)


class FakeSwitches:
    """Switches holding entities by key, written like P4Runtime: the difference between
    what a switch holds and its new desired state, inserts, modifies, then deletes.
    `fail_on=N` makes the N-th write (1-based) apply half its updates, then raise."""

    def __init__(self, states: dict[str, DesiredState], fail_on: int | None = None) -> None:
        self.held = {name: dict(state.entities) for name, state in states.items()}
        self.fail_on = fail_on
        self.writes: list[tuple[str, int, int, int]] = []
        self.switches = {name: FakeSwitch(name, self) for name in states}

    def write(self, switch: str, desired: DesiredState) -> ReconcileResult:
        held = self.held.setdefault(switch, {})
        insert, modify, delete = desired.diff(DesiredState(dict(held)))
        self.writes.append((switch, len(insert), len(modify), len(delete)))
        updates: list[tuple[str, Entity]] = [("insert", e) for e in insert] + \
            [("modify", e) for e in modify] + [("delete", e) for e in delete]
        failing = len(self.writes) == self.fail_on
        if failing:
            updates = updates[: len(updates) // 2]
        for kind, e in updates:
            if kind == "delete":
                held.pop(e.key(), None)
            else:
                held[e.key()] = e
        if failing:
            raise SwitchError(f"{switch}: RESOURCE_EXHAUSTED (injected)")
        return ReconcileResult(switch, True, inserted=len(insert), modified=len(modify),
                               deleted=len(delete))

    def state(self, switch: str) -> dict:
        return self.held[switch]


def leafspine(policy: str = "policy-roce.yaml"):
    model = load_fabric(EXAMPLES / "fabric-leafspine.yaml")
    model.policy = load_policy(EXAMPLES / policy, model)
    return model


NEW_POLICY = (EXAMPLES / "policy-roce.yaml").read_text().replace(
    "tenants:\n", "tenants:\n  - name: newcomer\n    prefixes: [10.0.9.0/24]\n"
    "    contract: bulk\n").replace("tpm: 600000", "tpm: 1200000")


async def test_a_good_reload_writes_only_the_difference(tmp_path):
    model = leafspine()
    old = compile_model(model)
    switches = FakeSwitches(old)
    path = tmp_path / "policy.yaml"
    path.write_text(NEW_POLICY)
    report = await reload_policy(model, path, switches.switches)
    assert report.ok, report.errors
    new = compile_model(model)
    assert model.policy.tenants["newcomer"].tenant_id == 3
    # existing tenants keep their ids although the new one is listed first
    assert model.policy.tenants["research"].tenant_id == 1
    for name in old:
        assert switches.state(name) == new[name].entities
        # the newcomer's tenant_by_src, tenant_by_dst and tenant_contract entries, and
        # research's tenant_contract modified (its contract's tpm doubled)
        assert report.apply.changes[name] == (3, 1, 0)


async def test_a_bad_file_changes_nothing(tmp_path):
    model = leafspine()
    before = dataclasses.replace(model.policy)
    switches = FakeSwitches(compile_model(model))
    path = tmp_path / "policy.yaml"
    path.write_text(NEW_POLICY.replace("ecn_threshold: 20", "ecn_threshold: -5"))
    report = await reload_policy(model, path, switches.switches)
    assert not report.ok
    assert report.errors == [f"{path}:12: roce.ecn_threshold: must be in 1..524287, got -5"]
    assert switches.writes == []
    assert model.policy == before


@pytest.mark.parametrize("fail_on", [1, 2, 3])
async def test_failure_on_the_nth_switch_rolls_every_switch_back(tmp_path, fail_on):
    model = leafspine()
    old = compile_model(model)
    switches = FakeSwitches(old, fail_on=fail_on)
    path = tmp_path / "policy.yaml"
    path.write_text(NEW_POLICY)
    policy_before = model.policy
    report = await reload_policy(model, path, switches.switches)
    assert not report.ok
    names = sorted(old)
    assert report.apply.failed_switch == names[fail_on - 1]
    assert "RESOURCE_EXHAUSTED" in report.errors[0]
    # every switch written (the failing one too) got the reverse diff, last first
    assert report.apply.rolled_back == list(reversed(names[:fail_on]))
    assert report.apply.rollback_errors == {}
    for name in names:
        assert switches.state(name) == old[name].entities, name
    assert model.policy is policy_before
    assert [w[0] for w in switches.writes] == names[:fail_on] + list(reversed(names[:fail_on]))


async def test_apply_states_reports_a_failing_rollback():
    model = leafspine()
    old = compile_model(model)
    model.services["llama"].vip = "10.0.100.9"
    new = compile_model(model)
    switches = FakeSwitches(old)
    calls = []

    class Flaky(FakeSwitch):
        async def apply(self, desired: DesiredState) -> ReconcileResult:
            calls.append(self.name)
            if len(calls) in (2, 3):  # leaf2 fails, then its rollback fails too
                raise SwitchError("switch went away")
            return await super().apply(desired)

    flaky = {name: Flaky(name, switches) for name in old}
    report = await apply_states(flaky, old, new)
    assert not report.ok and report.failed_switch == "leaf2"
    assert report.rolled_back == ["leaf1"]
    assert set(report.rollback_errors) == {"leaf2"}
    assert switches.state("leaf1") == old["leaf1"].entities


async def test_only_changed_switches_are_given_a_state():
    model = leafspine()
    old = compile_model(model)
    switches = FakeSwitches(old)
    report = await apply_states(switches.switches, old, compile_model(model))
    assert report.ok and report.changes == {} and switches.writes == []
    # a switch the controller has no driver for counts as given
    report = await apply_states({}, {}, old)
    assert report.ok and set(report.changes) == set(old)


async def test_reload_from_text_names_the_given_file():
    model = leafspine()
    switches = FakeSwitches(compile_model(model))
    report = await reload_policy(model, "", switches.switches, text="tenants: [1]\n",
                                 file="upload.yaml")
    assert report.errors == ["upload.yaml:1: tenants[0]: must be a mapping, got an integer"]
    assert report.summary()["ok"] is False


async def test_router_changes_are_written_and_the_old_state_kept_on_failure():
    from tokenfabric.controller.routing import Router

    model = leafspine()
    current = compile_model(model)
    switches = FakeSwitches(current)
    router = Router(model)
    assert router.drain("gpu1-llama")
    new = compile_model(model)
    report = await apply_states(switches.switches, current, new)
    assert report.ok
    assert all(switches.state(n) == new[n].entities for n in new)
    # every switch changes its selector group and pairs for service llama
    assert set(report.changes) == {"leaf1", "leaf2", "spine1"}
    router.undrain("gpu1-llama")
    switches.fail_on = len(switches.writes) + 2
    report = await apply_states(switches.switches, new, compile_model(model))
    assert not report.ok and report.rolled_back == ["leaf2", "leaf1"]
    assert all(switches.state(n) == new[n].entities for n in new)


async def test_a_new_class_keeps_the_numbers_of_the_others(tmp_path):
    """A contract named to sort first, with a class of its own: no tenant is rewritten."""
    model = leafspine()
    before = dict(model.policy.class_ids)
    old = compile_model(model)
    switches = FakeSwitches(old)
    path = tmp_path / "policy.yaml"
    path.write_text((EXAMPLES / "policy-roce.yaml").read_text().replace(
        "contracts:\n", "contracts:\n  aaa-voice:\n    class: {service_class: telephony, "
        "priority_level: 10}\n    tpm: 6000\n"))
    report = await reload_policy(model, path, switches.switches)
    assert report.ok, report.errors
    for key, tclass in before.items():
        assert model.policy.class_ids[key] == tclass
    assert model.policy.class_ids[(46, 5)] not in before.values()
    # the class's class_qos entry and, as a tenant trusts DSCP, its dscp_class entry;
    # nothing modified or deleted
    assert all(c == (2, 0, 0) for c in report.apply.changes.values()), report.apply.changes
