"""The service over real HTTP: uvicorn on a free loopback port, httpx clients, the tiny real model.

Masks decoded with pycocotools must equal the Predictor's for the same image; concurrency must
form batches (read from /metrics); every error class answers its status and JSON body while the
server keeps serving; overload answers 429/503 with Retry-After; deadlines answer 504 and never
reach the model; readiness goes 503 -> 200 -> 503 around a SIGTERM (a `transfiner serve` process).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image
from pycocotools.coco import COCO

from tests.service.support import ThreadServer, free_port, metric, wait_ready
from tests.support import CATEGORY_IDS, CLASS_NAMES, REPO, encode, scene
from transfiner.model.inference.images import load_image_rgb
from transfiner.service.loadtest.servers import SERVE_COMMAND
from transfiner.service.settings import ServiceSettings

pytestmark = pytest.mark.timeout(300)
API_KEY = "s3cret-key"
MAX_BODY = 64 * 1024
MAX_PIXELS = 200_000


@pytest.fixture(scope="module")
def server(checkpoint):
    """Batches of up to 4 that wait 150 ms to fill: concurrent requests batch reliably, and a lone
    request sits in the queue long enough for deadline and disconnect tests."""
    settings = ServiceSettings(
        model=str(checkpoint),
        device="cpu",
        api_key=API_KEY,
        max_batch_size=4,
        max_delay_ms=150,
        max_body_bytes=MAX_BODY,
        max_pixels=MAX_PIXELS,
    )
    srv = ThreadServer(settings).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=120) as c:
        yield c


def decode_masks(instances: list[dict]) -> np.ndarray:
    if not instances:
        return np.zeros((0,), dtype=bool)
    return mask_util.decode([i["segmentation"] for i in instances]).transpose(2, 0, 1).astype(bool)


def assert_same_as_prediction(instances: list[dict], prediction, image_id=None) -> None:
    """Exact agreement with the Predictor: masks pixel for pixel, records as coco_records."""
    assert len(instances) == len(prediction) > 0
    np.testing.assert_array_equal(decode_masks(instances), prediction.masks)
    expected = prediction.coco_records(image_id, CATEGORY_IDS)
    for got, want, cls in zip(instances, expected, prediction.classes):
        assert got["bbox"] == want["bbox"] and got["score"] == want["score"]
        assert got["category_id"] == want["category_id"] and got["category_name"] == CLASS_NAMES[cls]
        assert got["segmentation"] == want["segmentation"] and got["image_id"] == image_id
        assert got["area"] == float(mask_util.area(want["segmentation"]))


def test_health_models_docs(client):
    assert client.get("/health/live").json() == {"status": "alive"}
    assert client.get("/health/ready").status_code == 200
    card = client.get("/v1/models").json()["models"][0]
    assert card["name"] == "default" and len(card["version"]) == 12 and card["backend"] == "pytorch"
    assert card["precision"] == "fp32"  # auto on a CPU
    assert card["device"] == ["cpu"] and card["ready"] is True
    assert card["classes"] == [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]
    assert card["batching"]["max_batch_size"] == 4 and card["batching"]["workers"] == 1
    assert "swagger" in client.get("/docs").text.lower()
    body = client.get("/openapi.json").json()["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/json"} <= set(body)


def test_head_is_answered_as_get_without_a_body(server):
    """HEAD on a GET route: GET's status and headers, no body, and the keep-alive connection
    stays usable (a body sent after a HEAD answer would be read as the next response)."""
    host, port = server.url.removeprefix("http://").split(":")
    head_count = metric(server.url, "transfiner_requests_total", route="/health/live", method="HEAD")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"HEAD /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    head, rest = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ")
    get_length = int(
        next(line for line in rest.split(b"\r\n") if line.lower().startswith(b"content-length:")).split(b":")[1]
    )
    assert rest.startswith(b"HTTP/1.1 200 "), "the HEAD answer carried a body"
    assert rest.endswith(b'{"status":"alive"}') and get_length == len(b'{"status":"alive"}')
    assert b"content-length: %d" % get_length in head.lower()  # the length a GET would have
    for path in ("/health/ready", "/metrics", "/v1/models"):  # the open ones and one behind the key
        response = httpx.head(server.url + path, headers={"X-API-Key": API_KEY})
        assert response.status_code == 200 and response.content == b"", path
    assert httpx.head(server.url + "/v1/segment").status_code == 405  # POST only
    assert metric(server.url, "transfiner_requests_total", route="/health/live", method="HEAD") == head_count + 1


def test_rle_equals_predictor_and_coco_loadres(client, predictor):
    image = scene()
    response = client.post(
        "/v1/segment",
        content=encode(image),
        headers={"Content-Type": "image/png"},
        params={"score_threshold": 0.0, "max_detections": 6, "image_id": "42"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == {"width": 128, "height": 96, "image_id": 42}
    assert body["model"]["backend"] == "pytorch" and body["model"]["precision"] == "fp32"
    assert set(body["timing"]) == {"queue_ms", "inference_ms", "postprocess_ms", "total_ms"}
    assert body["timing"]["total_ms"] >= body["timing"]["inference_ms"] > 0
    expected = predictor(image, score_threshold=0.0, max_detections=6)
    assert_same_as_prediction(body["instances"], expected, image_id=42)

    gt = COCO()
    gt.dataset = {
        "images": [{"id": 42, "width": 128, "height": 96}],
        "categories": [{"id": i, "name": n} for i, n in zip(CATEGORY_IDS, CLASS_NAMES)],
        "annotations": [],
    }
    gt.createIndex()
    results = gt.loadRes(body["instances"])  # unchanged
    assert len(results.anns) == len(body["instances"])
    for ann, instance in zip(results.anns.values(), body["instances"]):
        np.testing.assert_array_equal(results.annToMask(ann), mask_util.decode(instance["segmentation"]))


def test_upload_forms_and_declared_type_agree(client):
    image = scene(seed=1)
    png = encode(image)
    params = {"score_threshold": "0", "max_detections": "4"}
    raw = client.post("/v1/segment", content=png, params=params, headers={"Content-Type": "image/png"})
    # The declared type is ignored: a PNG sent as JPEG (or untyped) is still a PNG.
    mislabelled = client.post("/v1/segment", content=png, params=params, headers={"Content-Type": "image/jpeg"})
    form = client.post("/v1/segment", files={"image": ("x.bin", png, "text/plain")}, data=params)
    # What `curl --data-binary @img.png` sends: raw bytes declared as a urlencoded form.
    curl_default = client.post(
        "/v1/segment", content=png, params=params, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    as_json = client.post(
        "/v1/segment",
        json={
            "image": "data:image/png;base64," + base64.b64encode(png).decode(),
            "score_threshold": 0,
            "max_detections": 4,
        },
    )
    responses = (raw, mislabelled, form, curl_default, as_json)
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    bodies = [r.json() for r in responses]
    for other in bodies[1:]:
        assert other["instances"] == bodies[0]["instances"]


def test_a_urlencoded_form_is_told_how_to_send_the_image(client):
    # `curl -d image=...` sends a real form; the answer names the two uploads that work.
    response = client.post(
        "/v1/segment",
        content=b"image=%2Fhome%2Fme%2Fphoto.jpg",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415
    message = response.json()["error"]["message"]
    assert "--data-binary" in message and "multipart/form-data" in message, message


def test_per_request_parameters(client, predictor):
    """Each option is applied to its own request; results match the Predictor run with it."""
    image = scene(seed=2)
    png = encode(image)

    def post(**params):
        response = client.post("/v1/segment", content=png, params={"score_threshold": 0, **params})
        assert response.status_code == 200, response.text
        return response.json()["instances"]

    coarse = post(refine="false", max_detections=5)
    assert_same_as_prediction(coarse, predictor(image, score_threshold=0.0, max_detections=5, refine=False))
    strict = post(mask_threshold=0.8, max_detections=5)
    assert_same_as_prediction(strict, predictor(image, score_threshold=0.0, max_detections=5, mask_threshold=0.8))

    # A class filter keeps that class among the model's full top-k, then cuts to max_detections.
    full = predictor(image, score_threshold=0.0)
    squares = [i for i, c in enumerate(full.classes) if c == 1][:3]
    by_name = post(classes="square", max_detections=3)
    assert [i["category_id"] for i in by_name] == [7] * len(squares)
    np.testing.assert_array_equal(decode_masks(by_name), full.masks[squares])
    assert post(classes="7", max_detections=3) == by_name

    boxes_only = post(mask_format="none", max_detections=5)
    with_masks = post(max_detections=5)
    assert all("segmentation" not in i for i in boxes_only)
    assert [i["bbox"] for i in boxes_only] == [i["bbox"] for i in with_masks]

    polygons = post(mask_format="polygon", max_detections=5)
    assert [i["bbox"] for i in polygons] == [i["bbox"] for i in with_masks]
    for polygon, rle in zip(polygons, with_masks):
        assert polygon["area"] == rle["area"]
        if not polygon["segmentation"]:
            continue
        drawn = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygon["segmentation"], 96, 128)))
        truth = mask_util.decode(rle["segmentation"])
        assert (drawn & truth).sum() / (drawn | truth).sum() >= 0.9


def test_a_parameter_in_both_the_query_and_the_body_takes_the_bodys_value(client):
    """The body wins, in JSON and in a form, for every parameter (a list of classes replaces the
    query's); parameters given only in the query still apply."""
    png = encode(scene(seed=2))
    query = {"score_threshold": "0", "max_detections": "5", "classes": "circle", "image_id": "7", "mask_format": "none"}
    as_json = client.post(
        "/v1/segment",
        params=query,
        json={"image": base64.b64encode(png).decode(), "max_detections": 2, "classes": ["square"], "image_id": "b"},
    )
    form = client.post(
        "/v1/segment",
        params=query,
        files={"image": ("a.png", png)},
        data={"max_detections": "2", "classes": "square", "image_id": "b"},
    )
    query_only = client.post("/v1/segment", params=query, content=png)
    for response in (as_json, form, query_only):
        assert response.status_code == 200, response.text
    for response in (as_json, form):
        body = response.json()
        assert len(body["instances"]) == 2 and body["image"]["image_id"] == "b"
        assert {i["category_id"] for i in body["instances"]} == {7}  # square, not the query's circle
        assert all("segmentation" not in i for i in body["instances"])  # the query's mask_format
    assert as_json.json()["instances"] == form.json()["instances"]
    body = query_only.json()
    # The tiny model finds no circle: the query's filter, which the bodies above replaced.
    assert body["instances"] == [] and body["image"]["image_id"] == 7


def test_digits_other_than_ascii_are_text_not_numbers(client):
    """ "³" and "٣" are digits to str.isdigit(): an image id echoes them as the strings they are, a
    class filter looks them up as names (int() would raise on the first and read 3, the circle's
    id, from the second), a version path segment is an unknown version: 4xx JSON, never a 500."""
    png = encode(scene(seed=2))
    for digit in ("\u00b3", "\u0663", "\uff13"):  # superscript, Arabic-Indic, fullwidth three
        echoed = client.post("/v1/segment", params={"image_id": digit, "mask_format": "none"}, content=png)
        assert echoed.status_code == 200 and echoed.json()["image"]["image_id"] == digit, echoed.text
        unknown = client.post("/v1/segment", params={"classes": digit}, content=png)
        assert unknown.status_code == 422, unknown.text
        assert unknown.json()["error"]["message"].startswith("unknown classes"), unknown.text
        for numeric in ("score_threshold", "max_detections", "mask_threshold"):
            refused = client.post("/v1/segment", params={numeric: digit}, content=png)
            assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_parameter"
        version = client.post(f"/v1/models/default/versions/{digit}/segment", content=png)
        assert version.status_code == 404 and version.json()["error"]["code"] == "version_not_found"
        model = client.get(f"/v1/models/{digit}")
        assert model.status_code == 404 and model.json()["error"]["code"] == "model_not_found"
    timeout = client.post("/v1/segment", content=png, headers={"X-Request-Timeout": "\u00b3".encode("latin-1")})
    assert timeout.status_code == 422 and timeout.json()["error"]["code"] == "invalid_parameter"


def test_polygons_with_no_instance_left_answer_an_empty_list(client):
    png = encode(scene(seed=2))
    everything = client.post("/v1/segment", content=png, params={"score_threshold": 0, "mask_format": "none"})
    best = {}
    for instance in everything.json()["instances"]:
        best[instance["category_name"]] = max(best.get(instance["category_name"], 0), instance["score"])
    # A threshold above every detection of the weaker class, a filter keeping only that class:
    # the stronger class's detections pass the threshold and the filter removes them all.
    weaker, stronger = sorted(CLASS_NAMES, key=lambda name: best.get(name, 0))
    threshold = best.get(weaker, 0) + 1e-4
    assert best[stronger] > threshold, best
    for name, params in {
        "nothing detected": {"score_threshold": 1},
        "class filter removes all": {"score_threshold": threshold, "classes": weaker},
    }.items():
        response = client.post("/v1/segment", content=png, params={"mask_format": "polygon", **params})
        assert response.status_code == 200, (name, response.text)
        assert response.json()["instances"] == [], name


def test_extreme_aspect_ratios_are_served_and_spare_their_batch_mates(client):
    """Past ~1280:1 (here past 256:1: network sides 96/128) the resized short side rounds below
    one pixel; the image is still served, and requests arriving with it are unaffected."""
    extremes = [np.full((1, 1281, 3), 200, np.uint8), np.full((10000, 2, 3), 50, np.uint8)]
    bodies = [encode(image) for image in [*extremes, scene(seed=4)]]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(
            pool.map(lambda body: client.post("/v1/segment", content=body, params={"score_threshold": 0}), bodies)
        )
    assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
    for response, image in zip(responses, extremes):
        assert response.json()["image"]["height"] == image.shape[0]
        assert response.json()["image"]["width"] == image.shape[1]
        for instance in response.json()["instances"]:
            x, y, w, h = instance["bbox"]
            assert 0 <= x and x + w <= image.shape[1] + 0.01 and 0 <= y and y + h <= image.shape[0] + 0.01
    assert len(responses[-1].json()["instances"]) > 0


def test_exif_orientation_applied(client, predictor):
    picture = Image.fromarray(scene(80, 120, seed=3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    jpeg = encode(picture, "JPEG", exif=exif.tobytes(), quality=95)
    response = client.post("/v1/segment", content=jpeg, params={"score_threshold": 0, "max_detections": 3})
    assert response.status_code == 200, response.text
    assert response.json()["image"] | {"image_id": None} == {"width": 80, "height": 120, "image_id": None}
    upright = load_image_rgb_from_bytes(jpeg)
    assert upright.shape == (120, 80, 3)
    assert_same_as_prediction(response.json()["instances"], predictor(upright, score_threshold=0.0, max_detections=3))


def load_image_rgb_from_bytes(data: bytes) -> np.ndarray:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".img") as file:
        file.write(data)
        file.flush()
        return load_image_rgb(file.name)


def test_concurrent_requests_form_batches(server, client):
    count0 = metric(server.url, "transfiner_batch_size_count")
    singles0 = metric(server.url, "transfiner_batch_size_bucket", le="1.0")
    images = [encode(scene(seed=10 + i)) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(
            pool.map(
                lambda png: client.post("/v1/segment", content=png, params={"score_threshold": 0, "max_detections": 2}),
                images,
            )
        )
    assert [r.status_code for r in responses] == [200] * 4
    batches = metric(server.url, "transfiner_batch_size_count") - count0
    multi = batches - (metric(server.url, "transfiner_batch_size_bucket", le="1.0") - singles0)
    assert batches < 4 and multi >= 1, f"{batches} batches, {multi} of them larger than 1"
    assert all(len(r.json()["instances"]) == 2 for r in responses)


def test_an_answer_does_not_depend_on_its_batch_mates(server, client):
    """Served alone or sent together with images of other sizes (one of them on the same canvas,
    so they share a batch; the others on their own canvases), an image gets the same answer."""
    image = scene(seed=20)  # 96x128: network input 96x128, canvas 96x128
    mates = [scene(48, 64, seed=21), scene(128, 96, seed=22), scene(96, 200, seed=23)]  # canvases: same, 2 others
    params = {"score_threshold": 0, "max_detections": 6}
    alone = client.post("/v1/segment", content=encode(image), params=params)
    assert alone.status_code == 200, alone.text

    count0 = metric(server.url, "transfiner_batch_size_count")
    singles0 = metric(server.url, "transfiner_batch_size_bucket", le="1.0")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(
            pool.map(
                lambda png: client.post("/v1/segment", content=png, params=params), [encode(x) for x in [image, *mates]]
            )
        )
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    batches = metric(server.url, "transfiner_batch_size_count") - count0
    singles = metric(server.url, "transfiner_batch_size_bucket", le="1.0") - singles0
    assert (batches, singles) == (3, 2), "one batch per canvas: the 96x128 pair, then each other canvas alone"
    assert len(alone.json()["instances"]) > 0
    assert responses[0].json()["instances"] == alone.json()["instances"]


def test_large_jpeg_is_decoded_reduced_and_answered_in_its_own_pixels(client):
    """A JPEG four times the network input is decoded at 1/4 scale; boxes and masks still come
    back in the uploaded image's coordinates."""
    picture = Image.fromarray(scene(seed=24)).resize((500, 400), Image.Resampling.BILINEAR)
    jpeg = encode(picture, "JPEG", quality=90)
    assert len(jpeg) < MAX_BODY
    response = client.post("/v1/segment", content=jpeg, params={"score_threshold": 0, "max_detections": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] | {"image_id": None} == {"width": 500, "height": 400, "image_id": None}
    assert len(body["instances"]) > 0
    for instance in body["instances"]:
        assert instance["segmentation"]["size"] == [400, 500]
        x, y, w, h = instance["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 500.01 and y + h <= 400.01
    assert decode_masks(body["instances"]).shape == (len(body["instances"]), 400, 500)


def test_large_png_equals_the_predictor(client, predictor):
    """A PNG large enough to be resized on the decode thread gives the Predictor's answer exactly."""
    image = np.asarray(Image.fromarray(scene(seed=25)).resize((480, 400), Image.Resampling.NEAREST))
    png = encode(image)
    assert len(png) < MAX_BODY
    response = client.post("/v1/segment", content=png, params={"score_threshold": 0, "max_detections": 5})
    assert response.status_code == 200, response.text
    assert_same_as_prediction(response.json()["instances"], predictor(image, score_threshold=0.0, max_detections=5))


def _chunks(data: bytes, size: int = 8192):
    for start in range(0, len(data), size):
        yield data[start : start + size]


def json_body(b64: str, image_id: bytes) -> dict:
    """A JSON request whose ``image_id`` is raw JSON text (what ``json=`` could not send)."""
    content = b'{"image": "' + b64.encode() + b'", "image_id": ' + image_id + b"}"
    return dict(content=content, headers={"Content-Type": "application/json"})


def error_cases():
    png = encode(scene())
    big_pixels = encode(np.zeros((500, 500, 3), np.uint8))  # 250,000 pixels > 200,000, a tiny file
    assert len(big_pixels) < MAX_BODY
    jpeg = encode(scene(), "JPEG")
    b64 = base64.b64encode(png).decode()
    form_ct = {"Content-Type": "application/x-www-form-urlencoded"}
    big_form = httpx.Request("POST", "http://x/", files={"image": ("a.png", os.urandom(2 * MAX_BODY))})
    streamed_form = dict(content=_chunks(big_form.read()), headers={"Content-Type": big_form.headers["Content-Type"]})
    return {
        "empty body": (dict(content=b""), 400, "bad_request"),
        "multipart without image": (dict(files={"picture": ("a.png", png)}), 400, "bad_request"),
        "multipart image as text": (dict(data={"image": "not a file"}, files={"x": ("", b"")}), 400, "bad_request"),
        "malformed json": (
            dict(content=b'{"image": ', headers={"Content-Type": "application/json"}),
            400,
            "bad_request",
        ),
        "json without image": (dict(json={"score_threshold": 0.5}), 400, "bad_request"),
        "json bad base64": (dict(json={"image": "***"}), 400, "bad_request"),
        "json not an object": (dict(json=[b64]), 400, "bad_request"),
        "json 5000-digit integer": (json_body(b64, b"1" * 5000), 400, "bad_request"),
        "json nested 2000 deep": (json_body(b64, b"[" * 2000 + b"]" * 2000), 400, "bad_request"),
        "json lone surrogate": (json_body(b64, rb'"\ud800"'), 400, "bad_request"),
        "no api key": (dict(content=png, headers={"X-API-Key": ""}), 401, "unauthorized"),
        "wrong api key": (dict(content=png, headers={"X-API-Key": API_KEY + "x"}), 401, "unauthorized"),
        "wrong bearer": (
            dict(content=png, headers={"X-API-Key": "", "Authorization": "Bearer nope"}),
            401,
            "unauthorized",
        ),
        "body too large": (dict(content=os.urandom(MAX_BODY + 1)), 413, "body_too_large"),
        "chunked body too large": (dict(content=_chunks(os.urandom(2 * MAX_BODY))), 413, "body_too_large"),
        "chunked multipart too large": (streamed_form, 413, "body_too_large"),
        "too many pixels": (dict(content=big_pixels), 413, "image_too_large"),
        "text as jpeg": (
            dict(content=b"hello, world", headers={"Content-Type": "image/jpeg"}),
            415,
            "unsupported_media_type",
        ),
        "svg": (dict(content=b"<svg xmlns='http://www.w3.org/2000/svg'/>"), 415, "unsupported_media_type"),
        "urlencoded form": (dict(content=b"image=abc", headers=form_ct), 415, "unsupported_media_type"),
        "score above 1": (dict(content=png, params={"score_threshold": 2}), 422, "invalid_parameter"),
        "zero detections": (dict(content=png, params={"max_detections": 0}), 422, "invalid_parameter"),
        "101 detections": (dict(content=png, params={"max_detections": 101}), 422, "invalid_parameter"),
        "bad mask format": (dict(content=png, params={"mask_format": "png"}), 422, "invalid_parameter"),
        "unknown parameter": (dict(content=png, params={"score": 0.5}), 422, "invalid_parameter"),
        "unknown class": (dict(content=png, params={"classes": "dog"}), 422, "invalid_parameter"),
        "empty class filter": (dict(content=png, params={"classes": ""}), 422, "invalid_parameter"),
        "empty class list": (dict(json={"image": b64, "classes": []}), 422, "invalid_parameter"),
        # JSON has numbers and booleans: their text forms, which a query needs, are not JSON's.
        "json threshold as text": (dict(json={"image": b64, "score_threshold": "0.5"}), 422, "invalid_parameter"),
        "json refine as 1": (dict(json={"image": b64, "refine": 1}), 422, "invalid_parameter"),
        "json empty image": (dict(json={"image": ""}), 400, "bad_request"),
        "parameter twice in the query": (
            dict(content=png, params=[("refine", "true"), ("refine", "false")]),
            422,
            "invalid_parameter",
        ),
        "bad timeout header": (dict(content=png, headers={"X-Request-Timeout": "soon"}), 422, "invalid_parameter"),
        "negative timeout": (dict(content=png, headers={"X-Request-Timeout": "-1"}), 422, "invalid_parameter"),
        "truncated png": (dict(content=png[: len(png) * 2 // 3]), 422, "invalid_image"),
        "corrupt jpeg": (dict(content=jpeg[:20] + bytes(200) + b"\xff\xd9"), 422, "invalid_image"),
    }


def test_every_error_class_answers_json_and_the_server_keeps_serving(server, client):
    reasons = ("too_large", "unsupported_type", "bad_image", "unauthorized")
    before = {r: metric(server.url, "transfiner_rejections_total", reason=r) for r in reasons}
    failures = []
    for name, (kwargs, status, code) in error_cases().items():
        response = client.post("/v1/segment", **kwargs)
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
        ok = (
            response.status_code == status
            and body is not None
            and set(body) == {"error"}
            and body["error"]["code"] == code
            and isinstance(body["error"]["message"], str)
            and "Traceback" not in response.text
            # Encoded alike, whether the app, a middleware or the protocol answered.
            and response.content == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        )
        if not ok:
            failures.append(f"{name}: {response.status_code} {response.text[:200]}")
    assert not failures, "\n".join(failures)
    assert client.post("/v1/segment", content=b"x", headers={"X-API-Key": ""}).headers["WWW-Authenticate"] == "Bearer"
    for path, method, status in (("/nope", "GET", 404), ("/v1/segment", "GET", 405)):
        response = client.request(method, path)
        assert response.status_code == status and "error" in response.json()
    after = {r: metric(server.url, "transfiner_rejections_total", reason=r) for r in reasons}
    assert all(after[r] > before[r] for r in reasons), (before, after)
    # Still serving, with the right key in either header.
    assert client.get("/health/ready").status_code == 200
    ok = client.post(
        "/v1/segment",
        content=encode(scene()),
        params={"mask_format": "none"},
        headers={"X-API-Key": "", "Authorization": f"Bearer {API_KEY}"},
    )
    assert ok.status_code == 200, ok.text


def test_a_deadline_shorter_than_the_work_ahead_is_refused_at_once(server, client):
    assert client.post("/v1/segment", content=encode(scene())).status_code == 200  # a batch time on record
    batches0 = metric(server.url, "transfiner_batch_size_count")
    refused0 = metric(server.url, "transfiner_rejections_total", reason="deadline_unmeetable")
    response = client.post("/v1/segment", content=encode(scene()), headers={"X-Request-Timeout": "0.01"})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "overloaded"
    # The message gives the wait it foresees and the time the request had left, both in seconds.
    foreseen, left = (float(word) for word in error["message"].split() if word.replace(".", "", 1).isdigit())
    assert foreseen > left and left <= 0.01, error
    assert int(response.headers["Retry-After"]) >= max(1, foreseen)
    time.sleep(0.4)  # past the batch delay: had it been queued, it would have run by now
    assert metric(server.url, "transfiner_batch_size_count") == batches0
    assert metric(server.url, "transfiner_rejections_total", reason="deadline_unmeetable") == refused0 + 1


def test_disconnected_client_is_dropped_from_the_queue(server):
    batches0 = metric(server.url, "transfiner_batch_size_count")
    gone0 = metric(server.url, "transfiner_rejections_total", reason="client_disconnected")
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=0.06) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/segment", content=encode(scene()))
    deadline = time.monotonic() + 5
    while metric(server.url, "transfiner_rejections_total", reason="client_disconnected") == gone0:
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.05)
    time.sleep(0.3)
    assert metric(server.url, "transfiner_batch_size_count") == batches0


def test_client_leaving_mid_upload_is_counted_not_an_error(server):
    gone0 = metric(server.url, "transfiner_rejections_total", reason="client_disconnected")
    errors0 = metric(server.url, "transfiner_requests_total", status="500")
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(
            b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nX-API-Key: "
            + API_KEY.encode()
            + b"\r\nContent-Length: 50000\r\n\r\n"
            + encode(scene())[:1000]
        )
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while metric(server.url, "transfiner_rejections_total", reason="client_disconnected") == gone0:
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.05)
    assert metric(server.url, "transfiner_requests_total", status="500") == errors0
    assert metric(server.url, "transfiner_inflight_requests") == 0


METRIC_NAMES = (
    "transfiner_request_duration_seconds",
    "transfiner_queue_wait_seconds",
    "transfiner_decode_seconds",
    "transfiner_inference_seconds",
    "transfiner_postprocess_seconds",
    "transfiner_batch_size",
    "transfiner_queue_depth",
    "transfiner_inflight_requests",
    "transfiner_instances_per_image",
    "transfiner_input_megapixels",
    "transfiner_requests_total",
    "transfiner_rejections_total",
    "transfiner_model_info",
)
HISTOGRAMS = (
    "transfiner_queue_wait_seconds",
    "transfiner_decode_seconds",
    "transfiner_inference_seconds",
    "transfiner_postprocess_seconds",
    "transfiner_batch_size",
    "transfiner_instances_per_image",
    "transfiner_input_megapixels",
)


def test_metric_names_exist_and_move(server, client):
    text = client.get("/metrics").text
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    for reason in ("queue_full", "deadline", "bad_image", "too_large", "unsupported_type", "unauthorized"):
        assert f'reason="{reason}"' in text
    assert (
        metric(server.url, "transfiner_model_info", name="default", backend="pytorch", precision="fp32", device="cpu")
        == 1
    )
    before = {name: metric(server.url, name + "_count") for name in HISTOGRAMS}
    ok0 = metric(server.url, "transfiner_requests_total", route="/v1/segment", method="POST", status="200")
    e2e0 = metric(server.url, "transfiner_request_duration_seconds_count", route="/v1/segment")
    assert client.post("/v1/segment", content=encode(scene()), params={"max_detections": 1}).status_code == 200
    for name in HISTOGRAMS:
        assert metric(server.url, name + "_count") > before[name], name
    assert metric(server.url, "transfiner_requests_total", route="/v1/segment", method="POST", status="200") == ok0 + 1
    assert metric(server.url, "transfiner_request_duration_seconds_count", route="/v1/segment") == e2e0 + 1
    assert metric(server.url, "transfiner_inflight_requests") == 0


# ------------------------------------------------------------------------------------------------
# Overload: a second server with room for 3 requests in flight, at most 2 per client.


class FaultyBackend:
    """The real backend, except that batches padded to 64 rows fail: fault injection for the
    'a failing forward pass answers 500 and the server goes on' test."""

    def __init__(self, backend) -> None:
        self.inner, self.name, self.device, self.cfg = backend, backend.name, backend.device, backend.cfg
        self.precision = backend.precision

    def infer(self, images, image_sizes, options):
        if images.shape[-2] == 64:
            raise RuntimeError("injected failure")
        return self.inner.infer(images, image_sizes, options)


def faulty_loader(settings):
    from transfiner.service.engine.runtime import load_model

    loaded = load_model(settings)
    loaded.backends = [FaultyBackend(b) for b in loaded.backends]
    return loaded


@pytest.fixture(scope="module")
def small_server(checkpoint):
    settings = ServiceSettings(
        model=str(checkpoint),
        device="cpu",
        max_batch_size=1,
        max_delay_ms=0,
        max_queue_size=2,
        max_client_inflight=2,
        warmup_batches=0,
    )
    srv = ThreadServer(settings, loader=faulty_loader).start()
    yield srv
    srv.stop()


def test_overload_answers_429_and_503_with_retry_after(small_server):
    png = encode(scene())
    barrier = threading.Barrier(8)

    def post(address: str):
        transport = httpx.HTTPTransport(local_address=address)  # two clients: two source addresses
        with httpx.Client(base_url=small_server.url, transport=transport, timeout=120) as c:
            barrier.wait()
            return c.post("/v1/segment", content=png, params={"score_threshold": 0, "max_detections": 1})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, ["127.0.0.1"] * 4 + ["127.0.0.2"] * 4))
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and 503 in statuses and 200 in statuses, statuses
    for response in responses:
        if response.status_code == 200:
            continue
        assert int(response.headers["Retry-After"]) >= 1
        code = response.json()["error"]["code"]
        assert code == {429: "too_many_requests", 503: "queue_full"}[response.status_code]
    assert metric(small_server.url, "transfiner_rejections_total", reason="queue_full") >= 1
    assert metric(small_server.url, "transfiner_rejections_total", reason="client_limit") >= 1
    # Still serving.
    assert httpx.post(small_server.url + "/v1/segment", content=png, timeout=120).status_code == 200


def test_a_failing_forward_pass_answers_500_and_the_server_goes_on(small_server):
    wide = encode(scene(96, 200))  # resized to 61x128, padded to 64 rows: the injected failure
    response = httpx.post(small_server.url + "/v1/segment", content=wide, timeout=120)
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "inference failed (logged on the server)"}
    }
    assert httpx.post(small_server.url + "/v1/segment", content=encode(scene()), timeout=120).status_code == 200


# ------------------------------------------------------------------------------------------------
# `transfiner serve` in its own process: readiness 503 -> 200, SIGTERM drains, readiness 503, exit 0.


def test_serve_process_readiness_and_graceful_sigterm(checkpoint, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(
        os.environ,
        TRANSFINER_SHUTDOWN_GRACE_S="1.5",
        TRANSFINER_WARMUP_BATCHES="3",
        TRANSFINER_DEVICE="cpu",
        TRANSFINER_TORCH_THREADS="1",
    )
    log = open(tmp_path / "serve.log", "w+")
    command = [
        *SERVE_COMMAND,
        "--model",
        str(checkpoint),
        "--port",
        str(port),
        "--grpc-port",
        "0",
        "--max-delay-ms",
        "300",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        seen = wait_ready(url, timeout=120)
        assert 503 in seen and seen[-1] == 200, seen  # not ready while loading / warming up
        png = encode(scene())
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            inflight = [pool.submit(httpx.post, url + "/v1/segment", content=png, timeout=60) for _ in range(3)]
            deadline = time.monotonic() + 30
            # A batch waits 300 ms to fill: all three are admitted and waiting when SIGTERM comes.
            while metric(url, "transfiner_inflight_requests") < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while httpx.get(url + "/health/ready").status_code != 503:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert httpx.get(url + "/health/live").status_code == 200
            refused = httpx.post(url + "/v1/segment", content=png, timeout=60)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert [f.result().status_code for f in inflight] == [200] * 3  # in-flight work finished
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.seek(0)
        output = log.read()
        log.close()
    assert "Traceback" not in output, output


def test_after_the_drain_a_stalled_request_holds_the_stop_only_briefly(checkpoint, tmp_path):
    """A request still open when the drain ends (here an upload that stalled before its body, so
    never admitted) is given AFTER_DRAIN_S, not a second drain_timeout_s: a replica stops within
    what Kubernetes' and Docker's grace periods allow for (tests/deploy/test_kubernetes.py). The
    drain and body timeouts here are far longer than the 60 s the test waits for the exit."""
    from transfiner.service.server import AFTER_DRAIN_S

    port = free_port()
    env = dict(os.environ, TRANSFINER_DRAIN_TIMEOUT_S="600", TRANSFINER_BODY_TIMEOUT_S="600", TRANSFINER_DEVICE="cpu")
    command = [
        *SERVE_COMMAND,
        "--model",
        str(checkpoint),
        "--port",
        str(port),
        "--grpc-port",
        "0",
        "--log-level",
        "warning",
    ]
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=120)
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\npartial")
            time.sleep(0.5)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
            stopped_after = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert AFTER_DRAIN_S - 1 < stopped_after, (stopped_after, (tmp_path / "serve.log").read_text()[-2000:])
