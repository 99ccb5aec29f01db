"""`KEY=VALUE` handoff settings from a command line (the lab's and the bench's --handoff,
the bench's --variant): parsed once, checked as the agent's config file checks them."""

import re

import pytest

from tokenfabric.hostagent.config import (
    AgentConfig,
    check_handoff_overrides,
    handoff_overrides,
    parse_assignments,
)


def test_values_are_read_as_yaml_and_taken_by_the_agent(tmp_path):
    got = handoff_overrides(["peer_speed=true", "lookup_timeout=0.2", "min_blocks=3",
                             "tokenizer=emulator", "min_ratio=1"])
    assert got == {"peer_speed": True, "lookup_timeout": 0.2, "min_blocks": 3,
                   "tokenizer": "emulator", "min_ratio": 1}
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    cfg = AgentConfig(name="b1", address="10.0.0.2", mac="00:00:00:00:00:02",
                      switch="s1", port=2, vip="10.0.0.100",
                      handoff={"secret_file": str(secret), **got})
    assert cfg.handoff["peer_speed"] is True and cfg.handoff["lookup_timeout"] == 0.2


@pytest.mark.parametrize(("items", "message"), [
    (["nope=1"], "handoff.nope: unknown key"),
    (["peer_speed=1"], "handoff.peer_speed must be a bool"),
    (["peer_speed=yes"], "handoff.peer_speed must be a bool"),  # YAML 1.2: a string
    (["min_blocks=1.5"], "handoff.min_blocks must be a int"),
    (["lookup_timeout=-1"], "handoff.lookup_timeout must not be negative"),
    (["lookup_timeout=.nan"], "handoff.lookup_timeout must be a finite number"),
    (["max_peer_load=.inf"], "handoff.max_peer_load must be a finite number"),
    (["lookup_timeout="], "handoff.lookup_timeout must be a float"),
    (["tokenizer=bert"], "handoff tokenizer must be one of"),
    (["shared_in_flight=1"], "handoff shared_in_flight must be at least 2"),
    (["secret=abcdefghijklmnopq"], "handoff.secret is not an override"),
    (["secret_file=/etc/passwd"], "handoff.secret_file is not an override"),
    (["enabled=false"], "handoff.enabled is not an override"),
    (["peer_speed"], "'peer_speed' is not KEY=VALUE"),
    (["=1"], "'=1' is not KEY=VALUE"),
    (["peer_speed=true", "peer_speed=false"], "peer_speed given twice"),
    (["min_ratio=[1"], "min_ratio: '[1' is not a YAML value"),
])
def test_a_bad_item_is_refused_by_name(items, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        handoff_overrides(items)


def test_the_parser_alone_takes_any_key_and_the_checker_a_mapping():
    # the bench's --variant mixes the emulated switch's keys in; it checks the rest
    mixed = parse_assignments(["affinity_bound=1.5", "peer_speed=false"])
    assert mixed == {"affinity_bound": 1.5, "peer_speed": False}
    with pytest.raises(ValueError, match="affinity_bound: unknown key"):
        check_handoff_overrides(mixed)
    assert check_handoff_overrides({"peer_speed": False}) == {"peer_speed": False}
