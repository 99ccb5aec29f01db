"""Experiment `prefix`'s pieces: workloads at a load, hit rates, baseline evidence."""

from __future__ import annotations

from tokenfabric.lab import prefix

SPEEDS = [1.0, 1.0, 0.5, 0.5]


def test_workloads_offer_the_asked_share_of_capacity():
    for make in (prefix.chat_workload, prefix.trace_workload, prefix.prefix_free_workload):
        planned = make(60.0, SPEEDS, 0.85)
        assert planned and max(p.offset for p in planned) < 60.0
        rate = len(planned) / max(p.offset for p in planned)
        capacity = prefix.capacity_rps(planned, SPEEDS)
        assert 0.6 < rate / capacity < 1.1, make.__name__
    chat = prefix.chat_workload(60.0, SPEEDS, 0.85)
    devices = {p.source_ip for p in chat if p.tenant == prefix.DEVICES}
    apps = {p.source_ip for p in chat if p.tenant == prefix.APP_SERVER}
    assert len(devices) > 10 and apps == {"10.0.1.200"}
    # turns of one conversation share its growing prompt
    first = min((p for p in chat if p.turn == 1), key=lambda p: p.offset)
    earlier = next(p for p in chat if p.conversation == first.conversation and p.turn == 0)
    assert first.prompt.startswith(earlier.prompt)


def test_hit_rate_is_hits_over_queries_summed_over_the_backends():
    text = ('vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 300.0\n'
            'vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 1000.0\n')
    assert prefix.prefix_counters(text) == (300.0, 1000.0)
    before = {"b1": (100.0, 400.0), "b2": (0.0, 0.0)}
    after = {"b1": (300.0, 1000.0), "b2": (50.0, 400.0)}
    assert prefix.hit_rate(before, after) == 250 / 1000
    assert prefix.hit_rate(after, after) is None


def test_a_baseline_that_fell_back_makes_its_run_invalid():
    fell_back = "DEBUG cache_aware: render_unavailable for worker http://b1"
    ok, why = prefix.baseline_evidence("vllm-cache_aware", fell_back, 400, 100)
    assert not ok and "render_unavailable" in why
    ok, why = prefix.baseline_evidence("vllm-cache_aware", "Cache prefix decision x", 40, 100)
    assert not ok and "/render calls" in why
    decided = "\x1b[2mCache prefix decision\x1b[0m match_rate=0.98\n" * 80
    assert prefix.baseline_evidence("vllm-cache_aware", decided, 400, 100)[0]
    assert prefix.baseline_evidence("vllm-power_of_two", "", 0, 100)[0]
    assert not prefix.baseline_evidence("sglang-cache_aware", "policy: random", 0, 10)[0]
    routed = "DEBUG smg::observability::events: Sending request url=http://10.0.0.11:8001\n"
    assert prefix.baseline_evidence("sglang-cache_aware", "policy=CacheAware\n" + routed * 10,
                                    0, 10)[0]


# sglang-router 0.3.2's own lines (lab log, ANSI colours as it writes them)
SGLANG_START = ("\x1b[2m2026-12-05 12:55:00\x1b[0m \x1b[32m INFO\x1b[0m smg::policies::registry: "
                "registry.rs:89: Assigning policy cache_aware to new model unknown\n")
SGLANG_EVICTION = ("\x1b[2m2026-12-05 12:55:59\x1b[0m \x1b[34mDEBUG\x1b[0m "
                   "\x1b[2msmg::policies::cache_aware\x1b[0m: /src/policies/cache_aware.rs:114: "
                   "Cache eviction completed for model unknown, max_size: 67108864\n")
SGLANG_ROUTED = ("\x1b[2m2026-12-05 12:57:05\x1b[0m \x1b[34mDEBUG\x1b[0m http_request{method=POST "
                 "uri=/v1/chat/completions}: smg::observability::events: events.rs:58: "
                 "Sending request url=http://10.0.0.13:8001\n")


def test_sglang_evidence_of_a_later_round_comes_from_its_start_up_and_the_rounds_requests():
    """The lab's repeated rounds share one sglang-router: a round's part of its log lacks
    the start-up line that names the policy (it was judged INVALID then, unless its
    once-a-minute eviction line, from cache_aware.rs, happened to fall in the round)."""
    startup = SGLANG_START + SGLANG_ROUTED * 5
    this_round = SGLANG_ROUTED * 12
    ok, why = prefix.baseline_evidence("sglang-cache_aware", this_round, 0, 12,
                                       startup + this_round)
    assert ok and "12 requests routed" in why
    # the round's part alone names no policy
    assert not prefix.baseline_evidence("sglang-cache_aware", this_round, 0, 12)[0]
    # the eviction line's source path is no evidence of the policy
    ok, why = prefix.baseline_evidence("sglang-cache_aware", SGLANG_EVICTION + this_round,
                                       0, 12)
    assert not ok and "does not name" in why
    # requests that did not go through the router
    ok, why = prefix.baseline_evidence("sglang-cache_aware", SGLANG_ROUTED * 3, 0, 12,
                                       startup)
    assert not ok and "3 routed requests for 12" in why


def test_mode_figures_count_handoffs_per_tenant():
    def rec(tenant: str, handoff: bool, cached: int) -> dict:
        return {"ok": True, "tenant": tenant, "ttft": 0.1, "tpot": 0.01, "e2e": 0.5,
                "start": 1.0, "output_tokens": 10, "prompt_tokens": 100,
                "cached_tokens": cached, "handoff_from": "b1" if handoff else None,
                "handoff_ms": 3.0 if handoff else None, "slo_ttft_ms": 1000,
                "slo_tpot_ms": 200}
    records = [rec("devices-aff", False, 80)] * 3 + [rec("appserver-aff", True, 90)] * 2
    got = prefix.mode_figures(records, 0.5, 10.0)
    assert got["handoff_share"] == 2 / 5 and got["hit_rate"] == 0.5
    assert got["tenants"]["devices"]["handoff_share"] == 0
    assert got["tenants"]["appserver"]["handoff_share"] == 1
    assert got["tenants"]["appserver"]["hit_rate_usage"] == 0.9
    assert got["handoff_added_ms_p50"] == 3.0
