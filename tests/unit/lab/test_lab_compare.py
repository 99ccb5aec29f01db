"""`tokenfabric lab compare`: two results folders of one experiment side by side."""

import json
import os
import subprocess
import sys

import pytest

from tokenfabric.lab import results
from tokenfabric.lab.compare import CompareError, compare


def _summary(mode, load, ttft_p99, ok=10):
    return results.Summary("all", 10, ok, {}, 50.0, 80.0, ttft_p99, 20.0, 30.0, 0.5, 0.9,
                           0.95, 3.25, 100.0, 3.3, {}, {"mode": mode, "load": load}).as_dict()


def _folder(root, name, dataplane, rows, experiment="modes"):
    folder = root / name
    folder.mkdir()
    meta = {"experiment": experiment, "topo": "single", "duration": 30.0}
    if dataplane:
        meta["dataplane"] = dataplane
    (folder / "experiment.json").write_text(json.dumps(meta))
    tenant = dict(rows[0], group="bulk")  # per-tenant rows are left out of the comparison
    (folder / "summary.json").write_text(json.dumps([*rows, tenant]))
    return folder


def test_two_dataplanes_side_by_side(tmp_path):
    # a folder from before --dataplane existed counts as BMv2
    bmv2 = _folder(tmp_path, "modes-single-1", None,
                   [_summary("p2c", 0.5, 111.0), _summary("p2c", 1.0, 222.0)])
    ovs = _folder(tmp_path, "modes-single-ovs-1", "ovs",
                  [_summary("p2c", 0.5, 333.0, ok=9), _summary("ecmp", 0.5, 444.0)])
    text = compare([bmv2, ovs], tmp_path / "out")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| mode"))
    assert "bmv2 TTFT p99 ms | ovs TTFT p99 ms" in header
    p2c_half = next(line for line in lines if line.startswith("| p2c | 0.5 |"))
    assert "| 10/10 | 9/10 |" in p2c_half and "| 111.0 | 333.0 |" in p2c_half
    # a run only one side has: a dash on the other
    assert next(line for line in lines if line.startswith("| ecmp | 0.5 |")).count("–") == 5
    assert next(line for line in lines if line.startswith("| p2c | 1 |")).count("–") == 5
    assert len([line for line in lines if line.startswith("| p2c | 0.5 |")]) == 1
    assert (tmp_path / "out" / "comparison.md").read_text() == text
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_different_experiments_and_non_result_folders_are_refused(tmp_path):
    a = _folder(tmp_path, "a", "bmv2", [_summary("p2c", 0.5, 1.0)])
    b = _folder(tmp_path, "b", "ovs", [_summary("p2c", 0.5, 1.0)], experiment="quick")
    with pytest.raises(CompareError, match="different experiments"):
        compare([a, b])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompareError, match="not a lab results folder"):
        compare([a, tmp_path / "empty"])
    with pytest.raises(CompareError, match="at least two"):
        compare([a])
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "lab", "compare", str(a),
                           str(tmp_path / "empty")], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ), check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "not a lab results folder" in done.stderr
