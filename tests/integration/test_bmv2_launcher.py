"""Bmv2Switch starts a real simple_switch_grpc on veths and ends exactly that process."""

import pytest

from tokenfabric.bmv2 import Bmv2Error, Bmv2Options, Bmv2Switch
from tokenfabric.netns import leftovers, sandbox
from tokenfabric.tools import port_open

pytestmark = [pytest.mark.root, pytest.mark.bmv2]


def test_switch_opens_grpc_and_thrift_then_stops(tmp_path):
    with sandbox("tfbl-") as box:
        host = box.netns("h1")
        box.veth("tfbl-s1", "tfbl-h1", None, host)
        opts = Bmv2Options(ports={1: "tfbl-s1"}, log_path=tmp_path / "s1.log")
        with Bmv2Switch(opts) as switch:
            assert port_open("127.0.0.1", opts.grpc_port)
            assert port_open("127.0.0.1", opts.thrift_port)
            pid = switch.pid
        assert switch.proc.poll() is not None
        assert not port_open("127.0.0.1", opts.grpc_port)
        assert pid and opts.log_file.exists()
    assert leftovers("tfbl-") == []


def test_a_switch_that_cannot_start_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    opts = Bmv2Options(ports={}, json_path=broken, log_path=tmp_path / "s.log")
    with pytest.raises(Bmv2Error, match="exited|did not open"):
        Bmv2Switch(opts).start(timeout=10)
