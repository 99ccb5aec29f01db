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
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from controller.api.server import create_app
from tests.api.conftest import ADMIN, VIEWER, make_controller, serve_in_thread


def _schema_document() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        ctl = make_controller(Path(tmp))
        document = create_app(ctl).openapi()
        ctl.ledger.close()
    return document


schema = schemathesis.openapi.from_dict(_schema_document())


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
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance])


@schema.parametrize()
@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_no_server_errors_for_a_viewer(case, served):
    """With a viewer's token the mutations are refused: documented 401/403/4xx, never 5xx."""
    case.call_and_validate(
        base_url=served.url, headers={"Authorization": f"Bearer {VIEWER}"},
        checks=[not_a_server_error, status_code_conformance, content_type_conformance])
