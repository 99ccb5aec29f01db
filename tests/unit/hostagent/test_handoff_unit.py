"""The handoff's pieces without servers: its config keys, signatures, block keys."""

from __future__ import annotations

import pytest

from tokenfabric.blockhash import BlockHasher
from tokenfabric.config import ConfigError
from tokenfabric.hostagent.config import validate
from tokenfabric.hostagent.handoff import (
    HandoffSettings,
    LocalLoad,
    decide,
    emulator_token_ids,
    home_of,
    rendezvous,
    sign,
    verify,
)
from tokenfabric.hostagent.wordtok import WordTokenizer

SECRET = "0123456789abcdef-secret"


AGENT = {"name": "gpu1", "address": "10.0.2.10", "mac": "02:00:00:00:00:01",
         "switch": "s1", "port": 3, "vip": "10.0.100.1"}


def handoff(raw: object) -> dict:
    return validate({**AGENT, "handoff": raw}).handoff


def test_handoff_config_is_off_by_default_and_checked_key_by_key(tmp_path):
    assert validate(AGENT).handoff == {}
    assert handoff({}) == {} and handoff({"enabled": False, "port": 1}) == {}
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    got = handoff({"secret_file": str(secret), "port": 9000, "min_ratio": 2})
    assert got == {"secret": SECRET.encode(), "port": 9000, "min_ratio": 2}
    got = handoff({"secret": SECRET, "report_local": False, "home_weight": 0,
                   "shared_in_flight": 4})
    assert got["report_local"] is False and got["home_weight"] == 0
    for bad, message in (({"enabled": True}, "needs secret_file"),
                         ({"secret": "short"}, "at least 16 bytes"),
                         ({"secret": SECRET, "nope": 1}, "unknown key"),
                         ({"secret": SECRET, "port": 1.5}, "must be a int"),
                         ({"secret": SECRET, "port": True}, "must be a int"),
                         ({"secret": SECRET, "report_local": 1}, "must be a bool"),
                         ({"secret": SECRET, "shared_in_flight": 1}, "shared_in_flight"),
                         ({"secret": SECRET, "min_gain_ms": -1}, "must not be negative"),
                         ({"secret": SECRET, "tokenizer": "bpe"}, "tokenizer must be"),
                         ({"secret": SECRET, "affinity_queue": 0}, "affinity_queue"),
                         ({"secret_file": str(tmp_path / "none")}, "secret_file"),
                         ("yes", "agent.handoff")):
        with pytest.raises(ConfigError, match=message):
            handoff(bad)


def test_a_handoff_signature_binds_origin_tenant_client_time_and_body():
    body = b'{"prompt": "hi"}'
    value = sign(SECRET.encode(), "gpu1", 5, body, now=1000.0, client="10.0.1.7")
    handed = verify(SECRET.encode(), value, body, now=1010.0)
    assert handed == ("gpu1", 5, "10.0.1.7", None) and handed.client == "10.0.1.7"
    # the client's address is signed: another one in the header fails
    assert verify(SECRET.encode(), value.replace("client=10.0.1.7", "client=10.0.1.8"),
                  body, now=1010.0) is None
    # a header without the client field (the old format) fails too
    assert verify(SECRET.encode(), value.replace("client=10.0.1.7; ", ""), body,
                  now=1010.0) is None
    unknown = sign(SECRET.encode(), "gpu1", 5, body, now=1000.0)
    assert verify(SECRET.encode(), unknown, body, now=1010.0) == ("gpu1", 5, "", None)
    assert verify(SECRET.encode(), value, body + b" ", now=1010.0) is None   # other body
    assert verify(b"another-secret-000000", value, body, now=1010.0) is None
    assert verify(SECRET.encode(), value, body, now=1100.0) is None          # too old
    assert verify(SECRET.encode(), value.replace("tenant=5", "tenant=6"), body,
                  now=1010.0) is None
    for garbage in ("", "origin=a", "origin=a; tenant=x; ts=1; sig=00", "=;=;",
                    "origin=a; tenant=1; ts=1; sig=00"):
        assert verify(SECRET.encode(), garbage, body) is None


def test_block_keys_follow_the_emulators_tokenizer_and_chat_template():
    tok = WordTokenizer()
    words = " ".join(f"w{i}" for i in range(40))
    assert emulator_token_ids({"prompt": words}, tok) == tok.encode(words)
    assert emulator_token_ids({"prompt": [words]}, tok) == tok.encode(words)
    assert emulator_token_ids({"prompt": [1, 2, 3]}, tok) == [1, 2, 3]
    chat = emulator_token_ids({"messages": [{"role": "user", "content": words}]}, tok)
    assert chat is not None and chat[:2] == tok.ids(["<|role|>", "user"])
    assert len(BlockHasher(16).keys(chat)) == (2 + 40 + 1) // 16
    for bad in ({"prompt": 3}, {"messages": "x"}, {"messages": [{"content": "no role"}]}, {}):
        assert emulator_token_ids(bad, tok) is None


# -- the prefix's home (decide with keys) ------------------------------------------------
def _holder(name: str, blocks: int, running: int = 0, waiting: int = 0) -> dict:
    return {"backend": name, "address": f"10.0.0.{ord(name[-1]) % 200}",
            "cached_blocks": blocks, "trusted": True, "capacity": 4, "running": running,
            "waiting": waiting, "load_age_s": 0.1}


def _keys_ranking(first: str, then: list[str], depth: int = 30) -> list[int]:
    """Block keys of a 33-block prompt whose 30-block prefix ranks the backends in the
    order `first`, *then`."""
    for seed in range(10_000):
        keys = [seed * 1000 + i for i in range(33)]
        scores = [rendezvous(keys[depth - 1], n) for n in [first, *then]]
        if scores == sorted(scores, reverse=True):
            return keys
    raise AssertionError("no such keys")


def test_a_shared_prefix_held_alike_goes_to_its_home_not_to_every_holder():
    """An app's system prompt cached on this backend and a peer (none markedly longer):
    the request goes to the holder ranking first for that prefix -- here when that is us,
    there when it is the peer -- so the other copy can age out of its cache."""
    s = HandoffSettings(secret=b"x" * 16, home_weight=1.0)
    idle = LocalLoad(0, 0, 4, 0.0, 1.0)
    both = [_holder("a", 30), _holder("b", 30)]
    to_b = decide(s, "a", both, idle, 3.0, {}, 16, 33, _keys_ranking("b", ["a"]))
    assert to_b.decision == "handoff" and to_b.home and to_b.peer is not None \
        and to_b.peer.name == "b"
    stay = decide(s, "a", both, idle, 3.0, {}, 16, 33, _keys_ranking("a", ["b"]))
    assert stay.decision == "local_longest" and stay.peer is None
    # without keys, or with home_weight 0, the old rule: nothing markedly longer, stay
    assert decide(s, "a", both, idle, 3.0, {}, 16, 33).decision == "local_longest"
    off = HandoffSettings(secret=b"x" * 16, home_weight=0.0)
    assert decide(off, "a", both, idle, 3.0, {}, 16, 33,
                  _keys_ranking("b", ["a"])).decision == "local_longest"


def test_a_busy_home_is_passed_over_for_the_next_holder_in_rank():
    s = HandoffSettings(secret=b"x" * 16, home_weight=1.0)
    idle = LocalLoad(0, 0, 4, 0.0, 1.0)
    # b ranks first, c second; with b two requests deep in its queue, c takes it
    holders = [_holder("a", 30), _holder("b", 30, running=4, waiting=2), _holder("c", 30)]
    got = decide(s, "a", holders, idle, 3.0, {}, 16, 33, _keys_ranking("b", ["c", "a"]))
    assert got.decision == "handoff" and got.peer is not None and got.peer.name == "c"
    # ranking b, a, c: with b busy we are the home, and stay
    keys = _keys_ranking("b", ["a", "c"])
    assert decide(s, "a", holders, idle, 3.0, {}, 16, 33, keys).decision == "local_longest"
    # every holder busy: serve here
    swamped = [_holder("a", 30)] + [_holder(n, 30, running=4, waiting=4) for n in "bc"]
    assert decide(s, "a", swamped, idle, 3.0, {}, 16, 33, keys).peer is None


def test_a_conversations_own_longer_prefix_beats_the_groups_home():
    """The home counts only among holders of the same longest prefix: a peer holding a
    conversation's own blocks beyond the system prompt wins over the prompt's home."""
    s = HandoffSettings(secret=b"x" * 16, home_weight=1.0)
    idle = LocalLoad(0, 0, 4, 0.0, 1.0)
    keys = _keys_ranking("b", ["a", "c"]) + list(range(33))
    got = decide(s, "a", [_holder("b", 30), _holder("c", 36)], idle, 3.0, {}, 16, 40, keys)
    assert got.decision == "handoff" and got.peer is not None and got.peer.name == "c" \
        and not got.home
    # we hold the system prompt too, c 8 blocks more (1.27x; min_ratio 1.0: the cost model
    # judges the 8 blocks, 12.8 ms of prefill, against the relay's 3 ms)
    got = decide(s, "a", [_holder("a", 30), _holder("b", 30), _holder("c", 38)], idle, 3.0,
                 {}, 16, 40, keys)
    assert got.peer is not None and got.peer.name == "c" and not got.home
    # two holders of the same 30 blocks, we hold none: the home of the two takes it
    got = decide(s, "a", [_holder("b", 30), _holder("c", 30)], idle, 3.0, {}, 16, 33,
                 _keys_ranking("c", ["b"]))
    assert got.peer is not None and got.peer.name == "c" and got.home


def test_a_prefix_group_ranks_its_holders_alike_on_every_bridge():
    keys = list(range(100, 140))
    holders = {"gpu1": 40, "gpu2": 30, "gpu3": 30}
    assert home_of(keys, 30, holders) == max(holders, key=lambda n: rendezvous(keys[29], n))
    assert home_of(keys, 40, holders) == "gpu1"  # only gpu1 holds 40
    assert home_of(keys, 41, holders) is None and home_of(keys, 0, holders) is None
    assert rendezvous(7, "gpu1") == rendezvous(7, "gpu1") != rendezvous(7, "gpu2")


# -- the cache's value (cache_weight, shared_cache_weight) ------------------------------
def test_a_shared_address_values_the_cache_enough_to_queue_behind_its_holder():
    """A conversation's turn 9 blocks beyond what this backend holds, on a peer with one
    request more than its slots: for a per-device client the 14.4 ms of prefill do not
    pay the peer's 175 ms of queueing (its next turn comes back by the switch's
    affinity); for a shared address (an app server, whose turns only a handoff brings to
    their prefix) each block is worth 65 prefills, 936 ms: handed off."""
    s = HandoffSettings(secret=b"x" * 16)
    assert (s.cache_weight, s.shared_cache_weight, s.max_peer_load) == (0.0, 64.0, 4.0)
    here = LocalLoad(1, 0, 4, 0.0, 0.7)
    holder = [_holder("a", 30), _holder("b", 39, running=4)]
    device = decide(s, "a", holder, here, 3.0, {}, 16, 42)
    assert device.decision == "no_gain" and device.peer is None and not device.shared
    # the refused gain and what it was decided on travel in the decision header
    assert device.describe() == "no_gain; blocks=42; here=30; longest=b:39; gain=-163.6"
    shared = decide(s, "a", holder, here, 3.0, {}, 16, 42, shared=True)
    assert shared.decision == "handoff" and shared.peer is not None \
        and shared.peer.name == "b" and shared.gain_ms == pytest.approx(758.0)
    assert shared.describe() == "handoff; blocks=42; here=30; longest=b:39; gain=758.0; shared"
    # cache_weight 0 for shared addresses too: the greedy model of session 6
    greedy = HandoffSettings(secret=b"x" * 16, shared_cache_weight=0.0)
    assert decide(greedy, "a", holder, here, 3.0, {}, 16, 42, shared=True).decision == \
        "no_gain"
    # the load bound still holds: a holder with 17 requests for 4 slots (> 4 x 4) gets none
    swamped = [_holder("a", 30), _holder("b", 39, running=4, waiting=13)]
    assert decide(s, "a", swamped, here, 3.0, {}, 16, 42, shared=True).decision == \
        "peer_busy"
    # 12 of them is within the bound; the shared weight then judges the queue: 9
    # requests beyond the slots, 1.6 s, against 936 ms of cache: no
    deep = [_holder("a", 30), _holder("b", 39, running=4, waiting=8)]
    assert decide(s, "a", deep, here, 3.0, {}, 16, 42, shared=True).decision == "no_gain"


# -- the peer's own speed (peer_speed, its report's service_s) ---------------------------
def _timed(name: str, blocks: int, service_s: object, running: int = 0,
           waiting: int = 0) -> dict:
    return {**_holder(name, blocks, running, waiting), "service_s": service_s}


def test_a_half_speed_holders_queue_is_priced_at_its_own_service_time():
    """The app server's turn, 9 blocks beyond this backend (936 ms of cache at the shared
    weight), on a holder with 8 requests for its 4 slots (5 quarters of a request's time
    to wait). A holder as fast as this backend (0.7 s a request) queues it 875 ms:
    handed off. One half as fast (1.4 s a request, reported) queues it 1,750 ms, and its
    3 blocks of prefill cost twice ours: refused -- that queue is too long only at its
    speed. Off (the default: the bench lost hit rate and p99 with it) the slow holder is
    priced at our 0.7 s."""
    assert HandoffSettings(secret=b"x" * 16).peer_speed is False
    s = HandoffSettings(secret=b"x" * 16, peer_speed=True)
    here = LocalLoad(1, 0, 4, 0.0, 0.7, service_measured=True)
    same = decide(s, "a", [_holder("a", 30), _timed("b", 39, 0.7, running=4, waiting=4)],
                  here, 3.0, {}, 16, 42, shared=True)
    assert same.decision == "handoff" and same.gain_ms == pytest.approx(936 - 875 - 3)
    assert same.wait_there_ms == pytest.approx(875.0)
    slow_holder = [_holder("a", 30), _timed("b", 39, 1.4, running=4, waiting=4)]
    slow = decide(s, "a", slow_holder, here, 3.0, {}, 16, 42, shared=True)
    # saved: 936 ms, less the peer's 3 blocks at twice our time (4.8 ms) and their stall
    # of its 4 running requests at twice ours (12 blocks, 19.2 ms); queue 1,750 ms
    assert slow.decision == "no_gain" and slow.peer is None
    assert slow.gain_ms == pytest.approx(936 - 4.8 - 19.2 - 1750 - 3)
    off = HandoffSettings(secret=b"x" * 16, peer_speed=False)
    assert decide(off, "a", slow_holder, here, 3.0, {}, 16, 42,
                  shared=True).gain_ms == pytest.approx(58.0)
    # a shorter queue at the slow holder still pays: 1 request beyond its slots, 350 ms
    short = decide(s, "a", [_holder("a", 30), _timed("b", 39, 1.4, running=4)], here, 3.0,
                   {}, 16, 42, shared=True)
    assert short.decision == "handoff" and short.gain_ms == pytest.approx(936 - 24 - 350 - 3)
    assert (short.saved_ms, short.wait_there_ms) == (pytest.approx(912.0),
                                                     pytest.approx(350.0))


def test_a_slow_origin_prices_a_fast_holder_at_the_holders_speed():
    """From a half-speed backend (1.4 s a request) a fast holder's queue (5 requests for
    4 slots) is 350 ms, not the 700 ms our own speed would make it, and its prefill of
    the prompt's 3 new blocks, and their stall on its batch, cost half ours."""
    s = HandoffSettings(secret=b"x" * 16, peer_speed=True)
    slow_here = LocalLoad(1, 0, 4, 0.0, 1.4, service_measured=True)
    fast = [_holder("a", 30), _timed("b", 39, 0.7, running=4, waiting=1)]
    got = decide(s, "a", fast, slow_here, 3.0, {}, 16, 42, shared=True)
    # our prefill time per token is still the configured one (1.6 ms a block): the ratio
    # halves the peer's 3 blocks and its stall on 4 running requests
    assert got.decision == "handoff" and got.wait_there_ms == pytest.approx(350.0)
    assert got.saved_ms == pytest.approx(936 + 0.5 * 3 * 1.6 + (12 - 4 * 3 * 0.5) * 1.6)
    old = decide(HandoffSettings(secret=b"x" * 16, peer_speed=False), "a", fast, slow_here,
                 3.0, {}, 16, 42, shared=True)
    assert old.wait_there_ms == pytest.approx(700.0)


def test_a_holder_without_a_usable_service_time_is_priced_at_ours():
    """Older agents send no service_s, and an answer's bad figure is not trusted: the
    holder's queue is priced with this backend's service time, its speed as ours."""
    s = HandoffSettings(secret=b"x" * 16, peer_speed=True)
    here = LocalLoad(1, 0, 4, 0.0, 0.7, service_measured=True)
    for figure in (None, "1.4", True, -1.0, 0.0, float("nan"), float("inf"), 1e9):
        got = decide(s, "a", [_holder("a", 30), _timed("b", 39, figure, running=4,
                                                        waiting=4)],
                     here, 3.0, {}, 16, 42, shared=True)
        assert got.decision == "handoff" and got.wait_there_ms == pytest.approx(875.0), figure
    # our own figure unmeasured (no delay model): the holder's queue at its own time,
    # but no speed ratio against a default
    guess = LocalLoad(1, 0, 4, 0.0, 0.7)
    got = decide(s, "a", [_holder("a", 30), _timed("b", 39, 1.4, running=4)], guess, 3.0,
                 {}, 16, 42, shared=True)
    assert got.wait_there_ms == pytest.approx(350.0) and got.saved_ms == pytest.approx(936.0)
    # the ratio is bounded: a holder reporting 100x our time is priced 8x for its prefill
    far = decide(s, "a", [_holder("a", 30), _timed("b", 39, 70.0)], here, 3.0, {}, 16, 42,
                 shared=True)
    assert far.saved_ms == pytest.approx(936 + (1 - 8) * 3 * 1.6 + 12 * 1.6)


def test_cache_weights_are_checked():
    for bad in ({"cache_weight": -1.0}, {"shared_cache_weight": -0.5}):
        with pytest.raises(ValueError, match="cache_weight"):
            HandoffSettings(secret=b"x" * 16, **bad)
    with pytest.raises(ConfigError, match="must not be negative"):
        handoff({"secret": SECRET, "shared_cache_weight": -1.0})
    assert handoff({"secret": SECRET, "cache_weight": 2.0,
                    "shared_cache_weight": 8.0})["shared_cache_weight"] == 8.0


def test_with_cache_weight_by_eviction_the_weight_follows_this_caches_eviction_pressure():
    """The shared weight prices the blocks a copy here would evict. In a cache with room
    (pressure 0) a copy evicts nothing: the greedy figure decides, and the holder's queue
    (175 ms) beats 14.4 ms of prefill. In a full one (pressure 1), or with the pressure
    unknown (no KV events), the weight is whole: handed off as before. Off by default."""
    on = HandoffSettings(secret=b"x" * 16, cache_weight_by_eviction=True)
    assert HandoffSettings(secret=b"x" * 16).cache_weight_by_eviction is False
    here = LocalLoad(1, 0, 4, 0.0, 0.7)
    holder = [_holder("a", 30), _holder("b", 39, running=4)]
    roomy = decide(on, "a", holder, here, 3.0, {}, 16, 42, shared=True, pressure=0.0)
    assert roomy.decision == "no_gain" and roomy.gain_ms == pytest.approx(-163.6)
    for pressure in (1.0, None, 3.0):  # above 1 counts as full
        full = decide(on, "a", holder, here, 3.0, {}, 16, 42, shared=True, pressure=pressure)
        assert full.decision == "handoff" and full.gain_ms == pytest.approx(758.0)
    # half full of evictions: 32 prefills a block, 9 x 33 x 1.6 ms - 175 ms - 3 ms + stall
    half = decide(on, "a", holder, here, 3.0, {}, 16, 42, shared=True, pressure=0.5)
    assert half.decision == "handoff" and half.gain_ms == pytest.approx(758.0 - 9 * 32 * 1.6)
    # off: the pressure is not looked at
    off = HandoffSettings(secret=b"x" * 16)
    assert decide(off, "a", holder, here, 3.0, {}, 16, 42, shared=True,
                  pressure=0.0).gain_ms == pytest.approx(758.0)
    assert handoff({"secret": SECRET, "cache_weight_by_eviction": True})[
        "cache_weight_by_eviction"] is True


async def test_a_bridge_remembers_a_shared_address_for_shared_client_s():
    import aiohttp

    from tokenfabric.hostagent.handoff import Handoff
    async with aiohttp.ClientSession() as session:
        h = Handoff(HandoffSettings(secret=b"x" * 16, shared_client_s=300.0), "a", session,
                    "http://127.0.0.1:1", None, "http://127.0.0.1:1",
                    lambda: LocalLoad(0, 0, 4))
        assert not h.is_shared("10.0.1.200", now=100.0)
        h.note_shared("10.0.1.200", now=100.0)
        assert h.is_shared("10.0.1.200", now=399.0)
        assert not h.is_shared("10.0.1.200", now=400.5)   # shared_client_s later
        assert not h.is_shared("10.0.1.7", now=101.0)
        off = Handoff(HandoffSettings(secret=b"x" * 16, shared_client_s=0.0), "a", session,
                      "http://127.0.0.1:1", None, "http://127.0.0.1:1",
                      lambda: LocalLoad(0, 0, 4))
        off.note_shared("10.0.1.200", now=100.0)
        assert not off.is_shared("10.0.1.200", now=100.0)
