"""Property-based tests from /openapi.json: whatever a client sends, never a 5xx.

The app runs on a real uvicorn on 127.0.0.1; schemathesis sends generated
requests (valid and invalid) to every operation with an admin token, so that
mutations run too, and checks status codes, content types and response bodies
against the schema. (The schema is taken from the app object at import, because
schemathesis' lazy fixture loader does not work with pytest 9; a test checks that
the served /openapi.json is the same document.)
"""

import tempfile

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig
from schemathesis.core.parameters import ParameterLocation

from tests.integration.api.conftest import ADMIN, VIEWER, make_controller, serve_in_thread
from tokenfabric.controller.api.server import create_app


def _schema_document() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        ctl = make_controller(Path(tmp))
        document = create_app(ctl).openapi()
        ctl.ledger.close()
    return document


# Every check schemathesis has is on (test_every_check). Positive data acceptance:
# a schema-valid request may still contradict the fabric or the running model
# (a VIP that is no service's: 422; a port of another host: 409; no --policy file
# to reload: 422), which no schema can say; those statuses are documented refusals.
CONFIG = SchemathesisConfig.from_dict({"checks": {"positive_data_acceptance": {
    "expected-statuses": ["2xx", "401", "403", "404", "409", "422", "503"]}}})
schema = schemathesis.openapi.from_dict(_schema_document(), config=CONFIG)

# Bytes that are not HTTP (e.g. a control character in a header value, which the
# client library lets through) are refused by uvicorn's HTTP parser before the app
# sees a request, with its own plain-text 400. Everything the app answers is checked.
HTTP_LAYER_REFUSAL = b"Invalid HTTP request received."


@schemathesis.check
def content_type_of_app_answers(ctx, response, case):
    if response.status_code == 400 and response.content == HTTP_LAYER_REFUSAL:
        return None
    return content_type_conformance(ctx, response, case)


@schemathesis.check
def errors_are_json(ctx, response, case):
    """Every 4xx/5xx the app sends is {"error": {"code", "message", "details"}}."""
    if response.status_code < 400 or response.content == HTTP_LAYER_REFUSAL:
        return None
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "details"} <= set(body["error"]), body
    return None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve_in_thread(make_controller(tmp_path_factory.mktemp("schemathesis")))


def test_served_schema_is_the_tested_one(served):
    served_doc = httpx.get(f"{served.url}/openapi.json").json()
    assert served_doc == schema.raw_schema
    assert len(served_doc["paths"]) >= 20


@schema.parametrize()
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_no_server_errors(case, served):
    case.call_and_validate(
        base_url=served.url, headers={"Authorization": f"Bearer {ADMIN}"},
        checks=[not_a_server_error, status_code_conformance, content_type_of_app_answers,
                errors_are_json, response_schema_conformance])


@schema.parametrize()
@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_no_server_errors_for_a_viewer(case, served):
    """With a viewer's token the mutations are refused: documented 401/403/4xx, never 5xx."""
    case.call_and_validate(
        base_url=served.url, headers={"Authorization": f"Bearer {VIEWER}"},
        checks=[not_a_server_error, status_code_conformance, content_type_of_app_answers,
                errors_are_json])


@schema.parametrize()
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_every_check(case, served):
    """Every built-in check (negative data rejected, positive data accepted, Allow headers,
    missing headers, unsupported methods, ignored auth, ...) and ours, with an admin token.
    (The built-in content-type check is replaced by ours, which leaves out uvicorn's own
    plain-text refusals of bytes that are not HTTP.)"""
    # A case whose headers are the negative part (e.g. no Authorization) is sent as made.
    meta = case.meta
    header = meta.components.get(ParameterLocation.HEADER) if meta is not None else None
    negative_headers = header is not None and header.mode == GenerationMode.NEGATIVE
    case.call_and_validate(
        base_url=served.url,
        headers=None if negative_headers else {"Authorization": f"Bearer {ADMIN}"},
        excluded_checks=[content_type_conformance],
        additional_checks=[content_type_of_app_answers, errors_are_json])
