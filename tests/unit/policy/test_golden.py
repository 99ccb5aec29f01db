"""Golden P4Runtime entries for every example under examples/.

Each policy example is compiled with its fabric and compared with
tests/data/policy/<policy>.json (one list of entities per switch). After an
intended change of the compiler or an example, regenerate and review the diff:

    TOKENFABRIC_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/policy/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tokenfabric.controller.compile import compile_model, state_to_list
from tokenfabric.controller.fabric import load_fabric
from tokenfabric.controller.policy.schema import load_policy
from tokenfabric.dataplane import TOKEN_ROUTER_P4INFO

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"
GOLDEN = REPO / "tests" / "data" / "policy"
REGEN = os.environ.get("TOKENFABRIC_REGEN_GOLDEN") == "1"

# Which fabric each policy example is written for.
PAIRS = {
    "policy-tenants.yaml": "fabric-single.yaml",
    "policy-5qi.yaml": "fabric-single.yaml",
    "policy-roce.yaml": "fabric-leafspine.yaml",
    "policy-bandwidth.yaml": "fabric-single.yaml",
}


def compiled(policy: str) -> dict[str, list[dict]]:
    model = load_fabric(EXAMPLES / PAIRS[policy])
    model.policy = load_policy(EXAMPLES / policy, model)
    return {name: state_to_list(state) for name, state in sorted(compile_model(model).items())}


def dump(states: dict[str, list[dict]]) -> str:
    """One entity per line, so that a regenerated file reviews as a readable diff."""
    parts = []
    for name, entities in states.items():
        lines = ",\n".join("  " + json.dumps(e, sort_keys=True) for e in entities)
        parts.append(f"{json.dumps(name)}: [\n{lines}\n]")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def test_every_example_has_a_golden_pair():
    policies = {p.name for p in EXAMPLES.glob("policy-*.yaml")}
    fabrics = {p.name for p in EXAMPLES.glob("fabric-*.yaml")}
    assert policies == set(PAIRS), "add the new example to PAIRS (and regenerate)"
    assert fabrics == set(PAIRS.values()), "every fabric example is compiled by some policy"


@pytest.mark.parametrize("policy", sorted(PAIRS))
def test_golden_entries(policy):
    got = compiled(policy)
    path = GOLDEN / policy.replace(".yaml", ".json")
    if REGEN:  # writing then comparing would prove nothing: review the diff instead
        path.write_text(dump(got))
        pytest.skip(f"regenerated {path.name}: review `git diff {GOLDEN.name}`")
    assert path.exists(), f"{path} missing: run with TOKENFABRIC_REGEN_GOLDEN=1"
    want = json.loads(path.read_text())
    assert got.keys() == want.keys()
    for switch in want:
        missing = [e for e in want[switch] if e not in got[switch]]
        extra = [e for e in got[switch] if e not in want[switch]]
        assert not missing and not extra, f"{switch}: missing {missing[:3]} extra {extra[:3]}"
        assert got[switch] == want[switch]


@pytest.mark.parametrize("policy", sorted(PAIRS))
def test_entries_name_no_default_only_action(policy):
    """An entry's action is one the P4Info lets an entry name (not default-only, and not
    NoAction: an entry that does nothing is a compile slip)."""
    from p4.config.v1 import p4info_pb2

    info = _p4info()
    names = {a.preamble.id: a.preamble.name for a in info.actions}
    entry_actions = {t.preamble.name: {names[r.id] for r in t.action_refs
                                       if r.scope != p4info_pb2.ActionRef.DEFAULT_ONLY
                                       and names[r.id] != "NoAction"}
                     for t in info.tables}
    for entities in compiled(policy).values():
        for e in entities:
            if "table" in e and "action" in e:
                assert e["action"] in entry_actions[e["table"]], e
            elif "table" in e:
                assert e["table"] == "service_pool" and "group" in e


def _p4info():
    if not TOKEN_ROUTER_P4INFO.exists():
        pytest.skip(f"{TOKEN_ROUTER_P4INFO} not built yet (p4src/build.sh)")
    from google.protobuf import text_format
    from p4.config.v1 import p4info_pb2

    info = p4info_pb2.P4Info()
    text_format.Parse(TOKEN_ROUTER_P4INFO.read_text(), info)
    return info


@pytest.mark.parametrize("policy", sorted(PAIRS))
def test_entries_fit_the_p4info(policy):
    """Every table, key, action and parameter exists in the compiled program, and fits."""
    info = _p4info()
    tables = {t.preamble.name: t for t in info.tables}
    actions = {a.preamble.name: a for a in info.actions}
    meters = {m.preamble.name: m for m in info.meters}
    profiles = {p.preamble.name for p in info.action_profiles}
    model = load_fabric(EXAMPLES / PAIRS[policy])
    model.policy = load_policy(EXAMPLES / policy, model)
    for state in compile_model(model).values():
        for e in state.entities.values():
            kind = type(e).__name__
            if kind == "TableEntry":
                t = tables[e.table]
                fields = {f.name: f.bitwidth for f in t.match_fields}
                for name, value in e.match:
                    assert name in fields, (e.table, name)
                    assert value.value < 2 ** fields[name], (e.table, name, value)
                action = getattr(e.action, "name", None)
                if action is not None:
                    assert action in {a.preamble.name for a in actions.values()
                                      if a.preamble.id in {r.id for r in t.action_refs}}
                    params = {p.name: p.bitwidth for p in actions[action].params}
                    assert {k for k, _ in e.action.params} == set(params), action
                    for k, v in e.action.params:
                        assert 0 <= v < 2 ** params[k], (action, k, v)
            elif kind == "ProfileMember":
                assert e.profile in profiles
                params = {p.name: p.bitwidth for p in actions[e.action.name].params}
                assert {k for k, _ in e.action.params} == set(params)
            elif kind == "ProfileGroup":
                assert e.profile in profiles
            elif kind == "MeterConfig":
                assert e.meter in meters and e.index < meters[e.meter].size
