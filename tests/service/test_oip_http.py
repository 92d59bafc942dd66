"""The Open Inference Protocol over HTTP/REST, driven by Triton's own clients (tritonclient.http and
tritonclient.http.aio, unmodified) against a real server of a two-model repository on loopback:
health, metadata, readiness, and inference that answers exactly what /v1 answers for the same
image and parameters, in JSON and with the binary tensor data extension; errors in the protocol's
shape with the status the clients report. Raw httpx checks the error JSON and the binary framing."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from pycocotools import mask as mask_util
from tritonclient.utils import InferenceServerException

from tests.service.repository.support import ANIMALS, add_version, write_animal_checkpoint
from tests.service.support import metric, running
from tests.support import CLASS_NAMES, encode, scene
from transfiner.service.oip.rest import HEADER_LENGTH
from transfiner.service.settings import ServiceSettings

pytestmark = pytest.mark.timeout(300)

API_KEY = "oip-key"
AUTH = {"X-API-Key": API_KEY}
PARAMS = {"score_threshold": 0.0, "max_detections": 5}
MAX_BODY = 1024 * 1024
SLOW_DELAY_S = 4.0  # the "slow" model's batches wait this long to fill: a lone request waits it out
IMAGES = [encode(scene(96, 128, seed=s)) for s in range(2)]
MODELS = {"shapes": "1", "animals": "3"}
OUTPUTS = ("boxes", "scores", "classes", "labels", "masks_rle")  # the default ones, in order


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("oip") / "repository"
    add_version(root, "shapes", 1, checkpoint)
    add_version(root, "animals", 3, write_animal_checkpoint(root.parent / "animals.pth"))
    add_version(root, "slow", 1, checkpoint)
    (root / "slow" / "config.yaml").write_text(f"max_batch_size: 4\nmax_delay_ms: {SLOW_DELAY_S * 1000}\n")
    settings = ServiceSettings(
        model_repository=str(root), device="cpu", max_batch_size=1, api_key=API_KEY, max_body_bytes=MAX_BODY
    )
    with running(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


def auth() -> dict[str, str]:
    """The key for a tritonclient call: a fresh dict each time, as the client adds its own headers to it."""
    return dict(AUTH)


def v1_instances(server, name: str, png: bytes, **params) -> list[dict]:
    response = httpx.post(
        f"{server.url}/v1/models/{name}/segment", content=png, params={**PARAMS, **params}, headers=auth(), timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()["instances"]


def image_input(png: bytes, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", [1], "BYTES")
    # As JSON the element is base64 text (an image file is not UTF-8); binary, the file itself.
    tensor.set_data_from_numpy(np.array([png if binary else base64.b64encode(png)], dtype=object), binary_data=binary)
    return tensor


def texts(array: np.ndarray) -> list[str]:
    """A BYTES output's elements as text (bytes when sent binary, str as JSON)."""
    return [e.decode() if isinstance(e, bytes) else str(e) for e in array.ravel()]


def assert_matches_v1(result, instances: list[dict]) -> None:
    """boxes, scores, classes, labels and masks_rle are /v1's instances, converted."""
    assert len(instances) > 0
    boxes = result.as_numpy("boxes")
    assert boxes.dtype == np.float32 and boxes.shape == (len(instances), 4)
    xywh = np.array([i["bbox"] for i in instances])
    np.testing.assert_array_equal(boxes, np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1).astype(np.float32))
    np.testing.assert_array_equal(result.as_numpy("scores"), np.float32([i["score"] for i in instances]))
    classes = result.as_numpy("classes")
    assert classes.dtype == np.int32 and classes.tolist() == [i["category_id"] for i in instances]
    assert texts(result.as_numpy("labels")) == [i["category_name"] for i in instances]
    rles = texts(result.as_numpy("masks_rle"))
    # Byte for byte the object /v1 serialises (compact JSON, keys in its order).
    assert rles == [json.dumps(i["segmentation"], separators=(",", ":")) for i in instances]


def test_health_and_metadata(server, client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata(headers=auth())
    assert metadata["name"] == "transfiner" and "binary_tensor_data" in metadata["extensions"]
    for name, version in MODELS.items():
        model = client.get_model_metadata(name, headers=auth())
        assert model["name"] == name and model["versions"] == [version] and model["platform"] == "pytorch"
        assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1]}]
        outputs = {o["name"]: (o["datatype"], o["shape"]) for o in model["outputs"]}
        assert outputs["boxes"] == ("FP32", [-1, 4]) and outputs["masks"] == ("UINT8", [-1, -1, -1])
        assert set(outputs) == {"boxes", "scores", "classes", "labels", "masks_rle", "masks"}
        assert client.get_model_metadata(name, version, headers=auth())["versions"] == [version]
        assert client.is_model_ready(name, headers=auth()) and client.is_model_ready(name, version, headers=auth())
    assert not client.is_model_ready("animals", "9", headers=auth())
    assert not client.is_model_ready("nothing", headers=auth())
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nothing", headers=auth())
    assert unknown.value.status() == "404" and "nothing" in unknown.value.message()
    with pytest.raises(InferenceServerException) as no_key:
        client.get_model_metadata("shapes")
    assert no_key.value.status() == "401"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_answers_as_v1_on_two_models(server, client, binary):
    answers = {}
    for name, version in MODELS.items():
        for png in IMAGES:
            instances = v1_instances(server, name, png)
            result = client.infer(
                name,
                [image_input(png, binary)],
                model_version=version if png is IMAGES[0] else "",
                outputs=None if binary else [triton.InferRequestedOutput(n, binary_data=False) for n in OUTPUTS],
                parameters=PARAMS,
                headers=auth(),
                request_id=f"{name}-{len(answers)}",
            )
            assert_matches_v1(result, instances)
            response = result.get_response()
            assert response["model_name"] == name and response["model_version"] == version
            assert response["id"] == f"{name}-{len(answers)}"
            answers[name, png] = texts(result.as_numpy("masks_rle"))
    assert answers["shapes", IMAGES[0]] != answers["animals", IMAGES[0]]  # two models, two answers
    assert set(texts(result.as_numpy("labels"))) <= set(ANIMALS)


def test_masks_and_parameters_as_v1(server, client):
    png = IMAGES[1]
    params = {**PARAMS, "classes": "square", "mask_threshold": 0.4, "refine": False, "image_id": 42}
    instances = v1_instances(server, "shapes", png, **{k: v for k, v in params.items() if k not in PARAMS})
    assert {i["category_name"] for i in instances} == {"square"} and CLASS_NAMES[1] == "square"
    outputs = [triton.InferRequestedOutput(n) for n in (*OUTPUTS, "masks")]
    result = client.infer("shapes", [image_input(png, True)], outputs=outputs, parameters=params, headers=auth())
    assert_matches_v1(result, instances)
    masks = result.as_numpy("masks")
    assert masks.dtype == np.uint8 and masks.shape == (len(instances), 96, 128)
    decoded = mask_util.decode([i["segmentation"] for i in instances]).transpose(2, 0, 1)
    np.testing.assert_array_equal(masks, decoded)
    assert result.get_response()["parameters"] == {"image_id": 42}


def test_the_asyncio_client_answers_as_v1(server):
    expected = {(name, i): v1_instances(server, name, png) for name in MODELS for i, png in enumerate(IMAGES)}

    async def ask_all():
        async with triton_aio.InferenceServerClient(server.url.removeprefix("http://")) as aio:
            assert await aio.is_server_ready()
            assert (await aio.get_model_metadata("animals", headers=auth()))["versions"] == ["3"]
            return await asyncio.gather(
                *(
                    aio.infer(name, [image_input(IMAGES[i], True)], parameters=PARAMS, headers=auth())
                    for name, i in expected
                )
            )

    for result, instances in zip(asyncio.run(ask_all()), expected.values()):
        assert_matches_v1(result, instances)


def triton_error(client, *inputs, **infer_args) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(infer_args.pop("model", "shapes"), list(inputs), **{"headers": auth(), **infer_args})
    return caught.value


def test_errors_reach_tritonclient_with_their_status(server, client):
    png = IMAGES[0]
    bad_image = triton_error(client, image_input(b"not an image at all", True))
    assert bad_image.status() == "400" and "image" in bad_image.message()
    unknown = triton_error(client, image_input(png, True), model="nothing")
    assert unknown.status() == "404" and "'nothing'" in unknown.message()
    version = triton_error(client, image_input(png, True), model_version="7")
    assert version.status() == "404" and "version" in version.message()
    threshold = triton_error(client, image_input(png, True), parameters={"score_threshold": 2.0})
    assert threshold.status() == "400" and "score_threshold" in threshold.message()
    unknown_param = triton_error(client, image_input(png, True), parameters={"colour": "red", "tile": 2})
    assert unknown_param.status() == "400" and "['colour', 'tile']" in unknown_param.message()
    output = triton_error(client, image_input(png, True), outputs=[triton.InferRequestedOutput("heatmap")])
    assert output.status() == "400" and "heatmap" in output.message()
    not_base64 = triton.InferInput("image", [1], "BYTES")
    not_base64.set_data_from_numpy(np.array(["this is not base64!"], dtype=object), binary_data=False)
    assert triton_error(client, not_base64).status() == "400"
    no_key = triton_error(client, image_input(png, True), headers={})
    assert no_key.status() == "401"


def test_a_client_that_leaves_is_dropped(server):
    """The slow model's lone request waits for its batch; its client leaves first."""
    gone = metric(server.url, "transfiner_rejections_total", reason="client_disconnected")
    body, length = binary_request(IMAGES[0])
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v2/models/slow/infer",
            content=body,
            headers={**AUTH, HEADER_LENGTH: str(length)},
            timeout=0.5,
        )
    deadline = time.monotonic() + 5
    while metric(server.url, "transfiner_rejections_total", reason="client_disconnected") == gone:
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.05)


def test_deadlines_answer_504(server, client):
    """A lone request to the slow model waits SLOW_DELAY_S for its batch to fill: past the deadline
    set by the X-Request-Timeout header, or by the protocol's timeout parameter (microseconds)."""
    png = IMAGES[0]
    client.infer("slow", [image_input(png, True)], headers=auth())  # a batch time on record for admission
    for args in ({"headers": {**AUTH, "X-Request-Timeout": "1"}}, {"timeout": 1_000_000}):
        started = time.monotonic()
        late = triton_error(client, image_input(png, True), model="slow", **args)
        assert late.status() == "504" and "deadline" in late.message(), args
        assert time.monotonic() - started < SLOW_DELAY_S


def binary_request(png: bytes, header: dict | None = None) -> tuple[bytes, int]:
    """A request with the image as binary data, framed by hand."""
    header = header or {
        "inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(png) + 4}}
        ],
        "parameters": {**PARAMS, "binary_data_output": True},
    }
    encoded = json.dumps(header).encode()
    return encoded + struct.pack("<I", len(png)) + png, len(encoded)


def test_binary_extension_framing(server):
    png = IMAGES[0]
    body, length = binary_request(png)
    response = httpx.post(
        server.url + "/v2/models/shapes/infer", content=body, headers={**AUTH, HEADER_LENGTH: str(length)}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    size = int(response.headers[HEADER_LENGTH])
    header, blob = json.loads(response.content[:size]), response.content[size:]
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert [o["name"] for o in header["outputs"]] == list(OUTPUTS) and sum(sizes) == len(blob)
    assert all("data" not in o for o in header["outputs"])
    boxes = np.frombuffer(blob[: sizes[0]], dtype="<f4").reshape(header["outputs"][0]["shape"])

    as_json = httpx.post(
        server.url + "/v2/models/shapes/infer",
        json={
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png).decode()]}],
            "parameters": PARAMS,
        },
        headers=auth(),
        timeout=60,
    )
    assert as_json.headers["content-type"] == "application/json" and HEADER_LENGTH not in as_json.headers
    outputs = {o["name"]: o for o in as_json.json()["outputs"]}
    np.testing.assert_array_equal(boxes, np.float32(outputs["boxes"]["data"]).reshape(boxes.shape))
    # BYTES: a 4-byte little-endian length, then the element.
    labels = blob[sum(sizes[:3]) : sum(sizes[:4])]
    first = struct.unpack("<I", labels[:4])[0]
    assert labels[4 : 4 + first].decode() == outputs["labels"]["data"][0]

    # Framing that does not add up is refused.
    for headers, content in (
        ({HEADER_LENGTH: str(len(body) + 1)}, body),  # longer than the body
        ({HEADER_LENGTH: str(length)}, body + b"extra"),  # bytes no tensor claims
        ({HEADER_LENGTH: str(length)}, body[:-10]),  # the image cut short
        ({HEADER_LENGTH: "many"}, body),
        ({}, body),  # binary data read as JSON
    ):
        refused = httpx.post(server.url + "/v2/models/shapes/infer", content=content, headers={**AUTH, **headers})
        assert refused.status_code == 400 and set(refused.json()) == {"error"}, (headers, refused.text)


def test_errors_take_the_protocol_shape_under_v2_only(server):
    def error(response: httpx.Response, status: int) -> str:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
        return body["error"]

    infer = server.url + "/v2/models/shapes/infer"
    assert "API key" in error(httpx.post(infer, content=b"{}"), 401)
    assert "inputs" in error(httpx.post(infer, content=b"{}", headers=AUTH), 400)
    assert "JSON" in error(httpx.post(infer, content=b"{not json", headers=AUTH), 400)
    error(httpx.post(server.url + "/v2/models/nothing/infer", content=b"{}", headers=AUTH), 400)
    error(httpx.get(server.url + "/v2/models/nothing", headers=AUTH), 404)
    error(httpx.get(server.url + "/v2/no/such/route", headers=AUTH), 404)
    error(httpx.get(infer, headers=AUTH), 405)
    assert "X-Request-Timeout" in error(
        httpx.post(infer, content=b"{}", headers={**AUTH, "X-Request-Timeout": "soon"}), 400
    )
    assert "exceeds" in error(httpx.post(infer, content=b"x" * (MAX_BODY + 1), headers=AUTH), 413)
    gzip = httpx.post(infer, content=b"{}", headers={**AUTH, "Content-Encoding": "gzip"})
    assert "Content-Encoding" in error(gzip, 400)
    # /v1 keeps its own shape.
    assert httpx.get(server.url + "/v1/models/nothing", headers=AUTH).json()["error"]["code"] == "model_not_found"


def test_v2_routes_are_labelled_in_the_metrics(server):
    route = "/v2/models/{name}/infer"
    before = metric(server.url, "transfiner_requests_total", route=route, status="413")
    httpx.post(server.url + "/v2/models/shapes/infer", content=b"x" * (MAX_BODY + 1), headers=AUTH)  # refused early
    assert metric(server.url, "transfiner_requests_total", route=route, status="413") == before + 1
    assert metric(server.url, "transfiner_requests_total", route="/v2/health/ready", method="GET") >= 1
    assert metric(server.url, "transfiner_requests_total", route=route, status="200") >= 1
