"""The handoff's pieces without servers: its config keys, signatures, block keys."""

from __future__ import annotations

import pytest

from tokenfabric.blockhash import BlockHasher
from tokenfabric.config import ConfigError
from tokenfabric.hostagent.config import validate
from tokenfabric.hostagent.handoff import emulator_token_ids, sign, verify
from tokenfabric.hostagent.wordtok import WordTokenizer

SECRET = "0123456789abcdef-secret"


AGENT = {"name": "gpu1", "address": "10.0.2.10", "mac": "02:00:00:00:00:01",
         "switch": "s1", "port": 3, "vip": "10.0.100.1"}


def handoff(raw: object) -> dict:
    return validate({**AGENT, "handoff": raw}).handoff


def test_handoff_config_is_off_by_default_and_checked_key_by_key(tmp_path):
    assert validate(AGENT).handoff == {}
    assert handoff({}) == {} and handoff({"enabled": False, "port": 1}) == {}
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    got = handoff({"secret_file": str(secret), "port": 9000, "min_ratio": 2})
    assert got == {"secret": SECRET.encode(), "port": 9000, "min_ratio": 2}
    for bad, message in (({"enabled": True}, "needs secret_file"),
                         ({"secret": "short"}, "at least 16 bytes"),
                         ({"secret": SECRET, "nope": 1}, "unknown key"),
                         ({"secret": SECRET, "port": 1.5}, "must be a int"),
                         ({"secret": SECRET, "min_gain_ms": -1}, "must not be negative"),
                         ({"secret": SECRET, "tokenizer": "bpe"}, "tokenizer must be"),
                         ({"secret": SECRET, "affinity_queue": 0}, "affinity_queue"),
                         ({"secret_file": str(tmp_path / "none")}, "secret_file"),
                         ("yes", "agent.handoff")):
        with pytest.raises(ConfigError, match=message):
            handoff(bad)


def test_a_handoff_signature_binds_origin_tenant_client_time_and_body():
    body = b'{"prompt": "hi"}'
    value = sign(SECRET.encode(), "gpu1", 5, body, now=1000.0, client="10.0.1.7")
    handed = verify(SECRET.encode(), value, body, now=1010.0)
    assert handed == ("gpu1", 5, "10.0.1.7") and handed.client == "10.0.1.7"
    # the client's address is signed: another one in the header fails
    assert verify(SECRET.encode(), value.replace("client=10.0.1.7", "client=10.0.1.8"),
                  body, now=1010.0) is None
    # a header without the client field (the old format) fails too
    assert verify(SECRET.encode(), value.replace("client=10.0.1.7; ", ""), body,
                  now=1010.0) is None
    unknown = sign(SECRET.encode(), "gpu1", 5, body, now=1000.0)
    assert verify(SECRET.encode(), unknown, body, now=1010.0) == ("gpu1", 5, "")
    assert verify(SECRET.encode(), value, body + b" ", now=1010.0) is None   # other body
    assert verify(b"another-secret-000000", value, body, now=1010.0) is None
    assert verify(SECRET.encode(), value, body, now=1100.0) is None          # too old
    assert verify(SECRET.encode(), value.replace("tenant=5", "tenant=6"), body,
                  now=1010.0) is None
    for garbage in ("", "origin=a", "origin=a; tenant=x; ts=1; sig=00", "=;=;",
                    "origin=a; tenant=1; ts=1; sig=00"):
        assert verify(SECRET.encode(), garbage, body) is None


def test_block_keys_follow_the_emulators_tokenizer_and_chat_template():
    tok = WordTokenizer()
    words = " ".join(f"w{i}" for i in range(40))
    assert emulator_token_ids({"prompt": words}, tok) == tok.encode(words)
    assert emulator_token_ids({"prompt": [words]}, tok) == tok.encode(words)
    assert emulator_token_ids({"prompt": [1, 2, 3]}, tok) == [1, 2, 3]
    chat = emulator_token_ids({"messages": [{"role": "user", "content": words}]}, tok)
    assert chat is not None and chat[:2] == tok.ids(["<|role|>", "user"])
    assert len(BlockHasher(16).keys(chat)) == (2 + 40 + 1) // 16
    for bad in ({"prompt": 3}, {"messages": "x"}, {"messages": [{"content": "no role"}]}, {}):
        assert emulator_token_ids(bad, tok) is None
