"""Any damage to a valid file gives file:line errors, never an exception.

Each example is parsed, one value somewhere in it is replaced by a value of
another type or range (or its key removed, or an unknown key added), and the
result must validate to a list of `file:line: ...` messages (or to none, when
the mutation happened to be valid). Deterministic seeds keep it reproducible.
"""

from __future__ import annotations

import random
import re
from io import StringIO
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tokenfabric.controller.fabric import load_fabric
from tokenfabric.controller.policy.reload import validate_policy
from tokenfabric.controller.policy.source import SpecError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
LINE = re.compile(r"^[^:]+:\d+: ")
WEIRD = [None, True, -1, 0, 2**70, 3.5, "", "x" * 300, "10.0.0.0/8", [], [1, "a"], {},
         {"k": 1}, "26", 64, -2**31, "QOS_E", "drop"]


def paths(node, prefix=()):  # noqa: ANN001, ANN201
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k), node, k
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*prefix, i), node, i
            yield from paths(v, (*prefix, i))


def mutate(text: str, rng: random.Random) -> str:
    yaml = YAML()
    data = yaml.load(text)
    spots = list(paths(data))
    _, parent, key = rng.choice(spots)
    roll = rng.random()
    if roll < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif roll < 0.25 and isinstance(parent, dict):
        parent[f"extra_{rng.randrange(99)}"] = 1
    else:
        parent[key] = rng.choice(WEIRD)
    out = StringIO()
    yaml.dump(data, out)
    return out.getvalue()


@pytest.mark.parametrize("example,fabric", [
    ("policy-tenants.yaml", "fabric-single.yaml"),
    ("policy-5qi.yaml", "fabric-single.yaml"),
    ("policy-roce.yaml", "fabric-leafspine.yaml"),
    ("policy-bandwidth.yaml", "fabric-single.yaml"),
])
def test_mutated_policies_give_line_errors(example, fabric):
    model = load_fabric(EXAMPLES / fabric)
    text = (EXAMPLES / example).read_text()
    rng = random.Random(example)
    bad = 0
    for _ in range(60):
        policy, errors = validate_policy(model, "", text=mutate(text, rng), file="p.yaml")
        assert (policy is None) == bool(errors)
        for e in errors:
            assert LINE.match(e), e
        bad += bool(errors)
    assert bad > 30  # most mutations are errors: the test exercises the error paths


@pytest.mark.parametrize("fabric", ["fabric-single.yaml", "fabric-leafspine.yaml"])
def test_mutated_fabrics_give_line_errors(fabric, tmp_path):
    text = (EXAMPLES / fabric).read_text()
    rng = random.Random(fabric)
    bad = 0
    for i in range(60):
        path = tmp_path / f"f{i}.yaml"
        path.write_text(mutate(text, rng))
        try:
            load_fabric(path)
        except SpecError as exc:
            bad += 1
            assert exc.errors
            for e in exc.errors:
                assert LINE.match(e), e
    assert bad > 30
