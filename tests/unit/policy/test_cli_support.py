"""What `tokenfabric policy validate` gets from the policy package."""

from __future__ import annotations

from pathlib import Path

from tokenfabric.controller.policy.cli_support import summarize_file, validate_file

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_valid_examples_give_no_errors_and_a_summary():
    assert validate_file(EXAMPLES / "policy-5qi.yaml") == []
    lines = summarize_file(EXAMPLES / "policy-5qi.yaml", EXAMPLES / "fabric-single.yaml")
    assert lines[0] == "3 tenants, 3 contracts"
    assert "contract voice-agent: 5QI 1 telephony dscp 46 queue 5 tpm 120000 burst 4000" in lines
    assert "tenant batch (id 3): 10.0.2.0/24 -> batch.contract" in lines


def test_a_fabric_with_errors_is_reported_instead(tmp_path):
    fabric = tmp_path / "fabric.yaml"
    fabric.write_text("switches: {}\n")
    errs = validate_file(EXAMPLES / "policy-5qi.yaml", fabric)
    assert errs == [f"{fabric}:1: switches: at least one switch is required"]


def test_a_fabric_file_is_not_a_policy():
    errs = validate_file(EXAMPLES / "fabric-single.yaml")
    assert errs[0].endswith("fabric-single.yaml:1: missing required key 'tenants'")
    assert any(":3: switches: unknown key" in e for e in errs)
