from __future__ import annotations

import pytest

from tests.integration.openflow.conftest import state_of, wait_connected

pytestmark = [pytest.mark.ovs]


async def test_smoke(lab, southbound):
    sw = southbound["s1"]
    await wait_connected(sw)
    res = await sw.apply(state_of(southbound.model))
    print(res, sw.status())
    print(lab.ovs.dump_flows(lab.bridge))
    print(lab.ovs.ofctl("dump-groups", lab.bridge))
    print(lab.ovs.ofctl("dump-meters", lab.bridge))
    res2 = await sw.reconcile()
    print(res2)
    assert res2.writes == 0
