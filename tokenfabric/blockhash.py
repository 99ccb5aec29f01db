"""Prefix-cache block hashes computed the way vLLM computes them.

vLLM (v1/core/kv_cache_utils.py) cuts a prompt's token ids into full blocks of
`block_size` tokens and chains a hash over them: block i's hash is
    hash_fn((parent_hash, tuple(token_ids_of_block_i), extra_keys))
with parent_hash the hash of block i-1, or NONE_HASH for the first block. NONE_HASH is
hash_fn(seed), the seed being $PYTHONHASHSEED if set, else "vllm-none-hash" for the
cryptographic algorithms. `--prefix-caching-hash-algo` picks hash_fn:
- sha256 (vLLM's default): SHA-256 of pickle.dumps(obj, protocol=HIGHEST_PROTOCOL);
- sha256_cbor: SHA-256 of canonical CBOR (cbor2), language independent.
(xxhash variants use a random per-process seed unless PYTHONHASHSEED is set, so their
hashes cannot be recomputed outside the server: not supported here.)
extra_keys is None for plain text prompts without LoRA, multimodal input or cache_salt,
which is the case this module covers.

A chained hash names the whole prefix up to its block, so two backends holding the same
hash hold the same prefix. The fabric's index keys blocks by `key64`: the low 64 bits of
the hash, as vLLM's VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES turns them into ints -- 8 bytes
instead of 32, with a collision chance of ~n^2/2^65 (1e-9 for 200k blocks), harmless
for a routing hint.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
HASH_ALGOS = ("sha256", "sha256_cbor")
KEY_MASK = (1 << 64) - 1


def _sha256_pickle(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(obj: Any) -> bytes:
    import cbor2  # only this algorithm needs it

    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def hash_function(algo: str) -> Callable[[Any], bytes]:
    if algo == "sha256":
        return _sha256_pickle
    if algo == "sha256_cbor":
        return _sha256_cbor
    raise ValueError(f"unsupported prefix-caching hash algorithm {algo!r}; "
                     f"choose one of {', '.join(HASH_ALGOS)}")


def none_hash(algo: str = "sha256", seed: str | None = None) -> bytes:
    """The parent hash of every first block (vLLM's NONE_HASH)."""
    if seed is None:
        seed = os.environ.get("PYTHONHASHSEED", DEFAULT_NONE_HASH_SEED)
    return hash_function(algo)(seed)


def key64(block_hash: bytes | int) -> int:
    """The index key of a block hash: an int as vLLM publishes it with
    VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES, or the low 64 bits of the bytes."""
    if isinstance(block_hash, int):
        return block_hash & KEY_MASK
    return int.from_bytes(block_hash, "big") & KEY_MASK


class BlockHasher:
    """Chained block hashes of token-id sequences for one block size and algorithm."""

    def __init__(self, block_size: int, algo: str = "sha256", seed: str | None = None) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.block_size = block_size
        self.algo = algo
        self._fn = hash_function(algo)
        self.none_hash = none_hash(algo, seed)

    def block(self, parent: bytes | None, token_ids: Sequence[int]) -> bytes:
        return self._fn((parent or self.none_hash, tuple(token_ids), None))

    def hashes(self, token_ids: Sequence[int], parent: bytes | None = None) -> list[bytes]:
        """Hashes of every full block of `token_ids` (a trailing partial block has none)."""
        out: list[bytes] = []
        size = self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            parent = self.block(parent, token_ids[start:start + size])
            out.append(parent)
        return out

    def keys(self, token_ids: Sequence[int]) -> list[int]:
        return [key64(h) for h in self.hashes(token_ids)]
