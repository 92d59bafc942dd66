"""The OpenAPI document is honest, with an API key configured and without one: schemathesis
generates requests from each configuration's /openapi.json (every operation in it, whatever its
path), sends them to a real server so configured (loopback, the tiny checkpoint) and runs every
check it has (``--checks all``) in its coverage and fuzzing phases, positive and negative data:
no server error; a documented status, body, content type and headers; a schema-valid request
accepted, a schema-invalid one refused; security declared where it is enforced.

Bounded and reproducible: hypothesis is derandomized, keeps no example database, and runs a fixed
number of examples per operation. The few failures a schema cannot express are listed in
``EXCUSED``, each with its reason.

Also: the security schemes are declared when a key is configured, on exactly the operations that
answer 401 without it; without a key there are none, and no 401.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import AcceptedNegativeData, Failure, FailureGroup
from schemathesis.openapi.checks import RejectedPositiveData

from tests.service.support import ThreadServer
from tests.support import encode, scene
from transfiner.service.app import create_app
from transfiner.service.schemas import MAX_CLASSES
from transfiner.service.settings import ServiceSettings

pytestmark = pytest.mark.timeout(300)

API_KEY = "fuzz-key"
KEYED, OPEN = "with a key", "without a key"
KEYS = {KEYED: API_KEY, OPEN: None}

load_all_checks()
# Every check schemathesis has (the stateful ones among them find no resources to follow here).
ALL_CHECKS = CHECKS.get_all()


def _config(api_key: str | None) -> SchemathesisConfig:
    config = {
        "generation": {"mode": "all"},  # positive and negative data
        "phases": {
            "examples": {"enabled": False},  # the document has none
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
    }
    if api_key is not None:
        # The key for the declared schemes: schemathesis sends it (as one scheme or the other), and
        # the ignored_auth check then sends each request without it, and with a wrong one, too.
        config["auth"] = {"openapi": {"ApiKey": {"api_key": api_key}, "Bearer": {"bearer": api_key}}}
    return SchemathesisConfig.from_dict(config)


# Generated examples per operation in the fuzzing phase, on top of the coverage phase's
# deterministic cases (boundary values, missing and wrong-typed inputs, unsupported methods).
EXAMPLES_PER_OPERATION = 100
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# The failures a schema cannot express: (what the check reported, the error code of the answer).
EXCUSED: dict[tuple[type[Failure], str], str] = {
    # A string of ``format: binary`` or base64 may hold any bytes; only an image of a supported
    # format (PNG, JPEG, GIF, WEBP, BMP, TIFF) that decodes is accepted. The generator sends real
    # image files too, and those are answered.
    (RejectedPositiveData, "unsupported_media_type"): "the bytes are not an image",
    (RejectedPositiveData, "invalid_image"): "the bytes are not an image",
    (RejectedPositiveData, "image_too_large"): "an image of more pixels than max_pixels",
    # Class ids and names belong to the model that answers, loaded (and replaced) at run time.
    (RejectedPositiveData, "unknown_classes"): "a class the model does not have",
    # The request line and headers together are bounded (64 KiB); no parameter's schema can bound
    # their sum. The answer is a refusal either way.
    (RejectedPositiveData, "headers_too_large"): "a request line and headers over 64 KiB",
    (AcceptedNegativeData, "headers_too_large"): "a request line and headers over 64 KiB",
}


def excused(failure: Failure, response: httpx.Response) -> str | None:
    """Why a failure is one a schema cannot express (None: a real one)."""
    code = _error_code(response)
    if code == "invalid_parameter" and "unknown classes" in response.text:
        code = "unknown_classes"
    return next((reason for (kind, c), reason in EXCUSED.items() if isinstance(failure, kind) and c == code), None)


# The Open Inference Protocol's errors are ``{"error": "<message>"}``, without a code: the same
# refusals, known by their messages.
PROTOCOL_MESSAGES = {
    "not a supported image": "unsupported_media_type",
    "cannot decode the": "invalid_image",
    "image has no pixels": "invalid_image",
    "image has ": "image_too_large",
    "unknown classes": "unknown_classes",
}


def _error_code(response: httpx.Response) -> str | None:
    try:
        error = response.json()["error"]
        if isinstance(error, str):
            return next((code for start, code in PROTOCOL_MESSAGES.items() if error.startswith(start)), None)
        return error["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _document(api_key: str | None) -> dict:
    # Making the app loads no model; the served document is checked to be this one.
    return create_app(ServiceSettings(model="unused", device="cpu", api_key=api_key)).openapi()


DOCUMENTS = {name: _document(key) for name, key in KEYS.items()}
SCHEMAS = {name: schemathesis.openapi.from_dict(DOCUMENTS[name], config=_config(key)) for name, key in KEYS.items()}
# Per configuration: every request made (operation, status, phase) and every excused failure.
SENT: dict[str, list[tuple[str, int, str]]] = {KEYED: [], OPEN: []}
EXCUSES: dict[str, Counter] = {KEYED: Counter(), OPEN: Counter()}


def _serve(api_key: str | None, checkpoint) -> ThreadServer:
    settings_ = ServiceSettings(model=str(checkpoint), device="cpu", api_key=api_key, max_delay_ms=0)
    return ThreadServer(settings_).start()


@pytest.fixture(scope="module")
def keyed_server(checkpoint):
    srv = _serve(API_KEY, checkpoint)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def open_server(checkpoint):
    srv = _serve(None, checkpoint)
    yield srv
    srv.stop()


def _fuzz(configuration: str, case, server: ThreadServer) -> None:
    response = case.call(base_url=server.url, timeout=60)
    SENT[configuration].append((case.operation.label, response.status_code, case.meta.phase.name.value))
    try:
        case.validate_response(response, checks=ALL_CHECKS)
    except FailureGroup as group:
        real = []
        for failure in group.exceptions:
            reason = excused(failure, response)
            if reason is None:
                real.append(failure)
            else:
                EXCUSES[configuration][reason] += 1
        if real:
            raise
    finally:
        _keep_serving(server)


def _keep_serving(server: ThreadServer) -> None:
    """Loads the models an unload operation took away, so later cases reach a model again."""
    if server.runtime.ready:
        return
    for name, model in list(server.runtime.models.models.items()):
        if model.unloaded:
            httpx.post(f"{server.url}/v1/repository/models/{name}/load", headers={"X-API-Key": API_KEY}, timeout=120)


@SCHEMAS[KEYED].parametrize()
@FUZZ_SETTINGS
def test_every_answer_is_documented_with_a_key(case, keyed_server):
    _fuzz(KEYED, case, keyed_server)


@SCHEMAS[OPEN].parametrize()
@FUZZ_SETTINGS
def test_every_answer_is_documented_without_a_key(case, open_server):
    _fuzz(OPEN, case, open_server)


@pytest.mark.parametrize("configuration", [KEYED, OPEN])
def test_the_fuzzing_reached_every_operation_and_the_model(configuration, request):
    """The runs above were not vacuous: every operation of the document, from both phases, and
    the server still serves."""
    server = request.getfixturevalue("keyed_server" if configuration == KEYED else "open_server")
    sent = SENT[configuration]
    operations = {
        f"{method.upper()} {path}" for path, item in DOCUMENTS[configuration]["paths"].items() for method in item
    }
    assert {label for label, _, _ in sent} == operations
    assert {"coverage", "fuzzing"} <= {phase for _, _, phase in sent}
    segment = [status for label, status, _ in sent if label == "POST /v1/segment"]
    assert len(segment) >= 100 and segment.count(200) >= 10, Counter(segment)
    assert max(status for _, status, _ in sent) < 500
    # What was excused stays a minority: most generated uploads are images the model answers.
    assert sum(EXCUSES[configuration].values()) < len(segment), EXCUSES[configuration]
    headers = {"X-API-Key": API_KEY} if KEYS[configuration] else {}
    assert httpx.get(server.url + "/health/ready").status_code == 200
    assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 200


@pytest.mark.parametrize("configuration", [KEYED, OPEN])
def test_the_served_document_is_the_one_fuzzed(configuration, request):
    server = request.getfixturevalue("keyed_server" if configuration == KEYED else "open_server")
    assert httpx.get(server.url + "/openapi.json").json() == DOCUMENTS[configuration]


def _operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def _fill(path: str) -> str:
    return path.replace("{name}", "default").replace("{version}", "1")


def test_with_a_key_the_schemes_are_declared_on_exactly_the_operations_that_need_it(keyed_server):
    document = httpx.get(keyed_server.url + "/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["Bearer"] == {**schemes["Bearer"], "type": "http", "scheme": "bearer"}
    assert "security" not in document  # no global requirement that would cover the probes
    either = [{"ApiKey": []}, {"Bearer": []}]  # alternatives: one of them is enough
    guarded = set()
    for method, path, operation in _operations(document):
        # Without the key: 401 exactly where security is declared (and its 401 documented).
        response = httpx.request(method, keyed_server.url + _fill(path))
        if "security" in operation:
            assert operation["security"] == either, path
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            error = response.json()["error"]  # /v2: the protocol's shape
            assert (
                error.startswith("missing or wrong API key")
                if path.startswith("/v2")
                else error["code"] == "unauthorized"
            )
            assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
            guarded.add(path)
        else:
            assert response.status_code != 401 and "401" not in operation["responses"], (method, path)
    assert {"/v1/segment", "/v1/models", "/v1/repository/index"} <= guarded
    assert not any(path.startswith("/health/") for path in guarded)
    # The key in either header works, a wrong one is refused.
    for headers, status in (
        ({"X-API-Key": API_KEY}, 200),
        ({"Authorization": f"Bearer {API_KEY}"}, 200),
        ({"Authorization": f"bearer   {API_KEY}"}, 200),
        ({"X-API-Key": "nope"}, 401),
        ({"Authorization": f"Basic {API_KEY}"}, 401),
    ):
        response = httpx.get(keyed_server.url + "/v1/models", headers=headers)
        assert response.status_code == status, (headers, response.text)


def test_without_a_key_no_scheme_no_requirement_and_no_401(open_server):
    document = httpx.get(open_server.url + "/openapi.json").json()
    assert "securitySchemes" not in document.get("components", {})
    assert "security" not in document
    for method, path, operation in _operations(document):
        assert "security" not in operation and "401" not in operation["responses"], (method, path)
        if method == "get":
            response = httpx.get(open_server.url + _fill(path))
            assert response.status_code < 500 and response.status_code != 401, (path, response.text)
    # Keys sent anyway are ignored, not refused.
    response = httpx.get(open_server.url + "/v1/models", headers={"X-API-Key": "anything"})
    assert response.status_code == 200


@pytest.mark.parametrize("configuration", [KEYED, OPEN])
def test_the_document_declares_every_status_and_a_bounded_timeout(configuration):
    document = DOCUMENTS[configuration]
    operation = document["paths"]["/v1/segment"]["post"]
    statuses = {"200", "400", "404", "408", "413", "415", "422", "429", "431", "500", "503", "504"}
    assert statuses | ({"401"} if KEYS[configuration] else set()) == set(operation["responses"])
    for status, response in operation["responses"].items():
        if status != "200":
            assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    timeout = next(p for p in operation["parameters"] if p["name"] == "X-Request-Timeout")
    assert timeout["in"] == "header" and timeout["schema"]["type"] == "number"
    assert 0 < timeout["schema"]["minimum"] < timeout["schema"]["maximum"] <= 300
    for path in ("/health/live", "/health/ready", "/v1/models"):
        assert {"400", "408", "413", "431", "500"} <= set(document["paths"][path]["get"]["responses"]), path


def test_the_document_states_what_an_upload_needs_and_the_precedence():
    operation = DOCUMENTS[OPEN]["paths"]["/v1/segment"]["post"]
    content = operation["requestBody"]["content"]
    assert content["image/*"]["schema"]["minLength"] == 1
    form = content["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["image"]["minLength"] == 1
    assert form["additionalProperties"] is False
    as_json = content["application/json"]["schema"]
    assert as_json["required"] == ["image"] and as_json["additionalProperties"] is False
    assert as_json["properties"]["image"]["pattern"].startswith("^") and as_json["properties"]["image"]["minLength"]
    for parameter in operation["parameters"]:
        if parameter["in"] == "query":
            assert "the body's value is used" in parameter["description"], parameter["name"]


def test_a_form_may_list_as_many_classes_as_the_document_allows(open_server):
    """The document allows MAX_CLASSES items in a form's class list, each a field of its own: the
    form parser's field limit leaves room for them all."""
    form = DOCUMENTS[OPEN]["paths"]["/v1/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["properties"]["classes"]["anyOf"][0]["maxItems"] == MAX_CLASSES
    fields = {"classes": ["7"] * MAX_CLASSES, "score_threshold": "0", "mask_format": "none"}
    image = {"image": ("a.png", encode(scene(seed=2)))}
    response = httpx.post(open_server.url + "/v1/segment", files=image, data=fields, timeout=60)
    assert response.status_code == 200, response.text
    assert {i["category_id"] for i in response.json()["instances"]} == {7}
    fields["classes"].append("7")
    one_too_many = httpx.post(open_server.url + "/v1/segment", files=image, data=fields, timeout=60)
    assert one_too_many.status_code == 422 and "classes" in one_too_many.json()["error"]["message"]
