import json

import numpy as np
import pytest

from tokenfabric.lab import results
from tokenfabric.lab.capture import HostEvidence


def rec(i, ttft=0.1, tpot=0.02, ok=True, tenant="gold", backend="b1", start=0.0, error=None,
        status=200, out=10, slo_ttft_ms=200, slo_tpot_ms=50):
    return {"id": i, "tenant": tenant, "class": "c", "offset": start, "start": 1000.0 + start,
            "status": status, "ok": ok, "error": error, "ttft": ttft if ok else None,
            "tpot": tpot if ok else None, "e2e": (ttft + tpot * (out - 1)) if ok else 0.01,
            "output_tokens": out if ok else None, "backend": backend if ok else None,
            "slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms}


def test_percentiles_attainment_and_goodput():
    # 100 requests over 10 s: TTFT 1..100 ms, two of them failed (one 429, one reset).
    records = [rec(i, ttft=(i + 1) / 1000, start=i / 10) for i in range(98)]
    records += [rec(98, ok=False, status=429, error="http_429", start=9.8),
                rec(99, ok=False, status=None, error="reset: ClientOSError", start=9.9)]
    records[5]["ttft"] = 0.5  # one SLO miss by TTFT
    records[6]["tpot"] = 0.06  # one by TPOT
    s = results.summarize(records, duration=10.0)
    assert s.requests == 100 and s.ok == 98
    assert s.errors == {"http_429": 1, "reset": 1}
    assert s.slo_attainment == pytest.approx(96 / 100)
    assert s.goodput_rps == pytest.approx(9.6)
    assert s.goodput_tps == pytest.approx(96)
    assert s.throughput_rps == pytest.approx(9.8)
    assert s.ttft_p50_ms == pytest.approx(50.5, abs=1.0)
    assert s.ttft_p99_ms > 95
    assert s.backends == {"b1": 98}


def test_summarize_by_tenant_and_the_markdown_table():
    records = [rec(i, tenant="gold") for i in range(5)] + [
        rec(5 + i, tenant="bulk", ok=False, status=429, error="http_429") for i in range(5)]
    summaries = results.summarize_by(records, "tenant", duration=1.0, labels={"mode": "p2c"})
    assert [s.group for s in summaries] == ["all", "bulk", "gold"]
    assert summaries[1].slo_attainment == 0 and summaries[2].slo_attainment == 1
    table = results.markdown_table(summaries, label_keys=["mode"])
    lines = table.strip().splitlines()
    assert lines[0].startswith("| mode | group | requests")
    assert len(lines) == 5
    assert "| p2c | gold | 5 | 5 |" in table
    assert "http_429:5" in table


def test_an_empty_run_has_no_percentiles_not_a_crash():
    s = results.summarize([])
    assert s.requests == 0 and s.ttft_p99_ms is None and s.slo_attainment is None


def test_load_records_skips_malformed_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec(1)) + "\n{not json\n[1,2]\n\n" + json.dumps(rec(2)) + "\n")
    assert [r["id"] for r in results.load_records(path)] == [1, 2]


def test_report_writes_a_table_plots_and_json(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [rec(i, backend=f"b{i % 2}", start=i / 10, tenant=("gold", "bulk")[i % 2])
            for i in range(40)] + [rec(40, ok=False, error="connect", status=None)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = results.report(path, tmp_path / "out", title="quick")
    assert text.startswith("# quick")
    for name in ("ttft_cdf.png", "timeline.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert (tmp_path / "out" / "summary.md").read_text() == text
    parsed = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert parsed[0]["requests"] == 41 and parsed[0]["errors"] == {"connect": 1}


def test_sweep_plot(tmp_path):
    summaries = []
    for mode in ("ecmp", "p2c"):
        for load in (0.5, 0.85):
            rows = [rec(i, ttft=load / (2 if mode == "p2c" else 1)) for i in range(10)]
            summaries.append(results.summarize(rows, duration=1, labels={"mode": mode,
                                                                            "load": load}))
    out = results.plot_sweep(summaries, "load", "mode",
                             [("ttft_p99_ms", "TTFT p99 (ms)"), ("goodput_rps", "goodput")],
                             tmp_path / "sweep.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_failover_stats_measure_from_the_last_beacon_with_real_evidence():
    kill = 1005.0  # rec() starts at 1000 + start
    rows = [rec(0, backend="b2", start=3.0),  # done before the kill
            rec(1, backend="b2", start=4.9, ttft=0.1, tpot=0.1),  # in flight, succeeded
            rec(2, ok=False, error="reset: ClientOSError", status=200, start=4.95),
            rec(3, ok=False, error="connect", status=None, start=5.02),  # refused
            rec(4, ok=False, error="connect", status=None, start=5.08),
            rec(5, backend="b1", start=5.5), rec(6, backend="b3", start=6.0),
            rec(7, ok=False, error="http_429", status=429, start=6.5)]  # not b2's fault
    rows[2]["e2e"] = 0.2  # cut by the kill
    # The capture: beacons every 20 ms up to 1004.99; SYNs at 1005.021 and 1005.081.
    evidence = HostEvidence(load_beacons=[1004.95, 1004.97, 1004.99],
                            syns=[1004.90, 1005.021, 1005.081])
    stats = results.failover_stats(rows, kill, "b2", evidence)
    assert stats["failed in flight at the kill"] == 1
    assert stats["failed requests"] == 4
    assert stats["refused connections after the kill"] == 2
    assert stats["last LOAD beacon before the kill (ms)"] == pytest.approx(-10, abs=0.01)
    assert stats["SYNs reaching it after its last beacon"] == 2
    assert stats["responses served by it after its last beacon"] == 0
    assert stats["last new connection after its last beacon (ms)"] == pytest.approx(91, abs=0.01)
    table = results.failover_markdown("b2", stats, "capture")
    assert "| backend b2 killed (capture) | value |" in table
    assert "| last new connection after its last beacon (ms) | 91.0 |" in table

    # Without a capture: refused connections are failures, not "reached b2"; only a
    # response naming b2 counts, measured from the kill.
    stats = results.failover_stats(rows, kill, "b2")
    assert stats["refused connections after the kill"] == 2
    assert stats["last new connection after its last beacon (ms)"] == 0.0
    rows.append(rec(8, backend="b2", start=5.05))  # served by b2 after the kill
    stats = results.failover_stats(rows, kill, "b2")
    assert stats["responses served by it after its last beacon"] == 1
    assert stats["last new connection after its last beacon (ms)"] == pytest.approx(50, abs=0.01)


def test_p99_ratio_interval_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    small = [rng.exponential(1.0, 200), rng.exponential(1.0, 200)]
    large = [rng.exponential(1.0, 5000), rng.exponential(1.0, 5000)]
    ratio, low, high = results.p99_ratio_interval(*small)
    assert low <= ratio <= high
    _, low_l, high_l = results.p99_ratio_interval(*large)
    assert low_l <= 1.0 <= high_l  # same distribution: 1 is inside
    assert high_l - low_l < (high - low) / 2
    # twice as slow: the ratio is 2, and the interval says so
    ratio, low, high = results.p99_ratio_interval(large[0] * 2, large[1])
    assert 1.6 < low <= ratio <= high < 2.5
    assert results.p99_ratio_interval([], [1.0]) is None


def _records(ok: int, shed: int = 0, failed: int = 0, tenant: str = "gold") -> list[dict]:
    rows = []
    for i in range(ok + shed + failed):
        kind = "ok" if i < ok else ("shed" if i < ok + shed else "failed")
        rows.append({"id": i, "tenant": tenant, "ok": kind == "ok", "start": 100.0 + i,
                     "e2e": 0.5, "ttft": 0.1 if kind == "ok" else None,
                     "status": {"ok": 200, "shed": 429, "failed": None}[kind],
                     "error": {"ok": None, "shed": "http_429", "failed": "timeout"}[kind]})
    return rows


def test_verdict_counts_only_what_the_policy_did_not_shed():
    # 735 shed by design, 264 of 264 others ok: the overload experiment passes
    summary = results.summarize(_records(264, shed=735))
    verdict = results.verdict(summary, 0.95)
    assert (verdict.ok, verdict.counted, verdict.shed) == (264, 264, 735)
    assert verdict.passed and "PASSED" in verdict.text() and "264 of 264" in verdict.text()


def test_a_dead_data_path_is_failed_not_finished():
    # the run: 77 requests, 0 ok, timeout:77
    verdict = results.verdict(results.summarize(_records(0, failed=77)), 0.95)
    assert not verdict.passed and verdict.share == 0.0
    assert "FAILED" in verdict.text() and "0 of 77" in verdict.text()


def test_verdict_at_the_threshold_and_below():
    assert results.verdict(results.summarize(_records(95, failed=5)), 0.95).passed
    assert not results.verdict(results.summarize(_records(94, failed=6)), 0.95).passed
    # a stated lower expectation (failover) passes what the default would fail
    assert results.verdict(results.summarize(_records(94, failed=6)), 0.9).passed


def test_planned_requests_without_a_record_count_as_failed():
    summary = results.summarize(_records(10))
    assert results.verdict(summary, 0.95).passed
    verdict = results.verdict(summary, 0.95, planned=20)  # the load generator died half way
    assert verdict.counted == 20 and not verdict.passed


def test_nothing_to_judge_is_a_failure():
    assert not results.verdict(results.summarize([]), 0.95).passed
    all_shed = results.verdict(results.summarize(_records(0, shed=5)), 0.95)
    assert not all_shed.passed and "every one of 5 requests was shed" in all_shed.text()
