"""What the policy compiler emits for the examples fits token_router's P4Info."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenfabric.controller.southbound import Codec, P4InfoIndex, load_p4info

REPO = Path(__file__).resolve().parents[3]
P4INFO = REPO / "p4src" / "build" / "token_router.p4info.txtpb"
EXAMPLES = REPO / "examples"


def example_pairs() -> list[tuple[Path, Path]]:
    pairs = []
    for policy in sorted(EXAMPLES.glob("policy-*.yaml")):
        text = policy.read_text()
        fabric = "fabric-leafspine.yaml" if "leafspine" in text else "fabric-single.yaml"
        pairs.append((EXAMPLES / fabric, policy))
    return pairs


@pytest.mark.parametrize(("fabric", "policy"), example_pairs(),
                         ids=lambda p: p.name if isinstance(p, Path) else str(p))
def test_compiled_examples_translate(fabric, policy):
    if not P4INFO.exists():
        pytest.skip("p4src/build/token_router.p4info.txtpb not built yet")
    compile_mod = pytest.importorskip("tokenfabric.controller.compile")
    from tokenfabric.controller.fabric import load_fabric
    from tokenfabric.controller.policy.schema import load_policy

    model = load_fabric(fabric)
    model.policy = load_policy(policy, model)
    codec = Codec(P4InfoIndex(load_p4info(P4INFO)))
    states = compile_mod.compile_model(model)
    assert states
    for state in states.values():
        for entity in state.entities.values():
            canonical = codec.normalize(entity)  # raises TranslationError naming the problem
            assert codec.decode(codec.encode(canonical)) == canonical
