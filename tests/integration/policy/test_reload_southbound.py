"""Policy reload through the real southbound to in-process P4Runtime servers.

Three fake switches (the southbound tests' server: it checks every entity
against token_router's P4Info, like BMv2's PI server) run the leaf-spine example.
A reload writes only the difference; a switch that refuses part-way makes every
switch go back to the previous policy, as read back from the servers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from google.rpc import code_pb2

from tokenfabric import dataplane as dp
from tokenfabric.controller.app import Controller, PushFailed
from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.fabric import load_fabric
from tokenfabric.controller.ledger import Ledger
from tokenfabric.controller.policy.reload import reload_policy
from tokenfabric.controller.policy.schema import load_policy
from tokenfabric.controller.southbound import Pipeline, Role, Southbound

fake_server = pytest.importorskip("tests.integration.southbound.fake_p4rt_server")
helpers = pytest.importorskip("tests.integration.southbound.helpers")

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
FAST = {"backoff_initial": 0.02, "backoff_max": 0.2, "connect_timeout": 2.0,
        "rpc_timeout": 10.0}


class RefusingServer(fake_server.FakeP4RuntimeServer):
    """Refuses every insert after `refuse_after` more have been taken (a table full);
    modifies and deletes still work, as on a real switch."""

    refuse_after: int | None = None

    def _apply(self, update):  # noqa: ANN001, ANN202
        if self.refuse_after is not None and update.type == fake_server.Update.INSERT:
            if self.refuse_after <= 0:
                raise fake_server.EntityError(code_pb2.RESOURCE_EXHAUSTED, "table full (test)")
            self.refuse_after -= 1
        return super()._apply(update)


@pytest.fixture
def pipeline():
    if not (dp.TOKEN_ROUTER_P4INFO.exists() and dp.TOKEN_ROUTER_JSON.exists()):
        pytest.skip("token_router is not built yet (p4src/build.sh)")
    return Pipeline.from_files(dp.TOKEN_ROUTER_P4INFO, dp.TOKEN_ROUTER_JSON)


@pytest.fixture
async def fabric(pipeline):
    model = load_fabric(EXAMPLES / "fabric-leafspine.yaml")
    model.policy = load_policy(EXAMPLES / "policy-roce.yaml", model)
    servers = {name: await RefusingServer(device_id=sw.device_id).start()
               for name, sw in model.fabric.switches.items()}
    sb = Southbound(election_id=7)
    for name, server in servers.items():
        sb.add_switch(name, server.address, device_id=server.device_id, pipeline=pipeline,
                      **FAST)
    await sb.start()
    try:
        for switch in sb.switches.values():
            await switch.wait_role(Role.PRIMARY)
        yield model, servers, sb
    finally:
        await sb.stop()
        for server in servers.values():
            await server.stop()


def held(server, pipeline):  # noqa: ANN001, ANN201
    return helpers.held_on_fake(server, pipeline).entities


def want(state, pipeline):  # noqa: ANN001, ANN201
    return helpers.normalized(state, pipeline).entities


NEW = (EXAMPLES / "policy-roce.yaml").read_text().replace(
    "tenants:\n", "tenants:\n  - name: newcomer\n    prefixes: [10.0.9.0/24]\n"
    "    contract: bulk\n").replace("ecn_threshold: 20", "ecn_threshold: 40")


async def test_reload_through_the_southbound(fabric, pipeline, tmp_path):
    model, servers, sb = fabric
    old = compile_model(model)
    await sb.apply(old)
    for name, server in servers.items():
        assert held(server, pipeline) == want(old[name], pipeline)
    written = {n: s.updates_written() for n, s in servers.items()}

    path = tmp_path / "policy.yaml"
    path.write_text(NEW)
    report = await reload_policy(model, path, sb.switches, old)
    assert report.ok, report.errors
    new = compile_model(model)
    for name, server in servers.items():
        assert held(server, pipeline) == want(new[name], pipeline)
        # the newcomer's three entries and the ECN threshold: nothing else rewritten
        assert server.updates_written() - written[name] == 4


async def test_a_switch_refusing_part_way_rolls_every_switch_back(fabric, pipeline, tmp_path):
    model, servers, sb = fabric
    old = compile_model(model)
    await sb.apply(old)
    policy_before = model.policy
    servers["leaf2"].refuse_after = 2  # takes two of its three inserts

    path = tmp_path / "policy.yaml"
    path.write_text(NEW)
    report = await reload_policy(model, path, sb.switches, old)
    assert not report.ok and report.apply.failed_switch == "leaf2"
    assert report.errors[0].startswith("leaf2: ")
    # leaf1 was written, leaf2 partly: both are rolled back; spine1 was never touched
    assert report.apply.rolled_back == ["leaf2", "leaf1"]
    for name, server in servers.items():
        assert held(server, pipeline) == want(old[name], pipeline), name
    assert model.policy is policy_before
    assert dataclasses.asdict(model.policy.roce)["ecn_threshold"] == 20


async def test_a_failed_reconcile_pass_rolls_back_and_the_next_one_retries(fabric, pipeline,
                                                                           tmp_path):
    """Controller.push goes through the same applier: a switch that refuses part-way
    makes every switch of the pass go back, `pushed` stays, the next pass retries."""
    model, servers, sb = fabric
    ctl = Controller(model, Ledger(tmp_path / "ledger.db"), southbound=sb)
    try:
        assert set(await ctl.push()) == set(servers)
        old = compile_model(model)
        path = tmp_path / "policy.yaml"
        path.write_text(NEW)
        model.policy = load_policy(path, model)  # as an operator's edit would, unapplied
        servers["leaf2"].refuse_after = 2
        with pytest.raises(PushFailed, match="leaf2") as caught:
            await ctl.push()
        assert caught.value.report.rolled_back == ["leaf2", "leaf1"]
        for name, server in servers.items():
            assert held(server, pipeline) == want(old[name], pipeline), name
            assert ctl.pushed[name].entities == old[name].entities
        await ctl.reconcile_once()
        assert ctl.last_reconcile_error is not None and "leaf2" in ctl.last_reconcile_error

        servers["leaf2"].refuse_after = None
        await ctl.reconcile_once()
        assert ctl.last_reconcile_error is None
        new = compile_model(model)
        for name, server in servers.items():
            assert held(server, pipeline) == want(new[name], pipeline), name
    finally:
        ctl.ledger.close()
