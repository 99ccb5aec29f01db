"""The billing cross-check's verdicts (controller/crosscheck.py) and the ledger's port
growth they rest on (a real SQLite ledger)."""

from __future__ import annotations

from tokenfabric.controller.crosscheck import check_ports
from tokenfabric.controller.ledger import Ledger, Usage


def test_a_port_whose_billing_does_not_fit_is_flagged():
    ports = {"b1": ("s1", 3), "b2": ("s1", 4), "b3a": ("s1", 5), "b3b": ("s1", 5),
             "idle": ("s1", 6)}
    billed = {"b1": (10, 100), "b2": (10, 300), "b3a": (0, 60), "b3b": (0, 60)}
    growth = {("s1", 3): (25_000, 3), ("s1", 4): (25_000, 3), ("s1", 5): (20_000, 0)}
    checks = {tuple(c.backends): c for c in check_ports(billed, ports, growth, 0, 10, 200)}
    assert checks[("b1",)].fits is True  # 100 x 200 = 20,000 <= 25,000
    flagged = checks[("b2",)]
    assert flagged.fits is False and flagged.bytes_needed == 60_000
    assert "b2 billed 300 completion tokens" in flagged.detail
    # two backends on one port are judged together; no baseline sample: no verdict
    assert checks[("b3a", "b3b")].fits is None and checks[("b3a", "b3b")].completion_tokens == 120
    assert ("idle",) not in checks  # nothing billed, nothing sampled
    # a floor of 0 switches the check off
    assert all(c.fits is None for c in check_ports(billed, ports, growth, 0, 10, 0))


def test_port_growth_needs_a_baseline_and_survives_a_counter_reset(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    ledger.record_port_bytes("s1", {3: 1000, 4: 50}, now=100.0)
    ledger.record_port_bytes("s1", {3: 1500, 4: 80}, now=110.0)
    ledger.record_port_bytes("s1", {3: 200, 4: 90}, now=120.0)  # port 3's counter restarted
    assert ledger.port_growth(105.0, 130.0) == {("s1", 3): (700, 2), ("s1", 4): (40, 2)}
    assert ledger.port_growth(90.0, 130.0) == {("s1", 3): (0, 0), ("s1", 4): (0, 0)}
    ledger.record(None, "b1", [Usage(1, "m", 5, 7)], now=111.0)
    assert ledger.billed_by_backend(110.0, 112.0) == {"b1": (5, 7)}
    assert ledger.billed_by_backend(112.0, 130.0) == {}
    ledger.close()
