"""The controller's counter sample reads only the policy's tenants' cells of the P4
counters (a real P4Runtime gRPC server: the southbound's in-process test server).

Why it matters: a whole tenant counter is 4096 entities per read, decoded by the
pure-Python protobuf on the event loop that also serves the REST API; sampled every
2 s from the five switches of a leaf-spine lab it held the loop for most of each
interval, and the bridges' 50 ms prefix-index lookups timed out (docs/prefix-cache.md).
"""

from tests.integration.api.test_api_southbound import controller_for
from tests.integration.southbound.fake_p4rt_server import FakeP4RuntimeServer
from tokenfabric.controller.southbound import Role


async def test_a_counter_sample_reads_the_policys_tenants_not_the_whole_arrays(tmp_path):
    fake = await FakeP4RuntimeServer(device_id=1).start()
    ctl = controller_for(fake, tmp_path, 20, "primary")
    await ctl.southbound.start()
    try:
        await ctl.southbound["s1"].wait_role(Role.PRIMARY)
        tenants = sorted(t.tenant_id for t in ctl.model.policy.tenants.values())
        fake.set_counter("tenant_packets", tenants[0], 10, 1500)
        fake.set_counter("tenant_packets", 4000, 99, 9900)  # a cell of no tenant of ours
        before = fake.read_entities
        counters = await ctl.read_counters()
        # two counters (traffic, admitted), one cell per tenant each
        assert fake.read_entities - before == 2 * len(tenants)
        entry = counters["s1"]
        assert entry["connected"] and entry["error"] is None
        assert entry["tenants"][tenants[0]] == (1500, 10, 10)
        assert set(entry["tenants"]) == set(tenants)

        before = fake.read_entities
        await ctl.sample_counters()
        assert fake.read_entities - before == 2 * len(tenants)
    finally:
        await ctl.southbound.stop()
        await fake.stop()
        ctl.ledger.close()
