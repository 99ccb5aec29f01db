"""What several lab tests check the same way."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokenfabric.lab import ovs, prereqs
from tokenfabric.lab.network import leftover_links


def skip_unless_ovs_lab() -> None:
    """Skip unless the OVS lab's components are here and no other lab or OVS is in the way."""
    missing = prereqs.missing_pieces(dataplane="ovs")
    if missing:
        pytest.skip("lab components missing: " + "; ".join(m.name for m in missing))
    skip_unless_ovs_free()


def skip_unless_bmv2_lab() -> None:
    """Skip unless the BMv2 lab's components are here and no other lab network is up."""
    missing = prereqs.missing_pieces()
    if missing:
        pytest.skip("lab components missing: " + "; ".join(m.name for m in missing))
    if leftover_links():
        pytest.skip(f"another lab network is up: {leftover_links()[:3]}")


def skip_unless_ovs_free() -> None:
    """Skip while another lab network is up or another ovs-vswitchd holds this namespace's
    userspace datapath (a test's private OVS ends soon, so wait for it first)."""
    if leftover_links():
        pytest.skip(f"another lab network is up: {leftover_links()[:3]}")
    others = ovs.wait_for_free_datapath(120)
    if others:
        pytest.skip("another ovs-vswitchd holds this namespace's userspace datapath "
                    f"(ovs-netdev): {others[0][:120]}")


def run_prefix_lab(out: Path, *args: str, timeout: float) -> tuple[Path, str]:
    """`tokenfabric lab run --experiment prefix ARGS` into `out`, which must pass: its
    results folder and summary.md (the summary and stderr's end if it failed)."""
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "lab", "run",
                           "--experiment", "prefix", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout)
    [folder] = list(out.iterdir())
    summary = (folder / "summary.md").read_text()
    assert done.returncode == 0, summary + done.stderr[-3000:]
    return folder, summary


def check_quick_run(run: Path) -> list[dict]:
    """A quick run's folder: >= 90% of >= 10 requests ok for both tenants, both backends
    served, and the backends' own counts match what the clients got. The ok records."""
    records = [json.loads(line) for line in (run / "requests.jsonl").read_text().splitlines()]
    assert len(records) >= 10
    ok = [r for r in records if r["ok"]]
    assert len(ok) >= 0.9 * len(records)
    assert {r["tenant"] for r in records} == {"gold", "bulk"}
    assert all(r["ttft"] > 0 and r["output_tokens"] >= 1 for r in ok)
    served = json.loads((run / "served.json").read_text())  # from the emulators' metrics
    assert set(served) == {"tflb1", "tflb2"} and all(v > 0 for v in served.values())
    assert sum(served.values()) == len(ok)
    return ok
