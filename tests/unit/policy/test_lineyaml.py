"""The policy loader: YAML 1.2 values, lines of keys and items, and its limits on hostile YAML."""

from __future__ import annotations

import pytest

from bench.policygen import policy_text
from tokenfabric.controller.model import Model
from tokenfabric.controller.policy import lineyaml
from tokenfabric.controller.policy.reload import validate_policy
from tokenfabric.controller.policy.source import MAX_SHOWN_ERRORS


def test_yaml_1_2_core_schema_values():
    data = lineyaml.load("a: yes\nb: on\nc: 0777\nd: 0o17\ne: 0x1f\nf: 1e3\ng: .inf\n"
                         "h: ~\ni: 'true'\nj: true\nk: -5\nl: 1.5.6\nm: 2024-01-01\n")
    assert data == {"a": "yes", "b": "on", "c": 777, "d": 15, "e": 31, "f": 1000.0,
                    "g": float("inf"), "h": None, "i": "true", "j": True, "k": -5,
                    "l": "1.5.6", "m": "2024-01-01"}


def test_lines_of_keys_and_items():
    data = lineyaml.load("a: 1\nlist:\n  - x\n  - k: v\n    w: 2\n")
    assert data.lines == {"a": 1, "list": 2}
    assert data["list"].lines == [3, 4]
    assert data["list"][1].lines == {"k": 4, "w": 5}


def test_merge_keys_earlier_source_wins_and_own_keys_win():
    data = lineyaml.load("a: &a {x: 1, y: 1}\nb: &b {y: 2, z: 2}\n"
                         "c:\n  <<: [*a, *b]\n  z: 3\n")
    assert data["c"] == {"x": 1, "y": 1, "z": 3}
    assert data["c"].lines == {"z": 5}  # merged keys have no line of their own


def test_duplicate_key_is_an_error_with_its_line():
    with pytest.raises(lineyaml.MarkedYAMLError) as err:
        lineyaml.load("a: 1\nb: 2\na: 3\n")
    assert err.value.problem_mark.line == 2 and "duplicate key" in err.value.problem


def test_a_merge_bomb_is_refused():
    # each level merges the previous one twice: 2^40 keys if merges were copies
    lines = ["l0: &l0 {k0: 1}"]
    for i in range(1, 40):
        lines.append(f"l{i}: &l{i} {{<<: [*l{i - 1}, *l{i - 1}], k{i}: 1}}")
    data = lineyaml.load("\n".join(lines) + "\n")
    assert len(data["l39"]) == 40  # each key merged once


def test_an_alias_bomb_is_refused():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):  # 10^9 values once expanded
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(lineyaml.TooLarge):
        lineyaml.load("\n".join(lines) + "\n")
    policy, errors = validate_policy(Model(), "", text="\n".join(lines) + "\ntenants: []\n",
                                     file="p.yaml")
    assert policy is None and "values once aliases are expanded" in errors[0]


def test_a_node_that_contains_itself_is_refused():
    with pytest.raises(lineyaml.TooLarge, match="contains it"):
        lineyaml.load("a: &a [1, *a]\n")


def test_many_errors_print_the_first_and_count_the_rest():
    policy, errors = validate_policy(Model(), "", text=policy_text(500, unknown_key=True),
                                     file="p.yaml")
    assert policy is None and len(errors) == MAX_SHOWN_ERRORS + 1
    assert errors[0].startswith("p.yaml:10: tenants[0].colour: unknown key")
    assert errors[-1] == f"p.yaml: ... and {500 - MAX_SHOWN_ERRORS} more errors"


def test_more_tenants_than_slots_is_one_error():
    policy, errors = validate_policy(Model(), "", text=policy_text(4200), file="p.yaml")
    assert policy is None and len(errors) == 1
    assert errors[0].startswith("p.yaml:4105: tenants[4095]: no free tenant id")
    assert "this tenant and 104 more after it" in errors[0]
