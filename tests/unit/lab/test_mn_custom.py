import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "mininet" / "tokenfabric_mn.py"


def test_custom_file_loads_by_path_and_builds_both_topologies():
    pytest.importorskip("mininet.topo", reason="Mininet's Python module is not installed")
    spec = importlib.util.spec_from_file_location("tokenfabric_mn", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.topos) == {"tfsingle", "tfleafspine"}
    assert module.switches["bmv2"].__name__ == "Bmv2MininetSwitch"
    assert module.switches["tfovs"].__name__ == "OvsMininetSwitch"
    single = module.topos["tfsingle"](3, 2)
    assert len(single.switches()) == 1 and len(single.hosts()) == 3 + 2 + 1
    leafspine = module.topos["tfleafspine"](2, 4)
    assert len(leafspine.switches()) == 5
    assert len(leafspine.links()) == 2 + 1 + 4 + 3 * 2
    assert not (SCRIPT.parent / "__init__.py").exists()  # never a package named mininet


def test_custom_file_loads_the_way_mn_does_without_dunder_file():
    """`mn --custom` execs the file's text in a bare namespace (no __file__)."""
    pytest.importorskip("mininet.topo", reason="Mininet's Python module is not installed")
    namespace: dict = {}
    exec(compile(SCRIPT.read_text(), str(SCRIPT), "exec"), namespace, namespace)  # noqa: S102
    assert set(namespace["topos"]) == {"tfsingle", "tfleafspine"}
    assert set(namespace["switches"]) == {"bmv2", "tfovs"}
