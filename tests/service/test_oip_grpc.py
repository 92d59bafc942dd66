"""The Open Inference Protocol over gRPC, driven by Triton's own clients (``tritonclient.grpc`` and
``tritonclient.grpc.aio``, unmodified) against a real server on loopback: health, metadata,
inference equal to ``/v1`` on two models of a repository, the refusals' status codes, the API key,
the message limit, deadlines, cancellation, draining, and the standard health and reflection
services."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pycocotools import mask as mask_util
from tritonclient.utils import InferenceServerException

from scripts.generate_grpc import FOLDER, OUTPUTS, generate
from tests.service.repository.support import add_version, write_animal_checkpoint
from tests.service.support import metric, running
from tests.support import encode, scene
from transfiner.service.grpc import inference_pb2 as pb
from transfiner.service.grpc import inference_pb2_grpc as pb_grpc
from transfiner.service.settings import ServiceSettings

KEY = "grpc-test-key"
# Strings for the floats: Triton's client sends only bool, int and string parameters.
PARAMS = {"score_threshold": "0.0", "max_detections": 5}
HTTP_PARAMS = {"score_threshold": 0.0, "max_detections": 5}
MESSAGE_LIMIT = 64 * 1024


def image_input(data: bytes) -> triton.InferInput:
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=object))
    return tensor


def status_of(call) -> tuple[str, str]:
    """The refusal's status code name and message (Triton's client raises its own exception)."""
    with pytest.raises(InferenceServerException) as refused:
        call()
    return refused.value.status().removeprefix("StatusCode."), refused.value.message()


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def in_server_loop(server, function) -> None:
    """Runs ``function()`` in the server's event loop (where the runtime lives) and waits for it."""

    async def call() -> None:
        function()

    asyncio.run_coroutine_threadsafe(call(), server.server.loop).result(timeout=30)


@pytest.fixture(scope="module")
def repository(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("grpc-repository") / "repository"
    add_version(root, "shapes", 1, checkpoint)
    animals = write_animal_checkpoint(tmp_path_factory.mktemp("animals") / "animals.pth")
    add_version(root, "animals", 3, animals)
    return root


@pytest.fixture(scope="module")
def server(repository):
    """Two models, one image per forward pass (a batched convolution may round the last bit
    differently, and answers are compared to the byte), a small gRPC message limit."""
    settings = ServiceSettings(
        model_repository=str(repository),
        default_model="shapes",
        device="cpu",
        max_batch_size=1,
        grpc_max_message_bytes=MESSAGE_LIMIT,
    )
    with running(settings, grpc=True) as started:
        yield started


@pytest.fixture(scope="module")
def client(server):
    return triton.InferenceServerClient(server.grpc_target)


def test_regenerating_the_modules_gives_the_committed_ones(tmp_path):
    """A change to inference.proto without ``make grpc`` fails here."""
    generate(tmp_path)
    for name in OUTPUTS:
        assert (tmp_path / name).read_text() == (FOLDER / name).read_text(), f"{name} is stale: run make grpc"


def test_health_and_metadata(server, client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "transfiner" and metadata["version"]
    assert client.is_model_ready("animals") and client.is_model_ready("shapes", "1")
    card = client.get_model_metadata("animals", as_json=True)
    assert card["name"] == "animals" and card["versions"] == ["3"]
    assert card["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["1"]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in card["outputs"]}
    assert outputs["boxes"] == ("FP32", ["-1", "4"]) and outputs["masks_rle"] == ("BYTES", ["-1"])
    assert status_of(lambda: client.get_model_metadata("zebras"))[0] == "NOT_FOUND"
    assert status_of(lambda: client.is_model_ready("animals", "1"))[0] == "NOT_FOUND"
    assert metric(server.url, "transfiner_grpc_requests_total", method="ServerLive", code="OK") >= 1
    assert metric(server.url, "transfiner_grpc_requests_total", method="ModelMetadata", code="NOT_FOUND") >= 1


def assert_same_as_v1(outputs: dict[str, np.ndarray], instances: list[dict]) -> None:
    """Outputs equal to /v1's instances: masks to the byte (and decoded with pycocotools), boxes
    (x1, y1, x2, y2) from /v1's rounded (x, y, w, h), scores and classes."""
    assert len(instances) == len(outputs["scores"]) > 0
    assert outputs["boxes"].shape == (len(instances), 4) and outputs["boxes"].dtype == np.float32
    for i, want in enumerate(instances):
        x, y, w, h = want["bbox"]
        assert outputs["boxes"][i] == pytest.approx([x, y, x + w, y + h], abs=1e-3)
        assert outputs["scores"][i] == pytest.approx(want["score"], abs=1e-6)
        assert int(outputs["classes"][i]) == want["category_id"]
        assert outputs["labels"][i].decode() == want["category_name"]
        rle = json.loads(outputs["masks_rle"][i])
        assert rle == want["segmentation"]
        got = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        expected = want["segmentation"]
        expected_mask = mask_util.decode({"size": expected["size"], "counts": expected["counts"].encode()})
        assert np.array_equal(got, expected_mask) and int(got.sum()) == want["area"]


def test_infer_answers_as_v1_on_two_models(server, client):
    for model, version in (("shapes", ""), ("animals", "3")):
        for seed in range(2):
            png = encode(scene(96, 128, seed=seed))
            result = client.infer(model, [image_input(png)], model_version=version, parameters=PARAMS, request_id="r1")
            response = result.get_response()
            assert (response.model_name, response.id) == (model, "r1")
            assert response.model_version == ("1" if model == "shapes" else "3")
            outputs = {name: result.as_numpy(name) for name in ("boxes", "scores", "classes", "labels", "masks_rle")}
            http = httpx.post(f"{server.url}/v1/models/{model}/segment", content=png, params=HTTP_PARAMS, timeout=60)
            assert http.status_code == 200, http.text
            assert_same_as_v1(outputs, http.json()["instances"])
    assert metric(server.url, "transfiner_grpc_requests_total", method="ModelInfer", code="OK") >= 4


def test_the_asyncio_client_and_requested_outputs(server):
    png = encode(scene(96, 128, seed=3))
    http = httpx.post(f"{server.url}/v1/models/animals/segment", content=png, params=HTTP_PARAMS, timeout=60).json()

    async def ask():
        async with triton_aio.InferenceServerClient(server.grpc_target) as aio_client:
            assert await aio_client.is_server_ready()
            card = await aio_client.get_model_metadata("animals", as_json=True)
            requested = [triton_aio.InferRequestedOutput(name) for name in ("masks", "classes")]
            result = await aio_client.infer("animals", [image_input(png)], outputs=requested, parameters=PARAMS)
            return card, result

    card, result = asyncio.run(ask())
    assert card["name"] == "animals"
    assert [o.name for o in result.get_response().outputs] == ["masks", "classes"]
    masks, classes = result.as_numpy("masks"), result.as_numpy("classes")
    assert masks.dtype == np.uint8 and masks.shape == (len(http["instances"]), 96, 128)
    for mask, want in zip(masks, http["instances"]):
        seg = want["segmentation"]
        assert np.array_equal(mask, mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()}))
    assert classes.tolist() == [i["category_id"] for i in http["instances"]]


def test_refusals(server, client):
    png = encode(scene(96, 128))
    code, message = status_of(lambda: client.infer("shapes", [image_input(b"not an image at all")]))
    assert code == "INVALID_ARGUMENT", message
    code, message = status_of(lambda: client.infer("zebras", [image_input(png)]))
    assert code == "NOT_FOUND" and "zebras" in message
    code, message = status_of(lambda: client.infer("shapes", [image_input(png)], parameters={"max_detections": -1}))
    assert code == "INVALID_ARGUMENT" and "max_detections" in message
    code, message = status_of(lambda: client.infer("shapes", [image_input(png)], parameters={"colour": "red"}))
    assert code == "INVALID_ARGUMENT" and "colour" in message
    # Messages quote what was sent, within bounds.
    code, message = status_of(lambda: client.infer("shapes", [image_input(png)], parameters={"x" * 20_000: 1}))
    assert code == "INVALID_ARGUMENT" and 2000 < len(message) < 2100 and "more characters" in message
    wrong = triton.InferInput("image", [1], "FP32")
    wrong.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    assert status_of(lambda: client.infer("shapes", [wrong]))[0] == "INVALID_ARGUMENT"
    # Over grpc_max_message_bytes: refused by gRPC itself, before the request is parsed.
    huge = np.random.default_rng(0).bytes(MESSAGE_LIMIT + 1024)
    code, message = status_of(lambda: client.infer("shapes", [image_input(huge)]))
    assert code == "RESOURCE_EXHAUSTED", message
    # The client's own deadline, far shorter than any inference.
    code, _ = status_of(lambda: client.infer("shapes", [image_input(png)], client_timeout=0.001))
    assert code == "DEADLINE_EXCEEDED"
    assert metric(server.url, "transfiner_grpc_requests_total", method="ModelInfer", code="INVALID_ARGUMENT") >= 3


def test_the_key_the_server_deadline_and_raw_bytes(checkpoint):
    """With a key: metadata and inference need it, liveness and health do not. The server's
    deadline is the call's, capped by max_request_timeout_s (here far too short to decode)."""
    settings = ServiceSettings(
        model=str(checkpoint), device="cpu", api_key=KEY, request_timeout_s=0.001, max_request_timeout_s=0.001
    )
    with running(settings, grpc=True) as server:
        client = triton.InferenceServerClient(server.grpc_target)
        png = encode(scene(96, 128))
        assert client.is_server_live() and client.is_server_ready()
        for call in (
            lambda: client.get_model_metadata("default"),
            lambda: client.is_model_ready("default"),
            lambda: client.infer("default", [image_input(png)]),
            lambda: client.infer("default", [image_input(png)], headers={"x-api-key": "wrong"}),
        ):
            assert status_of(call)[0] == "UNAUTHENTICATED"
        assert client.get_model_metadata("default", headers={"x-api-key": KEY}, as_json=True)["name"] == "default"
        assert client.is_model_ready("default", headers={"authorization": f"Bearer {KEY}"})
        with grpc.insecure_channel(server.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # The server's own deadline (its message, not the client's "Deadline Exceeded"), on a
            # request built by hand with BYTES as raw contents (4-byte little-endian length first).
            request = pb.ModelInferRequest(model_name="default")
            request.inputs.add(name="image", datatype="BYTES", shape=[1])
            request.raw_input_contents.append(len(png).to_bytes(4, "little") + png)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as late:
                stub.ModelInfer(request, metadata=[("x-api-key", KEY)], timeout=60)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "deadline passed" in late.value.details()
            request.raw_input_contents[0] = len(png).to_bytes(4, "little") + png[:-1]  # one byte short
            with pytest.raises(grpc.RpcError) as short:
                stub.ModelInfer(request, metadata=[("x-api-key", KEY)])
            assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert metric(server.url, "transfiner_rejections_total", reason="unauthorized") == 4
        assert metric(server.url, "transfiner_rejections_total", reason="deadline") == 1


def test_a_cancelled_call_drops_its_job(checkpoint):
    """A job waits for batch-mates (max_delay_ms) long enough to be cancelled before its batch
    goes: it never reaches the model, and its place is given back."""
    settings = ServiceSettings(model=str(checkpoint), device="cpu", max_batch_size=4, max_delay_ms=10_000)
    with running(settings, grpc=True) as server:
        png = encode(scene(96, 128))

        async def cancel_while_queued() -> None:
            async with triton_aio.InferenceServerClient(server.grpc_target) as aio_client:
                call = asyncio.ensure_future(aio_client.infer("default", [image_input(png)]))
                await asyncio.to_thread(
                    wait_for,
                    lambda: metric(server.url, "transfiner_inflight_requests", model="default") == 1,
                    what="the call admitted",
                )
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call

        asyncio.run(cancel_while_queued())
        wait_for(
            lambda: metric(server.url, "transfiner_rejections_total", reason="client_disconnected") == 1,
            what="the job dropped",
        )
        wait_for(lambda: metric(server.url, "transfiner_inflight_requests", model="default") == 0, what="place freed")
        assert metric(server.url, "transfiner_grpc_requests_total", method="ModelInfer", code="CANCELLED") == 1
        assert metric(server.url, "transfiner_batch_size_count", model="default") == 0  # never reached the model


def test_draining_is_unavailable_with_a_retry_hint_and_not_serving(checkpoint):
    with running(ServiceSettings(model=str(checkpoint), device="cpu"), grpc=True) as server:
        png = encode(scene(96, 128))
        with grpc.insecure_channel(server.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", "inference.GRPCInferenceService"):
                status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
                assert status == health_pb2.HealthCheckResponse.SERVING
            in_server_loop(server, server.runtime.begin_drain)
            wait_for(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                what="NOT_SERVING",
            )
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert not stub.ServerReady(pb.ServerReadyRequest()).ready
            assert stub.ServerLive(pb.ServerLiveRequest()).live
            request = pb.ModelInferRequest(model_name="default")
            request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(png)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ("retry-after", "5") in tuple(refused.value.trailing_metadata())


def test_reflection_lists_and_describes_the_services(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests)))
    names = {service.name for service in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    proto = descriptor_pb2.FileDescriptorProto.FromString(described.file_descriptor_response.file_descriptor_proto[0])
    assert proto.package == "inference"
    methods = [method.name for method in proto.service[0].method]
    assert methods == ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]


def test_bench_sends_the_workload_as_grpc_calls(checkpoint, tmp_path, capsys):
    """``transfiner bench --protocol v2-grpc``: the images go to ModelInfer on the gRPC port, and
    the server's figures are those of its gRPC calls."""
    from transfiner.cli.main import main
    from transfiner.model.datasets.shapes import make_shapes

    make_shapes(tmp_path / "shapes", 3, seed=0, size=(96, 96))
    settings = ServiceSettings(model=str(checkpoint), device="cpu", max_batch_size=4, max_delay_ms=20)
    with running(settings, grpc=True) as server:
        out = tmp_path / "bench"
        args = ["bench", "--url", server.url, "--grpc-target", server.grpc_target, "--protocol", "v2-grpc"]
        args += ["--concurrency", "2", "--requests", "4", "--warmup", "1", "--images", str(tmp_path / "shapes/images")]
        args += ["--param", "score_threshold=0.3", "--out", str(out)]
        assert main(args) == 0, capsys.readouterr().err
        # Warm-up, test request and the step, all of them gRPC calls.
        assert metric(server.url, "transfiner_grpc_requests_total", method="ModelInfer", code="OK") == 1 + 1 + 4
        capsys.readouterr()
        # A refused test request stops the bench with the status the service gives it over REST,
        # and the gRPC code and message.
        assert main([*args, "--param", "max_detections=-1"]) == 2
        assert "400 INVALID_ARGUMENT" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["workload"]["protocol"] == "v2-grpc" and report["target"]["model"] == "default"
    assert f"--protocol v2-grpc --grpc-target {server.grpc_target}" in report["command"]
    (step,) = report["steps"]
    assert step["requests"] == step["ok"] == 4 and step["errors"] == {}
    assert step["server"]["responses_by_status"] == {"OK": 4} and step["server"]["segment_requests"] == 4
    assert step["server"]["request"]["count"] == 4 and step["server"]["decode"]["count"] == 4
