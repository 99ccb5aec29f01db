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
