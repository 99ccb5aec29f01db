"""Which REST calls a backup controller replica refuses (controller/replica.py): every
mutation, but not reads nor the agents' feed (each replica keeps its model current)."""

from __future__ import annotations

import pytest

from tokenfabric.controller.replica import (
    MAX_BASE_ELECTION_ID,
    Replica,
    ReplicaError,
    backup_refusal,
)


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/v1/backends"), ("GET", "/api/v1/replica"), ("HEAD", "/healthz"),
    ("POST", "/api/v1/backends"), ("POST", "/api/v1/backends/gpu1/report"),
    ("POST", "/api/v1/backends/gpu1/kv"), ("POST", "/api/v1/backends/gpu1/claim"),
    ("DELETE", "/api/v1/backends/gpu1"),
    ("POST", "/api/v1/policy/validate"), ("POST", "/api/v1/prefix-index/lookup"),
])
def test_a_backup_takes_reads_and_the_agents_feed(method, path):
    assert not backup_refusal(path, method)


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/v1/backends/gpu1/drain"), ("POST", "/api/v1/backends/gpu1/undrain"),
    ("PUT", "/api/v1/services/llm/mode"), ("POST", "/api/v1/policy/apply"),
    ("POST", "/api/v1/policy/reload"), ("PATCH", "/api/v1/anything"),
    ("DELETE", "/api/v1/services/llm"),
])
def test_a_backup_refuses_mutations(method, path):
    assert backup_refusal(path, method)


@pytest.mark.parametrize("election_id", [0, MAX_BASE_ELECTION_ID + 1])
def test_a_replica_election_id_leaves_room_for_the_term(election_id):
    with pytest.raises(ReplicaError, match="election id must be in 1.."):
        Replica("postgresql://x@127.0.0.1/db", "http://127.0.0.1:1", election_id)
