"""The affinity reports' queue without a controller: bounded, deduplicated, never blocking.
(Sending them to a real controller: tests/integration/hostagent/test_handoff.py.)"""

from __future__ import annotations

from tests.manual_clock import Clock
from tests.unit.hostagent.closed_controller import run_until_failed
from tokenfabric.hostagent.affinity_reports import AffinityReporter
from tokenfabric.hostagent.handoff import HandoffMetrics


def counted(reporter: AffinityReporter, outcome: str) -> float:
    value = reporter.metrics.registry.get_sample_value(
        "tokenfabric_affinity_reports_total", {"backend": "gpu1", "outcome": outcome})
    return value or 0.0


def test_a_full_queue_drops_and_counts_and_a_pending_client_is_not_queued_twice():
    reporter = AffinityReporter("gpu1", HandoffMetrics("gpu1"), max_pending=2)
    reporter.note("10.0.1.7")
    reporter.note("10.0.1.7")        # already waiting: one report
    reporter.note("10.0.1.8")
    reporter.note("10.0.1.9")        # the queue holds 2: dropped
    assert list(reporter.pending) == ["10.0.1.7", "10.0.1.8"]
    assert counted(reporter, "deduped") == 1 and counted(reporter, "dropped") == 1
    assert reporter.wake.is_set()
    # not a client the switch can see (not IPv4, loopback, ...): nothing queued or counted
    for bad in ("", "::1", "not-an-address", "10.0.1.300", "127.0.0.1", "0.0.0.0",
                "224.0.0.1"):
        reporter.note(bad)
    assert len(reporter.pending) == 2 and counted(reporter, "dropped") == 1


def test_a_client_reported_within_the_window_is_deduplicated_then_reported_again():
    clock = Clock()
    reporter = AffinityReporter("gpu1", HandoffMetrics("gpu1"), window_s=30.0, clock=clock)
    reporter.services = ["tiny"]
    reporter.recent[("tiny", "10.0.1.7")] = clock.now + 30.0  # as _send leaves it
    reporter.note("10.0.1.7")
    assert not reporter.pending and counted(reporter, "deduped") == 1
    clock.now += 31.0
    reporter.note("10.0.1.7")
    assert list(reporter.pending) == ["10.0.1.7"]
    # a backend in two services: reported again while one of them has no fresh report
    reporter.pending.clear()
    reporter.services = ["tiny", "big"]
    reporter.recent[("tiny", "10.0.1.7")] = clock.now + 30.0
    reporter.note("10.0.1.7")
    assert list(reporter.pending) == ["10.0.1.7"]


def test_the_outcomes_are_kept_for_the_handoff_summary_too():
    metrics = HandoffMetrics("gpu1")
    reporter = AffinityReporter("gpu1", metrics, max_pending=1)
    reporter.note("10.0.1.7")
    reporter.note("10.0.1.8")
    assert metrics.counts[("affinity", "dropped")] == 1


def test_an_unreachable_controller_counts_failed_and_the_client_may_come_again():
    """A real ControllerClient at a closed port on 127.0.0.1: the report fails fast."""
    reporter = AffinityReporter("gpu1", HandoffMetrics("gpu1"))
    reporter.services = ["tiny"]
    run_until_failed(reporter.run, lambda: reporter.note("10.0.1.7"),
                     lambda: bool(counted(reporter, "failed")))
    assert counted(reporter, "failed") == 1 and counted(reporter, "sent") == 0
    # not learned by the controller: the client's next request may report it again
    assert ("tiny", "10.0.1.7") not in reporter.recent
    reporter.note("10.0.1.7")
    assert list(reporter.pending) == ["10.0.1.7"]


def test_a_shared_address_is_not_reported_for_a_while_and_its_entry_withdrawn_once():
    clock = Clock()
    reporter = AffinityReporter("gpu1", HandoffMetrics("gpu1"), clock=clock, shared_s=300.0)
    reporter.note("10.0.1.200")
    reporter.shared("10.0.1.200")
    # the pending report is dropped, a withdrawal queued in its place
    assert not reporter.pending and list(reporter.withdrawals) == ["10.0.1.200"]
    reporter.note("10.0.1.200")
    assert not reporter.pending and counted(reporter, "shared") == 1
    # seen shared again while it still is: no second withdrawal
    reporter.withdrawals.clear()
    reporter.shared("10.0.1.200")
    assert not reporter.withdrawals
    # after the window it is an ordinary client again
    clock.now += 301.0
    reporter.note("10.0.1.200")
    assert list(reporter.pending) == ["10.0.1.200"]
    for bad in ("127.0.0.1", "::1", "nope"):
        reporter.shared(bad)
    assert list(reporter.withdrawals) == []
