"""One test per class of policy-file error: each message names file:line and the field path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tokenfabric.controller.fabric import load_fabric
from tokenfabric.controller.policy.cli_support import validate_file
from tokenfabric.controller.policy.schema import load_policy
from tokenfabric.controller.policy.source import SpecError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

GOOD = """\
contracts:
  gold:
    class: {service_class: low-latency-data, priority_level: 20, queue: 5}
    tpm: 60000
tenants:
  - name: a
    prefixes: [10.0.1.0/24]
    contract: gold
"""


def errors_of(tmp_path: Path, text: str, fabric: str | None = None) -> list[str]:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return validate_file(path, EXAMPLES / fabric if fabric else None)


def assert_error(errors: list[str], line: int, field: str, words: str) -> None:
    """Exactly one error, at `policy.yaml:<line>`, naming `field`, saying `words`."""
    assert len(errors) == 1, errors
    (message,) = errors
    assert message.endswith(words) or words in message, message
    head = f"policy.yaml:{line}: {field}: " if field else f"policy.yaml:{line}: "
    assert head in message, f"want {head!r} in {message!r}"


def test_good_file_has_no_error(tmp_path):
    assert errors_of(tmp_path, GOOD) == []


def test_yaml_syntax_error(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("    tpm: 60000", "    tpm: [60000"))
    assert len(errs) == 1 and "not valid YAML" in errs[0]
    assert ":5:" in errs[0] or ":6:" in errs[0], errs  # where the parser noticed


def test_duplicate_key(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("    tpm: 60000", "    tpm: 60000\n    tpm: 1"))
    assert len(errs) == 1 and "policy.yaml:5:" in errs[0] and "duplicate key" in errs[0]


def test_the_briefs_example(tmp_path):
    text = GOOD + """\
  - name: b
    prefixes: [10.0.2.0/24]
    contract: gold
  - name: c
    prefixes: [10.0.3.0/24]
    contract:
      class: {service_class: standard, priority_level: 90}
      tpm: 0
"""
    assert_error(errors_of(tmp_path, text), 16, "tenants[2].contract.tpm", "must be > 0, got 0")


def test_unknown_key_top_level(tmp_path):
    errs = errors_of(tmp_path, GOOD + "tennants: []\n")
    assert_error(errs, 9, "tennants", "unknown key")
    assert "known keys:" in errs[0] and "tenants" in errs[0]


def test_unknown_key_nested(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("    tpm: 60000", "    tpm: 60000\n    tmp: 5"))
    assert_error(errs, 5, "contracts.gold.tmp", "unknown key")


def test_missing_required_key(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("    tpm: 60000\n", ""))
    assert_error(errs, 2, "contracts.gold", "missing required key 'tpm'")


def test_wrong_type(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("tpm: 60000", "tpm: lots"))
    assert_error(errs, 4, "contracts.gold.tpm", "must be an integer, got a string")


def test_boolean_is_not_an_integer(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("tpm: 60000", "tpm: true"))
    assert_error(errs, 4, "contracts.gold.tpm", "must be an integer, got a boolean")


@pytest.mark.parametrize("field,value,words", [
    ("queue: 5", "queue: 8", "must be in 0..7, got 8"),
    ("priority_level: 20", "priority_level: 0", "must be in 1..127, got 0"),
    ("service_class: low-latency-data", "service_class: gold-plated", "must be one of"),
])
def test_out_of_range_class_values(tmp_path, field, value, words):
    errs = errors_of(tmp_path, GOOD.replace(field, value))
    assert_error(errs, 3, f"contracts.gold.class.{value.split(':')[0]}", words)


def test_dscp_out_of_range(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("queue: 5}", "queue: 5, dscp: 64}"))
    assert_error(errs, 3, "contracts.gold.class.dscp", "must be in 0..63, got 64")


def test_unknown_contract_reference(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("contract: gold", "contract: silver"))
    assert_error(errs, 8, "tenants[0].contract", "unknown contract 'silver'")


def test_unknown_default_contract(tmp_path):
    errs = errors_of(tmp_path, GOOD + "default_contract: bronze\n")
    assert_error(errs, 9, "default_contract", "unknown contract 'bronze'")


def test_unknown_service_reference(tmp_path):
    text = GOOD.replace("    tpm: 60000", "    tpm: 60000\n    services: [llama, mistral]")
    errs = errors_of(tmp_path, text, fabric="fabric-single.yaml")
    assert_error(errs, 5, "contracts.gold.services[1]", "unknown service 'mistral'")
    assert errors_of(tmp_path, text) == []  # without a fabric there is nothing to check


def test_not_a_standardized_5qi(tmp_path):
    text = GOOD.replace("    class: {service_class: low-latency-data, priority_level: 20, "
                        "queue: 5}", "    fiveqi: 11")
    assert_error(errors_of(tmp_path, text), 3, "contracts.gold.fiveqi",
                 "11 is not a standardized 5QI")


def test_neither_5qi_nor_class(tmp_path):
    text = GOOD.replace("    class: {service_class: low-latency-data, priority_level: 20, "
                        "queue: 5}\n", "")
    assert_error(errors_of(tmp_path, text), 2, "contracts.gold", "needs a 5QI")


def test_bad_prefix(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("10.0.1.0/24", "10.0.1.1/24"))
    assert_error(errs, 7, "tenants[0].prefixes[0]", "is not an IPv4 prefix")


def test_duplicate_tenant_name_id_and_prefix(tmp_path):
    dup_name = GOOD + "  - name: a\n    prefixes: [10.0.9.0/24]\n    contract: gold\n"
    assert_error(errors_of(tmp_path, dup_name), 9, "tenants[1]", "tenant 'a' is defined twice")
    dup_prefix = GOOD + "  - name: b\n    prefixes: [10.0.1.0/24]\n    contract: gold\n"
    assert_error(errors_of(tmp_path, dup_prefix), 10, "tenants[1].prefixes[0]",
                 "already belongs to tenant 'a'")
    dup_id = (GOOD.replace("  - name: a\n", "  - name: a\n    id: 7\n")
              + "  - name: b\n    id: 7\n    prefixes: [10.0.2.0/24]\n    contract: gold\n")
    assert_error(errors_of(tmp_path, dup_id), 11, "tenants[1].id",
                 "id 7 is already used by tenant 'a'")


def test_tenant_prefix_must_not_contain_a_vip(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("10.0.1.0/24", "10.0.0.0/8"),
                     fabric="fabric-single.yaml")
    assert_error(errs, 7, "tenants[0].prefixes[0]",
                 "prefix 10.0.0.0/8 contains the service VIP 10.0.100.1")


def test_tenant_id_range(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("  - name: a\n", "  - name: a\n    id: 4096\n"))
    assert_error(errs, 7, "tenants[0].id", "must be in 1..4095, got 4096")


@pytest.mark.parametrize("klass,words", [
    ("dscp: 26", "reserved for RoCEv2"),
    ("dscp: 28", "is AF3x"),
    ("dscp: 48", "reserved for RoCEv2"),
])
def test_class_collides_with_roce_dscp(tmp_path, klass, words):
    errs = errors_of(tmp_path, GOOD.replace("queue: 5}", f"queue: 5, {klass}}}"))
    assert_error(errs, 3, "contracts.gold.class", words)


def test_class_collides_with_roce_queue(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("queue: 5}", "queue: 3}"))
    assert_error(errs, 3, "contracts.gold.class", "queue 3 is reserved for RoCEv2")
    # The same class is fine on a fabric without RoCE.
    assert errors_of(tmp_path, "roce: {enabled: false}\n" + GOOD.replace(
        "queue: 5}", "queue: 3, dscp: 26}")) == []


def test_roce_values_checked(tmp_path):
    errs = errors_of(tmp_path, "roce:\n  priority: 6\n  cnp_priority: 6\n" + GOOD)
    assert_error(errs, 3, "roce.cnp_priority", "must be above roce.priority (6)")
    errs = errors_of(tmp_path, "roce:\n  ecn_threshold: 0\n" + GOOD)
    assert_error(errs, 2, "roce.ecn_threshold", "must be in 1..524287, got 0")


BW = GOOD.replace("    tpm: 60000", """\
    tpm: 60000
    bandwidth:
      cir: 8Mbit/s
      cbs: 64kB
      pir: 16Mbit/s
      pbs: 128kB
      exceed: remark
      exceed_dscp: 10
      violate: drop""")


def test_bandwidth_profile_is_valid_and_parsed(tmp_path):
    assert errors_of(tmp_path, BW) == []
    path = tmp_path / "policy.yaml"
    bw = load_policy(path).contracts["gold"].bandwidth
    assert (bw.cir, bw.cbs, bw.pir, bw.pbs) == (1_000_000, 64_000, 2_000_000, 128_000)


def test_bandwidth_pir_below_cir(tmp_path):
    errs = errors_of(tmp_path, BW.replace("pir: 16Mbit/s", "pir: 4Mbit/s"))
    assert_error(errs, 8, "contracts.gold.bandwidth.pir", "must be >= cir (1000000 bytes/s)")


def test_bandwidth_remark_needs_a_dscp(tmp_path):
    errs = errors_of(tmp_path, BW.replace("      exceed_dscp: 10\n", ""))
    assert_error(errs, 5, "contracts.gold.bandwidth", "missing required key 'exceed_dscp'")


def test_bandwidth_bad_unit(tmp_path):
    errs = errors_of(tmp_path, BW.replace("cir: 8Mbit/s", "cir: 8 furlongs"))
    assert_error(errs, 6, "contracts.gold.bandwidth.cir", "is not bytes/s")


def test_bandwidth_burst_below_one_packet(tmp_path):
    errs = errors_of(tmp_path, BW.replace("cbs: 64kB", "cbs: 100"))
    assert_error(errs, 7, "contracts.gold.bandwidth.cbs", "must be >= 1500 bytes")


def test_bad_camara_profile(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("    tpm: 60000", "    tpm: 60000\n"
                                            "    camara_profile: 'QOS E!'"))
    assert_error(errs, 5, "contracts.gold.camara_profile", "is not a CAMARA QoS profile name")


def test_too_many_traffic_classes(tmp_path):
    text = "contracts:\n"
    for i, dscp in enumerate([10, 12, 14, 16, 18, 20]):
        text += (f"  c{i}:\n    class: {{service_class: standard, dscp: {dscp}, "
                 f"priority_level: 10, queue: 1}}\n    tpm: 6000\n")
    text += "tenants: []\n"
    errs = errors_of(tmp_path, text)
    # default class + RoCE's two + c0..c4 fill the 8; c5 (its key on line 17) is one too many
    assert_error(errs, 17, "contracts.c5", "one traffic class too many")


def test_empty_file(tmp_path):
    assert_error(errors_of(tmp_path, ""), 1, "", "the policy file is empty")


def test_unreadable_file(tmp_path):
    errs = validate_file(tmp_path / "nope.yaml")
    assert len(errs) == 1 and "nope.yaml" in errs[0] and "cannot read" in errs[0]


def test_every_error_is_reported_in_one_pass(tmp_path):
    text = GOOD.replace("tpm: 60000", "tpm: -1").replace("10.0.1.0/24", "bad") + "extra: 1\n"
    errs = errors_of(tmp_path, text)
    assert [e.split(":")[1] for e in errs] == ["4", "7", "9"], errs


def test_spec_error_lists_the_same_messages(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD.replace("tpm: 60000", "tpm: 0"))
    with pytest.raises(SpecError) as info:
        load_policy(path)
    assert info.value.errors == [f"{path}:4: contracts.gold.tpm: must be > 0, got 0"]


def test_every_example_is_valid_with_its_fabric():
    for fabric in ("fabric-single.yaml", "fabric-leafspine.yaml"):
        model = load_fabric(EXAMPLES / fabric)
        for policy in sorted(EXAMPLES.glob("policy-*.yaml")):
            assert validate_file(policy, EXAMPLES / fabric) == [], policy
            load_policy(policy, model)


def test_a_5qi_class_that_collides_with_custom_roce_values(tmp_path):
    text = "roce: {priority: 5, cnp_priority: 7}\n" + GOOD.replace(
        "    class: {service_class: low-latency-data, priority_level: 20, queue: 5}",
        "    fiveqi: 1")
    errs = errors_of(tmp_path, text)
    assert_error(errs, 4, "contracts.gold.fiveqi", "queue 5 is reserved for RoCEv2")
    # an explicit class replaces the 5QI's and is what is checked
    fixed = text.replace("    fiveqi: 1", "    fiveqi: 1\n    class: {service_class: "
                                           "telephony, priority_level: 20, queue: 4}")
    assert errors_of(tmp_path, fixed) == []


@pytest.mark.parametrize("text,want", [
    ("!!python/object/apply:os.system ['true']\n", "u.yaml:1: must be a mapping, got a list"),
    ("tenants: !!binary aGVsbG8=\n", "u.yaml:1: tenants: must be a list, got bytes"),
    ("[" * 3000 + "]" * 3000, "u.yaml:1: not accepted: nested deeper than 64 levels"),
    ("tenants:\n" + " " * 300 + "- x\n", "u.yaml:2: not accepted: indented deeper"),
    ("tenants: []\n" + "#" * (9 << 20), "u.yaml:1: not accepted: larger than"),
    ("\x00\x01", "u.yaml:1: not valid YAML: unacceptable character"),
    ("tenants: []\n<<: {a: 1}\n", "u.yaml:1: a: unknown key"),
    ("? [a, b]\n: c\ntenants: []\n", "u.yaml:1: ('a', 'b'): unknown key"),
])
def test_hostile_yaml_is_an_error_not_a_crash(text, want):
    from tokenfabric.controller.model import Model
    from tokenfabric.controller.policy.reload import validate_policy

    policy, errs = validate_policy(Model(), "", text=text, file="u.yaml")
    assert policy is None and errs[0].startswith(want), errs


def test_anchors_and_merge_keys_work():
    from tokenfabric.controller.model import Model
    from tokenfabric.controller.policy.reload import validate_policy

    text = ("contracts:\n  a: &base\n    class: {service_class: standard, priority_level: 9}\n"
            "    tpm: 600\n  b:\n    <<: *base\n    tpm: 1200\n"
            "tenants:\n  - {name: t, prefixes: [10.0.0.0/24], contract: b}\n")
    policy, errs = validate_policy(Model(), "", text=text, file="u.yaml")
    assert errs == [] and policy.contracts["b"].limits.tpm == 1200
    assert policy.contracts["b"].traffic_class.priority_level == 9


def test_a_policy_larger_than_the_switch_tables(tmp_path, monkeypatch):
    import tokenfabric.controller.compile as compiler

    # the real limit is 8192 prefixes; a smaller one keeps the test fast
    monkeypatch.setitem(compiler.TABLE_SIZES, "tenant_by_src", 1)
    text = GOOD + "  - {name: b, prefixes: [10.0.2.0/24], contract: gold}\n"
    errs = errors_of(tmp_path, text, fabric="fabric-single.yaml")
    assert len(errs) == 1 and errs[0].endswith(
        "policy.yaml: switch s1: tenant_by_src needs 2 entries, the switch holds 1"), errs


def test_unknown_key_in_a_nested_mapping_is_placed_at_its_line(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("queue: 5}", "queue: 5, colour: red}"))
    assert_error(errs, 3, "contracts.gold.class.colour", "unknown key")
    assert "known keys: dscp, priority_level, queue, service_class" in errs[0]


def test_one_pass_reports_a_bad_tenant_beside_a_bad_contract(tmp_path):
    text = GOOD + "  - name: b\n    prefixes: [10.0.2.0/24]\n    contract: gold\n    id: true\n"
    errs = errors_of(tmp_path, text.replace("tpm: 60000", "tpm: 6"))
    assert [e.split(": ", 1)[0].rsplit("/", 1)[-1] for e in errs] == [
        "policy.yaml:4", "policy.yaml:12"], errs
    assert errs[1].endswith("tenants[1].id: must be an integer, got a boolean")
