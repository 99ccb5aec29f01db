"""Bearer tokens for the REST API: a YAML file maps each token to a name and a role.

    # tokens.yaml
    s3cr3t-admin-token-0123456789:  {name: alice, role: admin}
    agent-token-abcdefghijklmnop:   {name: gpu1-agent, role: agent, backends: ["gpu1-*"],
                                     public_key: "<base64 Ed25519 key: tokenfabric agent keygen>"}
    viewer-token-qrstuvwxyz012345:  {name: grafana, role: viewer}

Roles are ordered: a viewer may read (GET), an agent may also register, deregister
and report backends (what the host agents do), an admin may do everything. The
agent role exists so that a token copied onto every GPU server cannot change policy.
An agent token speaks only for the backends it is bound to (`backends`: names or
shell patterns, `hosts`: the backends' host names); `public_key` makes signed usage
mandatory for it (tokenfabric/usage_signing.py, controller/identity.py).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
from dataclasses import dataclass
from pathlib import Path

from tokenfabric import yamlio

MIN_TOKEN_LENGTH = 16  # short tokens are guessable; refuse them at load time


class Role(enum.IntEnum):
    VIEWER = 1
    AGENT = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Principal:
    """Who made a request: logged with every mutation."""

    name: str
    role: Role
    # Patterns (fnmatch) of the backend names and host names an agent may speak for;
    # both empty: none. Admins speak for every backend.
    backends: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    public_key: bytes | None = None  # raw Ed25519 key: this agent's usage must be signed


ANONYMOUS_ADMIN = Principal("anonymous", Role.ADMIN)  # only when auth is disabled


class TokenFileError(ValueError):
    """The token file cannot be read or has a bad entry; the message names the file."""


class TokenStore:
    """Token lookup. `None` tokens mean auth is disabled (every request is an admin)."""

    def __init__(self, tokens: dict[str, Principal] | None) -> None:
        self._tokens = tokens

    @property
    def enabled(self) -> bool:
        return self._tokens is not None

    def public_keys(self) -> dict[str, list[bytes]]:
        """Token name -> the public keys bound to it (what `ledger verify` checks against)."""
        keys: dict[str, list[bytes]] = {}
        for principal in (self._tokens or {}).values():
            if principal.public_key is not None:
                keys.setdefault(principal.name, []).append(principal.public_key)
        return keys

    def lookup(self, token: str) -> Principal | None:
        if self._tokens is None:
            return ANONYMOUS_ADMIN
        found = None
        # Compare against every token in constant time, so timing reveals nothing.
        for known, principal in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = principal
        return found

    @classmethod
    def disabled(cls) -> TokenStore:
        return cls(None)

    @classmethod
    def from_file(cls, path: str | Path) -> TokenStore:
        path = Path(path)
        try:
            data = yamlio.load(path.read_text())
        except OSError as exc:
            raise TokenFileError(f"{path}: cannot read: {exc.strerror}") from exc
        except yamlio.YAMLError as exc:
            raise TokenFileError(f"{path}: not valid YAML: {exc}") from exc
        return cls(parse_tokens(data, str(path)))


TOKEN_KEYS = {"name", "role", "backends", "hosts", "public_key"}


def parse_tokens(data: object, file: str = "tokens") -> dict[str, Principal]:
    if not isinstance(data, dict) or not data:
        raise TokenFileError(f"{file}: must be a non-empty mapping of token -> {{name, role}}")
    roles = {r.label: r for r in Role}
    tokens: dict[str, Principal] = {}
    for token, entry in data.items():
        shown = f"{str(token)[:4]}…"  # never log a whole token
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
            raise TokenFileError(
                f"{file}: token {shown}: must be a string of at least {MIN_TOKEN_LENGTH} chars")
        if not isinstance(entry, dict) or not {"name", "role"} <= set(entry) \
                or not set(entry) <= TOKEN_KEYS:
            raise TokenFileError(f"{file}: token {shown}: needs the keys name and role "
                                 f"(and may have backends, hosts, public_key)")
        if entry["role"] not in roles:
            raise TokenFileError(
                f"{file}: token {shown}: role must be one of {', '.join(roles)}")
        if not isinstance(entry["name"], str) or not entry["name"]:
            raise TokenFileError(f"{file}: token {shown}: name must be a non-empty string")
        role = roles[entry["role"]]
        bound = {key: _patterns(entry.get(key), f"{file}: token {shown}: {key}")
                 for key in ("backends", "hosts")}
        if role == Role.AGENT and not (bound["backends"] or bound["hosts"]):
            raise TokenFileError(
                f"{file}: token {shown}: an agent token needs `backends` or `hosts`: the "
                "backends it may speak for (\"*\" for all of them)")
        key = _public_key(entry.get("public_key"), f"{file}: token {shown}: public_key")
        tokens[token] = Principal(entry["name"], role, bound["backends"], bound["hosts"], key)
    return tokens


def _patterns(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TokenFileError(f"{where}: must be a list of names or patterns like gpu1-*")
    return tuple(value)


def _public_key(value: object, where: str) -> bytes | None:
    """A raw 32-byte Ed25519 public key, base64 (what `tokenfabric agent keygen` prints)."""
    if value is None:
        return None
    try:
        raw = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise TokenFileError(f"{where}: must be a base64 Ed25519 public key (32 bytes), as "
                             "`tokenfabric agent keygen` prints it")
    return raw
