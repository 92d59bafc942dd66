"""The OpenAPI document is honest: schemathesis generates requests from /openapi.json, sends them to
the real server (loopback, the tiny checkpoint) and checks every answer against the document:
no server error, a documented status code, a body matching the documented schema, a documented
content type, documented headers. Bounded and reproducible: hypothesis is derandomized, keeps no
example database, and runs a fixed number of examples per operation (about 300 in all).

Also: the API-key security schemes are declared on /v1/* and not on the open routes.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.support import ThreadServer
from transfiner.service.app import create_app
from transfiner.service.settings import ServiceSettings

pytestmark = pytest.mark.timeout(300)

API_KEY = "fuzz-key"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
    response_headers_conformance,
]
# Generated examples per operation (the fuzzing phase): /v1/segment (parameters, three body forms)
# and /v1/models (its auth headers) use them all, the open GET routes run out of distinct
# examples after a few: about 300 in all, plus schemathesis' deterministic coverage phase
# (boundary values, missing and wrong-typed inputs, unsupported methods: about 340 requests).
EXAMPLES_PER_OPERATION = 150
# Every request made, for the summary test: (operation, status), and the phase that made it.
SENT: list[tuple[str, int]] = []
PHASES: list[str] = []


@pytest.fixture(scope="module")
def fuzz_server(checkpoint):
    settings = ServiceSettings(model=str(checkpoint), device="cpu", api_key=API_KEY, max_delay_ms=0)
    srv = ThreadServer(settings).start()
    yield srv
    srv.stop()


# The document as the app makes it (collection needs it before any server runs; making the app
# loads no model). ``test_the_served_document_is_the_one_fuzzed`` checks the server serves it.
DOCUMENT = create_app(ServiceSettings(model="unused", device="cpu", api_key=API_KEY)).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_is_documented(case, fuzz_server):
    # The key is sent unless the generated case carries its own (then a 401 must be documented).
    headers = (
        {}
        if case.headers and {"x-api-key", "authorization"} & {k.lower() for k in case.headers}
        else {"X-API-Key": API_KEY}
    )
    response = case.call(base_url=fuzz_server.url, headers=headers, timeout=60)
    SENT.append((case.operation.label, response.status_code))
    PHASES.append(case.meta.phase.name.value if case.meta else "?")
    case.validate_response(response, checks=CHECKS, headers=headers)


def test_the_fuzzing_reached_every_operation_and_the_model(fuzz_server):
    """The run above was not vacuous: hundreds of requests to every operation, from both phases,
    and the server still serves."""
    operations = {label for label, _ in SENT}
    assert {"POST /v1/segment", "GET /v1/models", "GET /health/live", "GET /health/ready"} <= operations, operations
    segment = [status for label, status in SENT if label == "POST /v1/segment"]
    assert PHASES.count("fuzzing") >= 250 and len(segment) >= 200, (len(SENT), len(segment))
    assert max(segment) < 500
    # Both phases ran: the deterministic boundary and negative cases, then the generated examples.
    assert {"coverage", "fuzzing"} <= set(PHASES), set(PHASES)
    assert httpx.get(fuzz_server.url + "/health/ready").status_code == 200


def test_the_served_document_is_the_one_fuzzed(fuzz_server):
    assert httpx.get(fuzz_server.url + "/openapi.json").json() == DOCUMENT


def test_the_api_key_scheme_is_declared_on_v1_only(fuzz_server):
    document = httpx.get(fuzz_server.url + "/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["Bearer"] == {**schemes["Bearer"], "type": "http", "scheme": "bearer"}
    either = [{"ApiKey": []}, {"Bearer": []}]  # alternatives: one of them is enough
    assert document["paths"]["/v1/segment"]["post"]["security"] == either
    assert document["paths"]["/v1/models"]["get"]["security"] == either
    for path in ("/health/live", "/health/ready"):
        assert "security" not in document["paths"][path]["get"], path
    assert "security" not in document  # no global requirement that would cover the probes
    # The declaration changes nothing: the key in either header works, a wrong one is refused.
    for headers, status in (
        ({"X-API-Key": API_KEY}, 200),
        ({"Authorization": f"Bearer {API_KEY}"}, 200),
        ({"Authorization": f"bearer   {API_KEY}"}, 200),
        ({}, 401),
        ({"X-API-Key": "nope"}, 401),
        ({"Authorization": f"Basic {API_KEY}"}, 401),
    ):
        response = httpx.get(fuzz_server.url + "/v1/models", headers=headers)
        assert response.status_code == status, (headers, response.text)
        if status == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "unauthorized"
    assert httpx.get(fuzz_server.url + "/health/live").status_code == 200  # no key needed


def test_the_document_declares_every_status_and_a_bounded_timeout(fuzz_server):
    document = httpx.get(fuzz_server.url + "/openapi.json").json()
    operation = document["paths"]["/v1/segment"]["post"]
    assert {"200", "400", "401", "408", "413", "415", "422", "429", "431", "500", "503", "504"} <= set(
        operation["responses"]
    )
    for status, response in operation["responses"].items():
        if status != "200":
            assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    timeout = next(p for p in operation["parameters"] if p["name"] == "X-Request-Timeout")
    assert timeout["in"] == "header" and timeout["schema"]["type"] == "number"
    assert 0 < timeout["schema"]["minimum"] < timeout["schema"]["maximum"] <= 300
    for path in ("/health/live", "/health/ready", "/v1/models"):
        assert {"400", "408", "413", "431", "500"} <= set(document["paths"][path]["get"]["responses"]), path
