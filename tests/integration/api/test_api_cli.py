"""`tokenfabric controller|policy|switch`: exit codes and messages, as a user sees them."""

import socket
import subprocess
import sys
import time

import httpx
import pytest
from click.testing import CliRunner

from tests.integration.api.conftest import ADMIN, FABRIC, POLICY, VIEWER, free_port
from tokenfabric import cli, exitcodes, yamlio


def run(*args):
    return CliRunner().invoke(cli.main, list(args))


@pytest.fixture
def files(tmp_path):
    (tmp_path / "fabric.yaml").write_text(FABRIC)
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "tokens.yaml").write_text(yamlio.dump(
        {ADMIN: {"name": "ops", "role": "admin"}, VIEWER: {"name": "v", "role": "viewer"}}))
    return tmp_path


# ---------------------------------------------------------------- policy validate


def test_policy_validate_ok(files):
    r = run("policy", "validate", str(files / "policy.yaml"))
    assert r.exit_code == exitcodes.OK, r.output
    assert "valid (2 tenants, 2 contracts)" in r.output


def test_policy_validate_errors_name_file_and_line(files):
    bad = files / "bad.yaml"
    bad.write_text(POLICY.replace("burst: 500", "burst: 500\n    colour: blue"))
    r = run("policy", "validate", str(files / "policy.yaml"), str(bad))
    assert r.exit_code == exitcodes.INVALID_INPUT
    assert "bad.yaml:15: contracts.bronze.colour: unknown key" in r.output
    assert "policy.yaml: valid" in r.output  # the good file is still reported


def test_policy_validate_against_a_fabric(files):
    svc = POLICY.replace("tpm: 60000", "tpm: 60000\n    services: [nope]")
    (files / "svc.yaml").write_text(svc)
    assert run("policy", "validate", str(files / "svc.yaml")).exit_code == exitcodes.OK
    r = run("policy", "validate", "--fabric", str(files / "fabric.yaml"), str(files / "svc.yaml"))
    assert r.exit_code == exitcodes.INVALID_INPUT
    assert "unknown service 'nope'" in r.output


def test_policy_validate_missing_file_and_usage(files):
    r = run("policy", "validate", str(files / "absent.yaml"))
    assert r.exit_code == exitcodes.INVALID_INPUT and "cannot read" in r.output
    assert run("policy", "validate").exit_code == exitcodes.USAGE


# ---------------------------------------------------------------- controller run


def test_run_needs_a_fabric():
    r = run("controller", "run")
    assert r.exit_code == exitcodes.USAGE and "--fabric is required" in r.output


@pytest.mark.parametrize("which,content,fragment", [
    ("fabric.yaml", "switches: {s1: {address: nowhere}}\n", "fabric.yaml:1:"),
    ("policy.yaml", "tenants: 3\n", "policy.yaml:1: tenants:"),
    ("tokens.yaml", "short: {name: a, role: admin}\n", "at least 16"),
])
def test_run_refuses_bad_input_files(files, which, content, fragment):
    (files / which).write_text(content)
    r = run("controller", "run", "--fabric", str(files / "fabric.yaml"),
            "--policy", str(files / "policy.yaml"), "--tokens", str(files / "tokens.yaml"),
            "--ledger", str(files / "l.db"))
    assert r.exit_code == exitcodes.INVALID_INPUT, r.output
    assert fragment in r.output


def test_run_ledger_that_cannot_be_opened(files):
    (files / "dir.db").mkdir()
    r = run("controller", "run", "--fabric", str(files / "fabric.yaml"),
            "--ledger", str(files / "dir.db"))
    assert r.exit_code == exitcodes.FAILED and "cannot open the ledger" in r.output


def test_run_config_section_is_checked(files):
    (files / "cfg.yaml").write_text("controller: {fabrik: x}\n")
    r = run("controller", "run", "--config", str(files / "cfg.yaml"))
    assert r.exit_code == exitcodes.INVALID_INPUT and "unknown key(s): fabrik" in r.output


@pytest.mark.parametrize("key,value", [("REPORT_TIMEOUT_S", "0"), ("REPORT_TIMEOUT_S", "soon"),
                                       ("ELECTION_ID", "-3")])
def test_run_refuses_bad_settings_from_the_environment(files, monkeypatch, key, value):
    monkeypatch.setenv(f"TOKENFABRIC_CONTROLLER__{key}", value)
    r = run("controller", "run", "--fabric", str(files / "fabric.yaml"))
    assert r.exit_code == exitcodes.INVALID_INPUT and "report_timeout_s" in r.output


def test_run_without_tokens_only_on_loopback(files):
    r = run("controller", "run", "--fabric", str(files / "fabric.yaml"),
            "--listen", "0.0.0.0:8080", "--ledger", str(files / "l.db"))
    assert r.exit_code == exitcodes.USAGE and "without --tokens" in r.output
    r = run("controller", "run", "--fabric", str(files / "fabric.yaml"), "--listen", "nope")
    assert r.exit_code == exitcodes.USAGE


def test_run_port_taken_is_a_failure(files):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "tokenfabric.cli", "controller", "run", "--fabric",
             str(files / "fabric.yaml"), "--listen", f"127.0.0.1:{port}",
             "--ledger", str(files / "l.db")], capture_output=True, text=True, timeout=60)
    assert done.returncode == exitcodes.FAILED, done.stderr


def test_run_serves_with_config_file_and_env(files):
    """controller: section from a file, one key from the environment, flags win."""
    port = free_port()
    (files / "cfg.yaml").write_text(yamlio.dump({"controller": {
        "fabric": str(files / "fabric.yaml"), "policy": str(files / "policy.yaml"),
        "tokens": str(files / "tokens.yaml"), "listen": "127.0.0.1:1"}}))
    env = {"TOKENFABRIC_CONTROLLER__LEDGER": str(files / "env.db"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfabric.cli", "controller", "run", "--config",
         str(files / "cfg.yaml"), "--listen", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/tenants",
                              headers={"Authorization": f"Bearer {VIEWER}"}, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert [t["name"] for t in r.json()] == ["acme", "umbrella"]
        assert (files / "env.db").exists()
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


# ---------------------------------------------------------------- switch shell


def test_switch_shell_unknown_switch_and_bad_fabric(files):
    r = run("switch", "shell", "s9", "--fabric", str(files / "fabric.yaml"))
    assert r.exit_code == exitcodes.USAGE and "no switch 's9'" in r.output and "s1" in r.output
    (files / "bad.yaml").write_text("switches: []\n")
    r = run("switch", "shell", "s1", "--fabric", str(files / "bad.yaml"))
    assert r.exit_code == exitcodes.INVALID_INPUT and "bad.yaml:1:" in r.output
