"""The policy's prefix affinity opt-in: services and tenants, validated with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenfabric.controller.affinity import DEFAULT_BOUND, DEFAULT_TTL_S, resolve
from tokenfabric.controller.fabric import load_fabric
from tokenfabric.controller.policy.schema import load_policy

from .test_validation import EXAMPLES, GOOD, assert_error, errors_of


def test_a_service_and_a_tenant_opt_in_and_resolve(tmp_path: Path) -> None:
    text = GOOD + """\
  - name: b
    prefixes: [10.0.2.0/24]
    contract: gold
    prefix_affinity: false
  - name: c
    prefixes: [10.0.3.0/24]
    contract: gold
    affinity_bound: 3
services:
  llama: {prefix_affinity: true, affinity_bound: 1.5, affinity_ttl_s: 120}
"""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    model = load_fabric(EXAMPLES / "fabric-single.yaml")
    policy = load_policy(path, model=model)
    a, b, c = (policy.tenants[n] for n in "abc")
    got_a, got_c = resolve(policy, "llama", a), resolve(policy, "llama", c)
    assert got_a is not None and (got_a.bound, got_a.ttl_s) == (1.5, 120)
    assert resolve(policy, "llama", b) is None  # the tenant's explicit false wins
    assert got_c is not None and (got_c.bound_percent, got_c.ttl_s) == (300, 120)
    assert resolve(policy, "llama", None) is not None  # clients of no tenant: the service's
    assert resolve(policy, "qwen", a) is None  # qwen did not opt in


def test_a_tenant_alone_opts_in_with_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD + "    prefix_affinity: true\n")
    policy = load_policy(path)
    got = resolve(policy, "any-service", policy.tenants["a"])
    assert got is not None and (got.bound, got.ttl_s) == (DEFAULT_BOUND, DEFAULT_TTL_S)


@pytest.mark.parametrize(("line", "value", "field", "words"), [
    (3, "prefix_affinity: yes", "services.llama.prefix_affinity",
     "must be true or false, got a string"),
    (4, "affinity_bound: 0.5", "services.llama.affinity_bound", "must be in 1.0..10.0"),
    (4, "affinity_bound: 11", "services.llama.affinity_bound", "must be in 1.0..10.0"),
    (4, "affinity_bound: true", "services.llama.affinity_bound", "must be a number, got bool"),
    (4, "affinity_ttl_s: 0", "services.llama.affinity_ttl_s", "must be in 1..86400, got 0"),
    (4, "affinity_ttl_s: 1.5", "services.llama.affinity_ttl_s", "must be an integer"),
    (4, "afinity_ttl_s: 10", "services.llama.afinity_ttl_s", "unknown key"),
])
def test_bad_service_values_name_file_line_and_field(tmp_path: Path, line: int, value: str,
                                                     field: str, words: str) -> None:
    text = GOOD.replace("contracts:", f"services:\n  llama:\n    prefix_affinity: true\n"
                                      f"    {value}\ncontracts:", 1)
    if value.startswith("prefix_affinity"):
        text = text.replace("    prefix_affinity: true\n", "", 1)
    assert_error(errors_of(tmp_path, text, "fabric-single.yaml"), line, field, words)


def test_a_tenant_value_is_checked_at_its_line(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, GOOD + "    affinity_bound: 0\n")
    assert_error(errors, 9, "tenants[0].affinity_bound", "must be in 1.0..10.0")


def test_an_unknown_service_is_an_error_with_a_fabric(tmp_path: Path) -> None:
    text = GOOD + "services:\n  mistral: {prefix_affinity: true}\n"
    assert_error(errors_of(tmp_path, text, "fabric-single.yaml"), 10, "services.mistral",
                 "unknown service 'mistral'")
    assert errors_of(tmp_path, text) == []  # without a fabric services are not checked
