"""The southbound against the in-process P4Runtime server (fake_p4rt_server.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.southbound.conftest import FAST
from tests.integration.southbound.fake_p4rt_server import FakeP4RuntimeServer
from tests.integration.southbound.helpers import (
    held_on_fake,
    ip,
    mini_pipeline,
    mini_state,
    normalized,
)
from tokenfabric.controller.entries import (
    Action,
    DesiredState,
    Exact,
    GroupRef,
    Lpm,
    MemberRef,
    MulticastGroup,
    ProfileGroup,
    ProfileMember,
    TableEntry,
)
from tokenfabric.controller.southbound import (
    ApplyError,
    NotPrimaryError,
    Role,
    Southbound,
    Switch,
    SwitchConfig,
    TranslationError,
    WriteError,
)
from tokenfabric.controller.southbound.plan import INSERT, Update

pytestmark = pytest.mark.timeout(60)


def make_switch(server, pipeline, election_id=10, name="s1", **options) -> Switch:
    return Switch(SwitchConfig(name=name, address=server.address, device_id=server.device_id,
                               election_id=election_id, pipeline=pipeline,
                               **{**FAST, **options}))


def written_kinds(server) -> list[str]:
    return [u.entity.WhichOneof("entity") for r in server.write_requests for u in r.updates]


def last(items: list, item) -> int:
    return len(items) - 1 - items[::-1].index(item)


async def next_session(switch: Switch, sessions: int, timeout: float = 10) -> None:
    """Wait until `switch` has had a session after `sessions` and settled as primary."""
    deadline = asyncio.get_running_loop().time() + timeout
    while switch.stats.sessions == sessions:
        assert asyncio.get_running_loop().time() < deadline, "no new session"
        await asyncio.sleep(0.02)
    await switch.wait_role(Role.PRIMARY, timeout)


async def started(switch: Switch, role: Role = Role.PRIMARY) -> Switch:
    await switch.start()
    await switch.wait_role(role, timeout=10)
    return switch


async def test_apply_pushes_pipeline_and_writes_once(fake, pipeline):
    switch = await started(make_switch(fake, pipeline))
    try:
        assert fake.set_pipeline_calls == 1
        assert switch.installed_cookie == pipeline.cookie
        desired = mini_state(tenants=5)
        result = await switch.apply(desired)
        assert result.applied
        assert result.inserted == len(desired.entities) and result.modified == 0
        assert held_on_fake(fake, pipeline).entities == normalized(desired, pipeline).entities
        written = fake.updates_written()
        assert written == len(desired.entities)

        again = await switch.apply(desired)
        assert again.applied and again.writes == 0 and again.write_rpcs == 0
        assert fake.updates_written() == written  # nothing rewritten needlessly
        assert await switch.read_state() == normalized(desired, pipeline)
    finally:
        await switch.stop()


async def test_apply_writes_only_the_difference(fake, pipeline):
    switch = await started(make_switch(fake, pipeline))
    try:
        await switch.apply(mini_state(tenants=6, weights=(1, 1, 1)))
        before = fake.updates_written()
        # tenant 6 gone, dscp changed everywhere, backend 2 weighted 3
        changed = mini_state(tenants=5, weights=(1, 3, 1), dscp=20)
        result = await switch.apply(changed)
        assert (result.inserted, result.deleted) == (0, 3)  # classify, qos, meter of tenant 6
        assert result.modified == 5 + 1  # 5 qos entries, the group
        assert fake.updates_written() - before == result.writes == 9
        assert held_on_fake(fake, pipeline).entities == normalized(changed, pipeline).entities
    finally:
        await switch.stop()


async def test_insert_order_members_groups_entries_and_reverse_on_delete(fake, pipeline):
    switch = await started(make_switch(fake, pipeline))
    try:
        await switch.apply(mini_state(tenants=1))
        kinds = written_kinds(fake)
        assert last(kinds, "action_profile_member") < kinds.index("action_profile_group") \
            < kinds.index("table_entry")
        fake.write_requests.clear()
        await switch.apply(DesiredState())
        kinds = written_kinds(fake)
        assert last(kinds, "table_entry") < kinds.index("action_profile_group") \
            < kinds.index("action_profile_member")
        assert fake.entity_count() == 0
    finally:
        await switch.stop()


async def test_batches_respect_batch_size(fake, pipeline):
    switch = await started(make_switch(fake, pipeline, batch_size=7))
    try:
        desired = mini_state(tenants=20)  # 60 entries + meters, 3 members, group, 2 entries
        result = await switch.apply(desired)
        sizes = [len(r.updates) for r in fake.write_requests]
        assert max(sizes) == 7
        assert sum(sizes) == len(desired.entities)
        assert result.write_rpcs == len(fake.write_requests)
        assert all(r.atomicity == r.CONTINUE_ON_ERROR for r in fake.write_requests)
    finally:
        await switch.stop()


async def test_per_update_errors_are_listed_and_the_rest_applied(fake, pipeline):
    switch = await started(make_switch(fake, pipeline))
    try:
        codec = switch.codec
        existing = codec.normalize(TableEntry.of(
            "routes", {"hdr.ipv4.dst_addr": Lpm(ip("10.9.0.0"), 16)}, Action.of("route", port=1)))
        await switch.write([Update(INSERT, existing)])
        fresh = codec.normalize(TableEntry.of(
            "routes", {"hdr.ipv4.dst_addr": Lpm(ip("10.8.0.0"), 16)}, Action.of("route", port=2)))
        dangling = codec.normalize(TableEntry.of(
            "select_backend", {"hdr.ipv4.dst_addr": Exact(5)}, GroupRef(77)))
        with pytest.raises(WriteError) as caught:
            await switch.write([Update(INSERT, existing), Update(INSERT, fresh),
                                Update(INSERT, dangling)])
        error = caught.value
        assert [(f.index, f.code) for f in error.failures] == [(0, "ALREADY_EXISTS"),
                                                               (2, "NOT_FOUND")]
        assert error.failures[0].entity == existing
        assert "2 of 3 updates failed" in str(error) and "GroupRef(group_id=77)" in str(error)
        assert len(fake.state.tables) == 2  # the good update went in (CONTINUE_ON_ERROR)
    finally:
        await switch.stop()


async def test_apply_reports_failing_updates_of_a_reconcile(fake, pipeline):
    switch = await started(make_switch(fake, pipeline))
    try:
        desired = DesiredState()
        # the group lists member 9, which nobody defines: the switch refuses it
        desired.add(ProfileMember("backend_selector", 1, Action.of("forward", port=1,
                                                                    dst_mac=1)))
        desired.add(ProfileGroup("backend_selector", 5, ((1, 1), (9, 1))))
        with pytest.raises(WriteError) as caught:
            await switch.apply(desired)
        assert caught.value.failures[0].code == "NOT_FOUND"
        assert "ProfileGroup" in str(caught.value)
        assert len(fake.state.members) == 1 and not fake.state.groups
    finally:
        await switch.stop()


async def test_bad_entity_fails_before_anything_is_written(fake, pipeline):
    switch = await started(make_switch(fake, pipeline))
    try:
        good = mini_state(tenants=1)
        await switch.apply(good)
        written = fake.updates_written()
        desired = mini_state(tenants=2)
        desired.add(TableEntry.of("classify", {"hdr.ipv4.src_addr": Lpm(2**32, 8)},
                                  Action.of("set_tenant", tenant=1)))
        with pytest.raises(TranslationError, match="does not fit in 32 bits"):
            await switch.apply(desired)
        assert fake.updates_written() == written
        assert switch.desired is good  # the bad state was not remembered either
        bad_table = DesiredState()
        bad_table.add(TableEntry.of("nosuch", {}, Action.of("drop")))
        with pytest.raises(TranslationError, match="unknown table 'nosuch'.*MiniIngress.routes"):
            await switch.apply(bad_table)
    finally:
        await switch.stop()


async def test_several_switches_from_one_process(fakes, pipeline):
    sb = Southbound(election_id=5)
    for i, server in enumerate(fakes):
        sb.add_switch(f"s{i}", server.address, device_id=server.device_id, pipeline=pipeline,
                      **FAST)
    await sb.start()
    try:
        for switch in sb.switches.values():
            await switch.wait_role(Role.PRIMARY)
        states = {f"s{i}": mini_state(tenants=i + 2) for i in range(3)}
        results = await sb.apply(states)
        assert all(r.applied for r in results.values())
        for i, server in enumerate(fakes):
            assert held_on_fake(server, pipeline).entities == \
                normalized(states[f"s{i}"], pipeline).entities
        status = {s["name"]: s for s in sb.status()}
        assert status["s2"]["role"] == "primary" and status["s2"]["updates_written"] == \
            len(states["s2"].entities)
    finally:
        await sb.stop()


async def test_pipeline_not_pushed_when_cookie_matches(fake, pipeline):
    first = await started(make_switch(fake, pipeline))
    await first.stop()
    assert fake.set_pipeline_calls == 1
    second = await started(make_switch(fake, pipeline))
    try:
        assert fake.set_pipeline_calls == 1
        assert second.stats.pipeline_pushes == 0
    finally:
        await second.stop()
    other_program = mini_pipeline(variant=b" ")
    assert other_program.cookie != pipeline.cookie
    third = await started(make_switch(fake, other_program))
    try:
        assert fake.set_pipeline_calls == 2
        assert fake.state.config.cookie.cookie == other_program.cookie
    finally:
        await third.stop()


async def test_backup_stays_passive_and_takes_over(fake, pipeline):
    primary = await started(make_switch(fake, pipeline, election_id=20, name="primary"))
    backup = await started(make_switch(fake, pipeline, election_id=10, name="backup"),
                           Role.BACKUP)
    try:
        desired = mini_state(tenants=3)
        assert (await primary.apply(desired)).applied
        written = fake.updates_written()
        result = await backup.apply(desired)
        assert not result.applied and result.reason == "backup"
        with pytest.raises(NotPrimaryError):
            await backup.write([Update(INSERT, backup.codec.normalize(TableEntry.of(
                "routes", {"hdr.ipv4.dst_addr": Lpm(1 << 24, 8)}, Action.of("drop"))))])
        assert fake.updates_written() == written and fake.set_pipeline_calls == 1
        assert backup.primary_election_id == 20

        await primary.stop()  # its stream ends: the switch promotes the backup
        await backup.wait_role(Role.PRIMARY, timeout=10)
        assert backup.stats.last.applied and backup.stats.last.writes == 0  # adopted
        assert fake.updates_written() == written and fake.set_pipeline_calls == 1
        more = mini_state(tenants=4)
        assert (await backup.apply(more)).inserted == 3

        written = fake.updates_written()
        returning = await started(make_switch(fake, pipeline, election_id=20, name="back"))
        await backup.wait_role(Role.BACKUP, timeout=10)
        # the returning primary has no desired state yet: it adopts, it does not wipe
        assert returning.stats.reconciles == 0 and fake.updates_written() == written
        assert (await returning.apply(more)).writes == 0
        assert not (await backup.apply(desired)).applied
        await returning.stop()
    finally:
        await backup.stop()


async def test_a_backup_raising_its_election_id_becomes_primary(fake, pipeline):
    """A replica takes over without reconnecting: a new arbitration update on the open
    stream with a higher id than the primary's (the API issue 18's failover uses)."""
    primary = await started(make_switch(fake, pipeline, election_id=20, name="primary"))
    backup = await started(make_switch(fake, pipeline, election_id=10, name="backup"),
                           Role.BACKUP)
    try:
        desired = mini_state(tenants=2)
        assert (await primary.apply(desired)).applied
        assert not (await backup.apply(desired)).applied
        sessions = backup.stats.sessions
        await backup.set_election_id(30)
        await backup.wait_role(Role.PRIMARY, timeout=10)
        await primary.wait_role(Role.BACKUP, timeout=10)
        assert backup.is_primary and backup.election_id == 30
        assert backup.primary_election_id == 30 and primary.primary_election_id == 30
        assert backup.stats.sessions == sessions  # the same stream
        assert backup.stats.last.applied and backup.stats.last.writes == 0  # adopted
        more = mini_state(tenants=3)
        assert (await backup.apply(more)).inserted == 3
        assert held_on_fake(fake, pipeline).entities == normalized(more, pipeline).entities
        assert (await primary.apply(desired)).reason == "backup"
        with pytest.raises(ValueError):
            await backup.set_election_id(0)
        # the whole southbound of the old primary raises its id above: it is back
        fleet = Southbound(election_id=20)
        fleet.switches["primary"] = primary
        await fleet.set_election_id(40)
        await primary.wait_role(Role.PRIMARY, timeout=10)
        await backup.wait_role(Role.BACKUP, timeout=10)
        assert fleet.election_id == 40 and primary.primary_election_id == 40
    finally:
        await primary.stop()
        await backup.stop()


async def test_a_raised_election_id_outlives_a_switch_restart(fake, pipeline):
    """set_election_id while the switch is going away does not raise; the next session
    arbitrates with the raised id and is primary."""
    primary = await started(make_switch(fake, pipeline, election_id=20, name="primary"))
    backup = await started(make_switch(fake, pipeline, election_id=10, name="backup"),
                           Role.BACKUP)
    try:
        await fake.stop()
        await backup.set_election_id(30)  # the stream is ending or gone: kept for the next
        await fake.start()
        await backup.wait_role(Role.PRIMARY, timeout=10)
        await primary.wait_role(Role.BACKUP, timeout=10)
        assert backup.election_id == backup.primary_election_id == 30
    finally:
        await primary.stop()
        await backup.stop()


async def test_a_replica_takes_over_a_mixed_fleet_through_the_southbound(fakes, pipeline):
    """issue 18: Replica.raise_election_id on a Fleet of P4Runtime and OpenFlow
    southbounds (drivers.Fleet) re-arbitrates every P4Runtime switch on its open stream
    and leaves the OpenFlow part alone (no election id there), without error."""
    from tokenfabric.controller.drivers import Fleet
    from tokenfabric.controller.openflow.server import OpenFlowSouthbound
    from tokenfabric.controller.replica import Replica

    olds = [await started(make_switch(f, pipeline, election_id=20, name=f"old{i}"))
            for i, f in enumerate(fakes[:2])]
    p4 = Southbound(election_id=10)
    for i, f in enumerate(fakes[:2]):
        p4.add_switch(f"s{i}", f.address, device_id=f.device_id, pipeline=pipeline, **FAST)
    openflow = OpenFlowSouthbound("127.0.0.1:0")
    openflow.add_switch("ovs1", 0x1)
    fleet = Fleet(p4, openflow)
    await fleet.start()
    try:
        for sw in p4.switches.values():
            await sw.wait_role(Role.BACKUP, timeout=10)
        sessions = {n: sw.stats.sessions for n, sw in p4.switches.items()}
        replica = Replica("postgresql://unused", "http://127.0.0.1:1", 10, fleet)
        await replica.raise_election_id(3 << 32 | 10)
        for sw in p4.switches.values():
            await sw.wait_role(Role.PRIMARY, timeout=10)
            assert sw.election_id == sw.primary_election_id == 3 << 32 | 10
        assert {n: sw.stats.sessions for n, sw in p4.switches.items()} == sessions
        for old in olds:
            await old.wait_role(Role.BACKUP, timeout=10)
        assert p4.election_id == 3 << 32 | 10  # switches added later arbitrate with it
        assert openflow["ovs1"].role is Role.DISCONNECTED  # untouched, no error
    finally:
        await fleet.stop()
        for old in olds:
            await old.stop()


async def test_duplicate_election_id_is_refused_and_retried(fake, pipeline):
    first = await started(make_switch(fake, pipeline, election_id=7))
    twin = make_switch(fake, pipeline, election_id=7, name="twin")
    await twin.start()
    try:
        await asyncio.sleep(0.5)
        assert twin.role is Role.DISCONNECTED
        assert "election id already in use" in twin.last_error
        await first.stop()
        await twin.wait_role(Role.PRIMARY, timeout=10)  # its retries succeed once free
    finally:
        await twin.stop()
        await first.stop()


async def test_switch_restart_restores_everything(fake, pipeline):
    switch = await started(make_switch(fake, pipeline))
    runs = []

    async def handler(sw: Switch) -> None:
        runs.append(sw.role)

    switch.add_handler(handler)
    try:
        desired = mini_state(tenants=4, weights=(2, 1, 1))
        await switch.apply(desired)
        sessions = switch.stats.sessions
        await fake.restart()  # the switch comes back empty, without a program
        assert fake.entity_count() == 0
        await next_session(switch, sessions)
        assert fake.set_pipeline_calls == 2
        assert switch.stats.pipeline_pushes == 2
        assert switch.stats.last.inserted == len(desired.entities)
        assert held_on_fake(fake, pipeline).entities == normalized(desired, pipeline).entities
        assert runs == [Role.PRIMARY]
    finally:
        await switch.stop()


async def test_lost_stream_rewrites_nothing(fake, pipeline):
    switch = await started(make_switch(fake, pipeline))
    try:
        await switch.apply(mini_state(tenants=4))
        written, sessions = fake.updates_written(), switch.stats.sessions
        fake.drop_streams()
        await next_session(switch, sessions)
        assert switch.stats.last.applied and switch.stats.last.writes == 0
        assert fake.updates_written() == written and fake.set_pipeline_calls == 1
    finally:
        await switch.stop()


async def test_missing_entries_are_pushed_back_exactly(fake, pipeline):
    switch = await started(make_switch(fake, pipeline))
    try:
        desired = mini_state(tenants=6)
        await switch.apply(desired)
        lost = [k for k in fake.state.tables if k[0] == switch.index.table("classify").id][:4]
        for key in lost:
            del fake.state.tables[key]
        written = fake.updates_written()
        result = await switch.reconcile()
        assert (result.inserted, result.modified, result.deleted) == (4, 0, 0)
        assert fake.updates_written() - written == 4
    finally:
        await switch.stop()


async def test_controller_restart_adopts_without_writing(fake, pipeline):
    desired = mini_state(tenants=8, weights=(3, 1, 2))
    old = await started(make_switch(fake, pipeline))
    await old.apply(desired)
    await old.stop()
    written = fake.updates_written()

    new = make_switch(fake, pipeline)
    await new.apply(desired)  # remembered; applied once connected
    await started(new)
    try:
        assert new.stats.last.applied and new.stats.last.writes == 0
        assert new.stats.last.held == len(desired.entities)
        assert fake.updates_written() == written and fake.set_pipeline_calls == 1
    finally:
        await new.stop()


async def test_apply_diffs_against_its_mirror_and_reconcile_reads(fake, pipeline):
    switch = await started(make_switch(fake, pipeline))
    try:
        await switch.apply(mini_state(tenants=3))
        reads = fake.read_requests
        result = await switch.apply(mini_state(tenants=4))  # one more tenant
        assert not result.read_switch and fake.read_requests == reads
        assert result.inserted == 3 and fake.entity_count() == len(mini_state(4).entities)
        # an entry lost behind the controller's back: apply trusts its mirror ...
        classify = switch.index.table("classify").id
        lost = next(k for k in fake.state.tables if k[0] == classify)
        del fake.state.tables[lost]
        assert (await switch.apply(mini_state(tenants=4))).writes == 0
        # ... reconcile reads the switch and repairs it
        repaired = await switch.reconcile()
        assert repaired.read_switch and repaired.inserted == 1
        assert fake.read_requests == reads + 1
        # a failed write makes the next apply read again
        broken = mini_state(tenants=4)
        broken.add(TableEntry.of("select_backend", {"hdr.ipv4.dst_addr": Exact(3)},
                                 MemberRef(99)))
        with pytest.raises(WriteError):
            await switch.apply(broken)
        assert (await switch.apply(mini_state(tenants=4))).read_switch
    finally:
        await switch.stop()


async def test_counters_direct_counters_and_meters(fake, pipeline):
    switch = await started(make_switch(fake, pipeline))
    try:
        desired = mini_state(tenants=3)
        await switch.apply(desired)
        fake.set_counter("tenant_packets", 2, packets=5, octets=640)
        cells = await switch.read_counters("tenant_packets")
        assert len(cells) == 4096 and cells[2].packets == 5 and cells[2].bytes == 640
        assert cells[3].packets == 0
        one = await switch.read_counters("MiniIngress.tenant_packets", index=2)
        assert list(one) == [2] and one[2].bytes == 640
        with pytest.raises(TranslationError):
            await switch.read_counters("tenant_packets", index=4096)
        # some cells, in one Read; cells outside the array are left out, not an error
        before = fake.read_entities
        some = await switch.read_counters("tenant_packets", cells=[3, 2, 4096])
        assert sorted(some) == [2, 3] and some[2].bytes == 640
        assert fake.read_entities - before == 2

        fake.set_direct_counters("routes", packets=3, octets=300)
        direct = await switch.read_direct_counters("routes")
        route = normalized(desired, pipeline).entities
        [entry] = [e for e in route.values() if isinstance(e, TableEntry)
                   and e.table == "MiniIngress.routes"]
        assert direct[entry.key()].packets == 3

        meters = await switch.read_meters("tenant_meter")
        assert sorted(m.index for m in meters.entities.values()) == [1, 2, 3]
        smaller = mini_state(tenants=2)
        result = await switch.apply(smaller)
        assert result.deleted == 3
        assert sorted(m.index for m in (await switch.read_meters()).entities.values()) == [1, 2]
    finally:
        await switch.stop()


async def test_weights_expanded_for_a_target_without_weights(pipeline):
    server = await FakeP4RuntimeServer(supports_weights=False).start()
    native = await started(make_switch(server, pipeline, name="native"))
    try:
        with pytest.raises(WriteError, match="UNIMPLEMENTED"):
            await native.apply(mini_state(tenants=1, weights=(3, 1, 2)))
        await native.apply(DesiredState())
    finally:
        await native.stop()
    switch = await started(make_switch(server, pipeline, weights="expand"))
    try:
        desired = mini_state(tenants=1, weights=(3, 1, 2))
        await switch.apply(desired)
        assert len(server.state.members) == 3 + 2 + 1  # copies for weights 3 and 2
        [group] = server.state.groups.values()
        assert all(m.weight == 1 for m in group.members) and len(group.members) == 6
        assert await switch.read_state() == normalized(desired, pipeline)
        assert (await switch.apply(desired)).writes == 0
        lighter = mini_state(tenants=1, weights=(1, 1, 2))
        result = await switch.apply(lighter)
        assert result.deleted == 2 and result.modified == 1  # two copies of 1, the group
        assert len(server.state.members) == 4
    finally:
        await switch.stop()
        await server.stop()


async def test_apply_all_rolls_back_every_switch(fakes, pipeline):
    sb = Southbound(election_id=3)
    for i, server in enumerate(fakes[:2]):
        sb.add_switch(f"s{i}", server.address, device_id=server.device_id, pipeline=pipeline,
                      **FAST)
    await sb.start()
    try:
        for switch in sb.switches.values():
            await switch.wait_role(Role.PRIMARY)
        before = {"s0": mini_state(tenants=2), "s1": mini_state(tenants=2)}
        await sb.apply(before)
        broken = mini_state(tenants=3)
        broken.add(TableEntry.of("select_backend", {"hdr.ipv4.dst_addr": Exact(9)},
                                 MemberRef(99)))  # no member 99: the switch refuses
        with pytest.raises(ApplyError) as caught:
            await sb.apply({"s0": mini_state(tenants=3), "s1": broken})
        # s0 took its new state first (name order), then s1 refused: both are back
        assert set(caught.value.errors) == {"s1"} and caught.value.rolled_back
        assert caught.value.results["s0"].inserted == 3  # tenant 3: its three entries
        for server in fakes[:2]:
            assert held_on_fake(server, pipeline).entities == \
                normalized(before["s0"], pipeline).entities
    finally:
        await sb.stop()


async def test_switches_join_and_leave_a_running_southbound(fakes, pipeline):
    sb = Southbound(election_id=4)
    sb.add_switch("s0", fakes[0].address, device_id=0, pipeline=pipeline, **FAST)
    await sb.start()
    try:
        late = sb.add_switch("s1", fakes[1].address, device_id=1, pipeline=pipeline, **FAST)
        await late.wait_role(Role.PRIMARY)
        with pytest.raises(ValueError, match="already registered"):
            sb.add_switch("s1", fakes[1].address)
        assert (await sb.apply({"s1": mini_state(tenants=1)}))["s1"].applied
        await sb.remove_switch("s1")
        for _ in range(200):  # the server sees the stream end shortly after
            if fakes[1].primary is None:
                break
            await asyncio.sleep(0.01)
        assert fakes[1].primary is None
        with pytest.raises(Exception, match="no such switch"):
            await sb.apply({"s1": mini_state(tenants=1)})
        offline = sb.add_switch("s9", "127.0.0.1:1", device_id=9, pipeline=pipeline, **FAST)
        result = await offline.apply(mini_state(tenants=1))
        assert not result.applied and result.reason == "disconnected"
    finally:
        await sb.stop()


async def test_multicast_groups_are_written_read_back_and_repaired(fake, pipeline):
    switch = await started(make_switch(fake, pipeline))
    try:
        desired = mini_state(tenants=2)
        desired.add(MulticastGroup(5, ((3, 0), (1, 0))))
        assert (await switch.apply(desired)).inserted == len(desired.entities)
        assert [(g.multicast_group_id, [r.egress_port for r in g.replicas])
                for g in fake.state.multicast.values()] == [(5, [1, 3])]
        # read back: nothing to write; a group lost behind our back is put back
        assert (await switch.reconcile()).writes == 0
        del fake.state.multicast[5]
        assert (await switch.reconcile()).inserted == 1
        # a group the controller no longer wants is deleted
        assert (await switch.apply(mini_state(tenants=2))).deleted == 1
        assert fake.state.multicast == {}
    finally:
        await switch.stop()
