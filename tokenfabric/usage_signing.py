"""Signed usage records: what a host agent bills, in a form only it could have written.

Shared by the agent (signs) and the controller (verifies at ingest; `tokenfabric
ledger verify` re-checks), so the canonical encoding lives here and nowhere else.

A record is one tenant's and model's usage since the agent's previous record:

    backend, epoch, seq, time_ms, tenant_id, model,
    prompt_tokens, completion_tokens, requests, prev

`epoch` is a random id the agent draws at start (a restart is a new epoch); `seq`
counts the epoch's records from 1; `prev` is the digest of the epoch's previous
record (empty for seq 1), so an agent's records form a hash chain: checking the
signature of a record vouches for every record before it that links to it.
The canonical encoding is compact JSON of a fixed-order array (ASCII only, so the
bytes are the same on every platform); Ed25519 signs it (`cryptography`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

DOMAIN = "tokenfabric-usage-v1"  # a signature over a record is never valid as anything else


@dataclass(frozen=True)
class UsageRecord:
    backend: str
    epoch: str
    seq: int
    time_ms: int
    tenant_id: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    requests: int
    prev: str = ""  # hex digest of the epoch's previous record; "" for the first

    def canonical(self) -> bytes:
        return canonical_bytes(self.backend, self.epoch, self.seq, self.time_ms,
                               self.tenant_id, self.model, self.prompt_tokens,
                               self.completion_tokens, self.requests, self.prev)

    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()


def canonical_bytes(backend: str, epoch: str, seq: int, time_ms: int, tenant_id: int,
                    model: str, prompt_tokens: int, completion_tokens: int, requests: int,
                    prev: str) -> bytes:
    """The bytes that are signed; ints as ints, strings JSON-escaped, no spaces."""
    return json.dumps([DOMAIN, backend, epoch, int(seq), int(time_ms), int(tenant_id), model,
                       int(prompt_tokens), int(completion_tokens), int(requests), prev],
                      separators=(",", ":"), ensure_ascii=True).encode()


def new_epoch() -> str:
    return secrets.token_hex(8)


def sign(key: Ed25519PrivateKey, record: UsageRecord) -> str:
    """The record's signature, base64."""
    return base64.b64encode(key.sign(record.canonical())).decode()


def verify(public_key: bytes, message: bytes, signature: str) -> bool:
    """True when `signature` (base64) is the holder of `public_key`'s over `message`."""
    try:
        raw = base64.b64decode(signature, validate=True)
        Ed25519PublicKey.from_public_bytes(public_key).verify(raw, message)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """The public half as the tokens file's `public_key` wants it: base64 of 32 raw bytes."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


class KeyFileError(ValueError):
    """The key file is missing, unreadable or not an Ed25519 private key."""


def generate_key_file(path: str | Path) -> str:
    """Write a new private key (PEM, PKCS#8, mode 0600) to `path`; the public key, base64.

    Refuses to overwrite: a lost key makes the agent's past records unverifiable
    against the new one, which is a decision to make on purpose."""
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{path}: exists; remove it first to make a new key") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot create: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return public_key_b64(key)


def load_key_file(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM private key without a password: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key
