"""The reconciler's own decisions: stable backend ids, the startup hold, state pushes."""

import asyncio

from tests.integration.api.conftest import REGISTRATION, make_controller
from tokenfabric.controller.auth import Principal, Role
from tokenfabric.controller.compile import state_to_list
from tokenfabric.wire import BackendRegistration, BackendReport

WHO = Principal("agents", Role.AGENT, backends=("*",))


def reg(name, address, mac, port=4):
    return BackendRegistration(**{**REGISTRATION, "name": name, "address": address,
                                  "mac": mac, "port": port})


def test_backend_ids_survive_deregistration_and_restart(tmp_path):
    ctl = make_controller(tmp_path)
    assert ctl.register_backend(reg("gpu2", "10.0.0.12", "02:00:00:00:00:12"), WHO).backend_id == 2
    ctl.deregister_backend("gpu2", WHO)
    # id 2 stays gpu2's: a newcomer gets 3
    assert ctl.register_backend(reg("gpu3", "10.0.0.13", "02:00:00:00:00:13", 6),
                                WHO).backend_id == 3
    assert ctl.register_backend(reg("gpu2", "10.0.0.12", "02:00:00:00:00:12"), WHO).backend_id == 2
    ctl.ledger.close()

    # a restarted controller on the same file: agents come back in another order
    again = make_controller(tmp_path)
    assert again.register_backend(reg("gpu3", "10.0.0.13", "02:00:00:00:00:13", 6),
                                  WHO).backend_id == 3
    assert again.register_backend(reg("gpu2", "10.0.0.12", "02:00:00:00:00:12"),
                                  WHO).backend_id == 2
    again.ledger.close()


async def test_startup_hold_then_push(tmp_path):
    now = [1000.0]
    ctl = make_controller(tmp_path)
    held = type(ctl)(ctl.model, ctl.ledger, startup_grace_s=3.0, clock=lambda: now[0])
    await held.reconcile_once()
    assert held.pushed == {}  # the switches keep what they hold for now
    now[0] += 3.5
    await held.reconcile_once()
    entries = state_to_list(held.pushed["s1"])
    # what the fabric file says, as entries: each VIP a service, gpu1-llama (id 1, port 3)
    # and the overflow responder (the top id, port 5) delivered locally
    services = {e["match"]["vip"]: e["params"]["service_id"] for e in entries
                if e.get("table") == "service"}
    assert services == {"10.0.100.1": 1, "10.0.100.2": 2}
    backends = {e["match"]["backend_id"]: e["params"]["port"] for e in entries
                if e.get("table") == "backend"}
    assert backends == {1: 3, 1023: 5}
    ctl.ledger.close()


async def test_reports_change_the_pushed_state_only_past_hysteresis(tmp_path):
    now = [1000.0]
    ctl = make_controller(tmp_path)
    ctl = type(ctl)(ctl.model, ctl.ledger, clock=lambda: now[0])
    ctl.register_backend(reg("gpu2", "10.0.0.12", "02:00:00:00:00:12"), WHO)
    base = {"waiting": 0, "healthy": True, "usage": []}
    await ctl.report("gpu1-llama", BackendReport(running=0, kv_cache_usage=0.0, **base), who=WHO)
    await ctl.report("gpu2", BackendReport(running=0, kv_cache_usage=0.0, **base), who=WHO)
    await ctl.reconcile_once()
    first = ctl.pushed["s1"]
    # a small move (within the band): nothing new to write
    await ctl.report("gpu2", BackendReport(running=1, kv_cache_usage=0.05, **base), who=WHO)
    assert await ctl.push() == {}
    # gpu2 is full: its weight drops and the selector changes
    await ctl.report("gpu2", BackendReport(running=8, kv_cache_usage=0.9, **base), who=WHO)
    changed = await ctl.push()
    assert changed["s1"] > 0 and ctl.pushed["s1"].entities != first.entities
    # gpu2's reports stop: down after the timeout, and out of the selector
    for _ in range(4):
        now[0] += 1.0
        await ctl.report("gpu1-llama", BackendReport(running=0, kv_cache_usage=0.0, **base),
                         who=WHO)
    ctl.refresh_states()
    assert ctl.model.backends["gpu2"].state == "down"
    assert (await ctl.push())["s1"] > 0
    ctl.ledger.close()


def test_concurrent_reports_and_views(tmp_path):
    """Reports and views interleave on one event loop without tearing the model."""
    ctl = make_controller(tmp_path)

    async def main():
        async def reporter(i):
            for k in range(20):
                rep = BackendReport(report_id=f"{i}-{k}", running=k % 5, waiting=0,
                                    kv_cache_usage=0.1, healthy=True,
                                    usage=[{"tenant_id": 1, "prompt_tokens": 1,
                                            "completion_tokens": 1}])
                await ctl.report("gpu1-llama", rep, who=WHO)
        await asyncio.gather(*(reporter(i) for i in range(5)))

    asyncio.run(main())
    assert ctl.ledger.totals() == {1: (100, 100, 100)}
    assert ctl.model.backends["gpu1-llama"].load.reports == 100
    ctl.ledger.close()
