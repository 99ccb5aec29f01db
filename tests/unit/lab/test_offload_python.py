"""A Python without pyroute2 0.9 (Debian's python3 running plain `mn --custom`) gets a
message saying what is missing and how to run it instead, not a traceback from deep
inside a switch's start."""

import subprocess

import pytest

from tests.conftest import REPO

SYSTEM_PYTHON = "/usr/bin/python3"


def test_offload_without_a_usable_pyroute2_names_it_and_the_way_out():
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import pyroute2.ethtool.ioctl as m; "
                            "assert hasattr(m.IoctlEthtool, 'set_offload_flag')"],
                           capture_output=True, check=False)
    if probe.returncode == 0:
        pytest.skip("Debian's python3 has a pyroute2 0.9 here")
    done = subprocess.run([SYSTEM_PYTHON, "-c",
                           "from tokenfabric.lab.offload import checksum_offload_off\n"
                           "checksum_offload_off(['lo'])"],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert done.returncode != 0
    assert "OffloadError" in done.stderr and "pyroute2>=0.9" in done.stderr
    assert ".venv/bin/python $(command -v mn) --custom" in done.stderr
