import pytest

from tokenfabric.config import ConfigError, load_section

DEFAULTS = {"listen": "127.0.0.1:8080", "workers": 1, "debug": False}


def test_file_then_environment_then_flags(tmp_path):
    path = tmp_path / "tf.yaml"
    path.write_text("controller:\n  workers: 4\n  listen: 0.0.0.0:9000\n")
    env = {"TOKENFABRIC_CONTROLLER__WORKERS": "8", "TOKENFABRIC_CONTROLLER__DEBUG": "true"}
    merged = load_section("controller", DEFAULTS, path, {"listen": "127.0.0.1:1", "debug": None},
                          env)
    assert merged == {"listen": "127.0.0.1:1", "workers": 8, "debug": True}


def test_config_path_from_environment(tmp_path):
    path = tmp_path / "tf.yaml"
    path.write_text("controller: {workers: 3}\n")
    merged = load_section("controller", DEFAULTS, environ={"TOKENFABRIC_CONFIG": str(path)})
    assert merged["workers"] == 3


@pytest.mark.parametrize("text, message", [
    ("controller: {wrokers: 3}\n", "unknown key"),
    ("- a\n- b\n", "must be a mapping of sections"),
    ("controller: [1, 2]\n", "must be a mapping"),
    ("controller: {workers: [\n", "not valid YAML"),
])
def test_bad_files_are_named_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_section("controller", DEFAULTS, path, environ={})
    assert str(path) in str(info.value)


def test_unknown_environment_key_is_an_error():
    with pytest.raises(ConfigError, match="TOKENFABRIC_CONTROLLER__NOPE"):
        load_section("controller", DEFAULTS, environ={"TOKENFABRIC_CONTROLLER__NOPE": "1"})


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_section("controller", DEFAULTS, tmp_path / "absent.yaml", environ={})


def test_agent_settings_take_file_then_environment_then_flags(tmp_path, monkeypatch):
    from tokenfabric.hostagent.config import load

    path = tmp_path / "agent.yaml"
    path.write_text("agent:\n  name: gpu1\n  address: 10.0.0.11\n  mac: '00:00:00:00:00:11'\n"
                    "  switch: s1\n  port: 1\n  vip: 10.100.0.1\n  capacity: 4\n"
                    "  mode: overflow\n")
    monkeypatch.setenv("TOKENFABRIC_AGENT__CAPACITY", "8")
    monkeypatch.setenv("TOKENFABRIC_AGENT__MODELS", "[a, b]")
    cfg = load(path, {"mode": "relay", "listen_port": None})
    assert (cfg.capacity, cfg.models, cfg.mode, cfg.listen_port) == (8, ["a", "b"], "relay",
                                                                     8000)
    monkeypatch.setenv("TOKENFABRIC_AGENT__CAPACITY", "true")  # YAML: a boolean, refused
    with pytest.raises(ConfigError, match="agent.capacity: must be an integer|agent.capacity"):
        load(path, {})
