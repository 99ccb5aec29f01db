import json
import subprocess
import sys

from click.testing import CliRunner

from tokenfabric import cli, exitcodes
from tokenfabric.doctor import run_checks
from tokenfabric.tools import find_tool


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


def test_doctor_tells_the_truth_about_bmv2():
    result = CliRunner().invoke(cli.main, ["doctor", "--json", "--vllm-url",
                                           "http://127.0.0.1:9"])
    findings = {f["name"]: f for f in json.loads(result.output)}
    assert findings["simple_switch_grpc"]["present"] == bool(find_tool("simple_switch_grpc"))
    assert findings["p4c-bm2-ss"]["present"] == bool(find_tool("p4c-bm2-ss"))
    main_job_ok = all(f["present"] for f in findings.values() if f["main_job"])
    assert result.exit_code == (exitcodes.OK if main_job_ok else exitcodes.MISSING)


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
