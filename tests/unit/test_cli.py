import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tokenfabric import cli, exitcodes
from tokenfabric.doctor import run_checks


def test_help_lists_every_role():
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    for name in ("controller", "agent", "lab", "bench", "doctor", "policy", "vllm-emulator"):
        assert name in result.output


def test_console_script_runs_as_a_process():
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "--version"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0
    assert "tokenfabric, version" in done.stdout


def test_unknown_subcommand_is_a_usage_error():
    result = CliRunner().invoke(cli.main, ["nonsense"])
    assert result.exit_code == exitcodes.USAGE


def test_missing_extra_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, "ghost",
                        ("tokenfabric_no_such_module", "x", "controller", "A ghost."))
    result = CliRunner().invoke(cli.main, ["ghost", "--anything"])
    assert result.exit_code == exitcodes.MISSING
    assert "pip install 'tokenfabric[controller]'" in result.output


def _doctor(tmp_path, bin_dir) -> tuple[int, dict]:
    """`tokenfabric doctor --json` with only bin_dir and the system's directories on PATH
    and no /opt/p4 prefix: what it finds is what the test put there."""
    env = {**os.environ, "TOKENFABRIC_P4_PREFIX": str(tmp_path / "no-p4"),
           "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"}
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "doctor", "--json",
                           "--vllm-url", "http://127.0.0.1:9"], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    return done.returncode, {f["name"]: f for f in json.loads(done.stdout)}


def test_doctor_tells_the_truth_about_bmv2(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    code, findings = _doctor(tmp_path, bin_dir)
    assert not findings["simple_switch_grpc"]["present"]
    assert not findings["p4c-bm2-ss"]["present"]
    assert code == exitcodes.MISSING or not findings["simple_switch_grpc"]["main_job"]
    for tool in ("simple_switch_grpc", "p4c-bm2-ss"):  # executables of those names appear
        (bin_dir / tool).write_text("#!/bin/sh\necho 1.15.0\n")
        (bin_dir / tool).chmod(0o755)
    code, findings = _doctor(tmp_path, bin_dir)
    assert findings["simple_switch_grpc"]["present"]
    assert findings["p4c-bm2-ss"]["present"]
    main_job_ok = all(f["present"] for f in findings.values() if f["main_job"])
    assert code == (exitcodes.OK if main_job_ok else exitcodes.MISSING)


def test_doctor_finds_a_vllm_on_loopback():
    import http.server
    import threading

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "tiny-llama"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        vllm = [f for f in run_checks(url) if f.name == "vllm"][0]
        assert vllm.present and "tiny-llama" in vllm.detail
    finally:
        server.shutdown()
        thread.join(5)


def test_bench_args_take_each_defaults_type(monkeypatch):
    from tokenfabric.benchcli import bench_args

    monkeypatch.setattr(sys, "argv", ["bench_x.py", "--seconds", "2.5", "--max-each", "7"])
    args = bench_args("Benchmark: x.\n\nmore", clients=10, max_each=1, seconds=6.0)
    assert (args.clients, args.max_each, args.seconds) == (10, 7, 2.5)
    monkeypatch.setattr(sys, "argv", ["bench_x.py", "--clients", "1.5"])
    with pytest.raises(SystemExit) as refused:  # an int option refuses 1.5: usage error
        bench_args("Benchmark: x.", clients=10)
    assert refused.value.code == 2
