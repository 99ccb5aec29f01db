"""Fixtures of the dataplane packet tests: one BMv2 per module, a fresh pipeline per test."""

from __future__ import annotations

import pytest

from tests.integration.dataplane import harness


@pytest.fixture(scope="module")
def module_rig(tmp_path_factory):
    with harness.rig(nports=5, log_dir=tmp_path_factory.mktemp("bmv2")) as rig:
        yield rig


@pytest.fixture
def sw(module_rig):
    """The module's switch with token_router freshly pushed (empty tables, zero state)
    and the shared routes and backends installed."""
    module_rig.load("token_router")
    module_rig.client.insert(*harness.base_plan())
    module_rig.io.drain()
    yield module_rig
    assert module_rig.alive(), "simple_switch_grpc died during the test"
