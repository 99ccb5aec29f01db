"""Ordering of reconcile phases and weight expansion (no switch involved)."""

from __future__ import annotations

import pytest

from tokenfabric.controller.entries import (
    Action,
    DesiredState,
    Exact,
    GroupRef,
    MeterConfig,
    ProfileGroup,
    ProfileMember,
    TableEntry,
)
from tokenfabric.controller.southbound import TranslationError
from tokenfabric.controller.southbound.plan import DELETE, INSERT, MODIFY, RESET, meters_match, plan
from tokenfabric.controller.southbound.weights import collapse, copy_id, expand


def state(*entities) -> DesiredState:
    out = DesiredState()
    for entity in entities:
        out.add(entity)
    return out


MEMBER = ProfileMember("ap", 1, Action.of("fwd", port=1))
GROUP = ProfileGroup("ap", 7, ((1, 1),))
ENTRY = TableEntry.of("t", {"k": Exact(1)}, GroupRef(7))
METER = MeterConfig("m", 1, 100, 10, 200, 20)


def test_inserts_go_members_groups_entries():
    todo = plan(state(ENTRY, GROUP, MEMBER, METER), DesiredState())
    assert [[(u.type, type(u.entity).__name__) for u in phase] for phase in todo.phases] == [
        [(INSERT, "ProfileMember")], [(INSERT, "ProfileGroup")],
        [(MODIFY, "MeterConfig"), (INSERT, "TableEntry")]]
    assert (todo.inserts, todo.modifies, todo.deletes) == (4, 0, 0)


def test_deletes_go_entries_groups_members():
    todo = plan(DesiredState(), state(ENTRY, GROUP, MEMBER, METER))
    assert [[(u.type, type(u.entity).__name__) for u in phase] for phase in todo.phases] == [
        [(RESET, "MeterConfig"), (DELETE, "TableEntry")], [(DELETE, "ProfileGroup")],
        [(DELETE, "ProfileMember")]]


def test_equal_states_need_nothing_and_meter_rounding_is_tolerated():
    assert plan(state(ENTRY, GROUP, MEMBER), state(MEMBER, GROUP, ENTRY)).phases == []
    rounded = MeterConfig("m", 1, 99, 10, 199, 20)  # a target storing rates per microsecond
    assert meters_match(METER, rounded)
    assert plan(state(METER), state(rounded)).phases == []
    assert not meters_match(METER, MeterConfig("m", 1, 150, 10, 200, 20))


def test_regrouping_writes_new_members_before_and_drops_old_after():
    new_member = ProfileMember("ap", 2, Action.of("fwd", port=2))
    regrouped = ProfileGroup("ap", 7, ((2, 1),))
    todo = plan(state(new_member, regrouped, ENTRY), state(MEMBER, GROUP, ENTRY))
    assert [[(u.type, u.entity) for u in phase] for phase in todo.phases] == [
        [(INSERT, new_member)], [(MODIFY, regrouped)], [(DELETE, MEMBER)]]


def test_expand_and_collapse_weights():
    m2 = ProfileMember("ap", 2, Action.of("fwd", port=2))
    group = ProfileGroup("ap", 7, ((1, 3), (2, 1)))
    expanded = expand([MEMBER, m2, group])
    copies = sorted(e.member_id for e in expanded
                    if isinstance(e, ProfileMember) and e.member_id > 2)
    assert copies == [copy_id(1, 1), copy_id(1, 2)]
    [wide] = [e for e in expanded if isinstance(e, ProfileGroup)]
    assert all(w == 1 for _, w in wide.members) and len(wide.members) == 4
    assert sorted(collapse(expanded), key=repr) == sorted([MEMBER, m2, group], key=repr)


def test_expand_refuses_unknown_member_and_reserved_ids():
    with pytest.raises(TranslationError, match="not in the desired state"):
        expand([ProfileGroup("ap", 7, ((5, 2),))])
    with pytest.raises(TranslationError, match="reserved for weight copies"):
        expand([ProfileMember("ap", copy_id(1, 1), Action.of("fwd"))])
