"""The fabric file's `driver` and `datapath_id`, and what GET /switches shows of them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tokenfabric.controller.app import Controller
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.controller.ledger import Ledger
from tokenfabric.controller.policy.source import SpecError

BASE = """
switches:
  s1: {driver: openflow, datapath_id: 66, device_id: 1}
  s2: {address: "127.0.0.1:50051", device_id: 2}
"""


def test_driver_and_datapath_id_are_parsed():
    model = parse_fabric(BASE)
    s1, s2 = model.fabric.switches["s1"], model.fabric.switches["s2"]
    assert (s1.driver, s1.datapath_id, s1.address) == ("openflow", 66, "")
    assert (s2.driver, s2.datapath_id) == ("p4runtime", None)


@pytest.mark.parametrize("switches, message", [
    ("s1: {driver: openflow, device_id: 1}", "missing required key 'datapath_id'"),
    ("s1: {driver: ovs, datapath_id: 1, device_id: 1}", "must be one of p4runtime, openflow"),
    ("s1: {address: '127.0.0.1:1', datapath_id: 1, device_id: 1}",
     "only a switch with driver: openflow has a datapath_id"),
    ("s1: {driver: openflow, datapath_id: -1, device_id: 1}", "datapath_id"),
    ("s1: {device_id: 1}", "missing required key 'address'"),
])
def test_bad_switch_entries_are_reported_with_file_and_line(switches, message):
    with pytest.raises(SpecError) as err:
        parse_fabric(f"switches:\n  {switches}\n", "fab.yaml")
    assert any(message in e and e.startswith("fab.yaml:") for e in err.value.errors), \
        err.value.errors


def test_duplicate_datapath_ids_are_refused():
    text = """
switches:
  s1: {driver: openflow, datapath_id: 5, device_id: 1}
  s2: {driver: openflow, datapath_id: 5, device_id: 2}
"""
    with pytest.raises(SpecError) as err:
        parse_fabric(text, "fab.yaml")
    assert any("datapath_id 5 is already used by switch 's1'" in e for e in err.value.errors)


def test_switch_views_name_driver_and_features_before_connecting(tmp_path):
    ctl = Controller(parse_fabric(BASE), Ledger(tmp_path / "l.db"))
    views = {v["name"]: v for v in ctl.switch_views()}
    assert views["s1"]["driver"] == "openflow" and not views["s1"]["connected"]
    assert "pinning" in views["s1"]["features"]
    assert "p2c_in_switch" not in views["s1"]["features"]
    assert "token_buckets_in_switch" not in views["s1"]["features"]
    assert views["s2"]["driver"] == "p4runtime" and "p2c_in_switch" in views["s2"]["features"]
    ctl.ledger.close()


def test_cli_refuses_a_bad_openflow_listen_address(tmp_path):
    from tokenfabric import cli

    fabric = tmp_path / "fabric.yaml"
    fabric.write_text(BASE)
    result = CliRunner().invoke(cli.main, ["controller", "run", "--fabric", str(fabric),
                                           "--openflow-listen", "nonsense"])
    assert result.exit_code != 0 and "--openflow-listen" in result.output
