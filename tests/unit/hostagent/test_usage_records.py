"""The agent's signed records: numbered, linked, kept until acknowledged, bounded."""

from __future__ import annotations

import base64

from tokenfabric import usage_signing
from tokenfabric.hostagent import usage_records
from tokenfabric.hostagent.tenants import TenantUsage
from tokenfabric.hostagent.usage_records import UsageSigner


def test_records_are_signed_linked_and_kept_until_acknowledged(tmp_path, monkeypatch):
    public = base64.b64decode(usage_signing.generate_key_file(tmp_path / "k.pem"))
    signer = UsageSigner(usage_signing.load_key_file(tmp_path / "k.pem"), "gpu1")
    unreported = {"acme": TenantUsage(requests=1, prompt_tokens=5, completion_tokens=9),
                  "gone": TenantUsage(requests=1, prompt_tokens=1, completion_tokens=1)}
    ids = {"acme": 1, "gone": 7}
    signer.take(unreported, ids, {0, 1}, "llama")
    assert unreported == {}  # acme's usage is in a record; gone's tenant is unknown: dropped
    unreported["acme"] = TenantUsage(requests=2, prompt_tokens=3, completion_tokens=4)
    signer.take(unreported, ids, {0, 1}, "llama")
    body = signer.body()
    assert [b["seq"] for b in body] == [1, 2] and body[0]["prev"] == ""
    first = usage_signing.UsageRecord(**{k: v for k, v in body[0].items() if k != "signature"})
    assert body[1]["prev"] == first.digest()
    for b in body:
        rec = usage_signing.UsageRecord(**{k: v for k, v in b.items() if k != "signature"})
        assert usage_signing.verify(public, rec.canonical(), b["signature"])
    # a retry re-sends the very same records
    assert signer.body() == body
    signer.acknowledged(1)
    assert [b["seq"] for b in signer.body()] == [2]
    # refused: a new epoch, the pending usage back in the counters
    epoch = signer.epoch
    signer.restart(unreported)
    assert signer.epoch != epoch and signer.pending == []
    assert vars(unreported["acme"])["completion_tokens"] == 4
    # bounded: past MAX_PENDING the usage waits unsigned, nothing is lost
    monkeypatch.setattr(usage_records, "MAX_PENDING", 1)
    unreported["other"] = TenantUsage(requests=1, prompt_tokens=1, completion_tokens=1)
    signer.take(unreported, {**ids, "other": 0}, {0, 1}, "llama")
    assert len(signer.pending) == 1 and len(unreported) == 1
