"""Traces: the request's server span a child of its ``traceparent``, the stage spans its children,
``X-Trace-Id`` on every answer; exported over OTLP/HTTP by a ``transfiner serve`` process; off
(no provider, no header) unless the ``OTEL_*`` variables ask for it."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time

import grpc
import httpx
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.service.otlp_receiver import OtlpReceiver
from tests.service.support import ThreadServer, free_port, running, wait_ready
from tests.support import REPO, encode, scene
from transfiner.service.grpc import inference_pb2 as pb
from transfiner.service.grpc import inference_pb2_grpc as pb_grpc
from transfiner.service.loadtest.servers import SERVE_COMMAND
from transfiner.service.settings import ServiceSettings
from transfiner.service.telemetry.tracing import STAGES, tracer_provider_from_env

pytestmark = pytest.mark.timeout(300)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
ROUTE = "/v1/models/{name}/segment"
OTEL_VARIABLES = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME")
OTEL_VARIABLES += ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_PROTOCOL")


@pytest.fixture
def no_otel(monkeypatch):
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(scope="module")
def traced(checkpoint):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "transfiner-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = ServiceSettings(model=str(checkpoint), device="cpu", max_batch_size=4, max_delay_ms=20)
    server = ThreadServer(settings, grpc=True, tracer_provider=provider)

    @server.app.get("/boom")  # fault injection: no route fails this way on purpose
    async def boom() -> None:
        raise RuntimeError("injected")

    server.start()
    yield server, exporter
    server.stop()
    provider.shutdown()


def server_span(exporter: InMemorySpanExporter, trace_id: str, timeout: float = 30.0):
    """The finished server span of trace ``trace_id`` (it ends once the answer has been sent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for span in exporter.get_finished_spans():
            if span.kind == SpanKind.SERVER and format(span.context.trace_id, "032x") == trace_id:
                return span
        time.sleep(0.01)
    raise AssertionError(f"no server span of trace {trace_id}")


def test_a_request_is_one_server_span_under_its_traceparent_with_a_span_per_stage(traced):
    server, exporter = traced
    png = encode(scene())
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=1"}
    answer = httpx.post(f"{server.url}/v1/models/default/segment", content=png, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-trace-id"] == TRACE_ID

    root = server_span(exporter, TRACE_ID)
    assert root.name == f"POST {ROUTE}"
    assert root.parent is not None and root.parent.is_remote
    assert format(root.parent.span_id, "016x") == PARENT_ID
    assert root.context.trace_state.get("vendor") == "1"
    assert root.attributes["http.route"] == ROUTE
    assert root.attributes["http.request.method"] == "POST"
    assert root.attributes["http.response.status_code"] == 200
    model = answer.json()["model"]
    assert root.attributes["transfiner.model.name"] == model["name"] == "default"
    assert root.attributes["transfiner.model.version"] == model["version"]
    assert root.status.status_code == StatusCode.UNSET

    children = sorted(
        (s for s in exporter.get_finished_spans() if s.parent is not None and s.parent.span_id == root.context.span_id),
        key=lambda s: s.start_time,
    )
    assert [s.name for s in children] == list(STAGES)
    assert all(s.context.trace_id == root.context.trace_id for s in children)
    # In time order, one after the other, inside the request's span. Some stage times are
    # monotonic readings turned into wall-clock ones, which reads both clocks: a thread switch
    # between the two reads shifts the result, hence the leeway (ns).
    leeway = 10_000_000
    assert root.start_time <= children[0].start_time + leeway
    for before, after in zip(children, children[1:]):
        assert before.start_time <= before.end_time <= after.start_time + leeway, (before.name, after.name)
    assert children[-1].end_time <= root.end_time + leeway

    forward = children[STAGES.index("forward")].attributes
    assert forward["transfiner.batch.size"] == 1
    assert forward["transfiner.model.name"] == "default" and forward["transfiner.model.version"] == model["version"]
    assert (forward["transfiner.model.backend"], forward["transfiner.device"]) == (model["backend"], "cpu")
    assert forward["transfiner.model.precision"] == model["precision"]
    assert forward["transfiner.inference_ms"] > 0
    decode = children[STAGES.index("decode")].attributes
    assert (decode["transfiner.image.width"], decode["transfiner.image.height"]) == (128, 96)


def test_a_request_without_traceparent_starts_a_trace_and_errors_carry_their_trace_id(traced):
    server, exporter = traced
    answer = httpx.post(f"{server.url}/v1/segment", content=encode(scene()), timeout=60)
    assert answer.status_code == 200
    trace_id = answer.headers["x-trace-id"]
    assert len(trace_id) == 32 and trace_id != TRACE_ID and int(trace_id, 16) != 0
    root = server_span(exporter, trace_id)
    assert root.parent is None and root.name == "POST /v1/segment"

    # Refused before the model: the span says so, the answer names the trace.
    missing = httpx.post(f"{server.url}/v1/models/nope/segment", content=encode(scene()), timeout=60)
    assert missing.status_code == 404
    root = server_span(exporter, missing.headers["x-trace-id"])
    assert root.name == f"POST {ROUTE}" and root.attributes["http.response.status_code"] == 404
    stages = [s.name for s in exporter.get_finished_spans() if s.parent and s.parent.span_id == root.context.span_id]
    assert stages == ["receive"]  # never admitted: no model stage ran
    # A malformed traceparent is ignored: a new trace.
    bad = httpx.post(f"{server.url}/v1/segment", content=b"not an image", headers={"traceparent": "00-zz-01"})
    assert bad.status_code in (415, 422) and len(bad.headers["x-trace-id"]) == 32
    root = server_span(exporter, bad.headers["x-trace-id"])
    assert root.parent is None
    stages = [s for s in exporter.get_finished_spans() if s.parent and s.parent.span_id == root.context.span_id]
    assert sorted(s.name for s in stages) == ["decode", "receive"]  # the upload that did not decode, timed
    assert next(s for s in stages if s.name == "decode").attributes["transfiner.image.bytes"] == 12


def test_an_unexpected_error_is_an_error_span_and_its_answer_names_the_trace(traced):
    server, exporter = traced
    trace_id = "5" * 32
    answer = httpx.get(f"{server.url}/boom", headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"})
    assert answer.status_code == 500 and answer.headers["x-trace-id"] == trace_id
    assert len(answer.headers["x-request-id"]) == 32
    root = server_span(exporter, trace_id)
    assert root.name == "GET /boom" and root.status.status_code == StatusCode.ERROR
    assert [event.name for event in root.events] == ["exception"]


def test_probes_and_scrapes_are_not_traced(traced):
    server, exporter = traced
    for path in ("/health/live", "/health/ready", "/metrics"):
        answer = httpx.get(server.url + path)
        assert answer.status_code == 200 and "x-trace-id" not in answer.headers
        assert "x-request-id" in answer.headers
    assert httpx.get(server.url + "/v1/models").headers["x-trace-id"]


def test_tracing_is_off_unless_the_environment_asks(checkpoint, no_otel):
    assert tracer_provider_from_env() is None
    no_otel.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracer_provider_from_env() is None
    no_otel.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="zipkin"):
        tracer_provider_from_env()
    no_otel.delenv("OTEL_TRACES_EXPORTER")
    no_otel.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    provider = tracer_provider_from_env()  # an endpoint alone turns OTLP on
    assert provider.resource.attributes["service.name"] == "transfiner"
    provider.shutdown()
    no_otel.setenv("OTEL_SERVICE_NAME", "segmenter")
    provider = tracer_provider_from_env()
    assert provider.resource.attributes["service.name"] == "segmenter"
    provider.shutdown()
    no_otel.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ValueError, match="http/protobuf"):
        tracer_provider_from_env()
    no_otel.setenv("OTEL_SDK_DISABLED", "true")
    assert tracer_provider_from_env() is None

    for name in OTEL_VARIABLES:
        no_otel.delenv(name, raising=False)
    settings = ServiceSettings(model=str(checkpoint), device="cpu")
    with running(settings) as server:
        assert not server.runtime.tracing.enabled
        answer = httpx.post(f"{server.url}/v1/segment", content=encode(scene()), timeout=60)
        assert answer.status_code == 200
        assert "x-trace-id" not in answer.headers
        assert len(answer.headers["x-request-id"]) == 32  # request ids are not tracing's


def test_a_serve_process_exports_its_spans_over_otlp_http(checkpoint, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with OtlpReceiver() as receiver:
        env = {k: v for k, v in os.environ.items() if k not in OTEL_VARIABLES}
        env.update(
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
            TRANSFINER_TORCH_THREADS="1",
        )
        command = [*SERVE_COMMAND, "--model", str(checkpoint), "--device", "cpu", "--port", str(port)]
        with open(tmp_path / "serve.log", "w") as log:
            proc = subprocess.Popen([*command, "--log-level", "warning"], env=env, stdout=log, stderr=log, cwd=REPO)
        try:
            wait_ready(url, timeout=120)
            headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
            answer = httpx.post(url + "/v1/segment", content=encode(scene()), headers=headers, timeout=60)
            assert answer.status_code == 200 and answer.headers["x-trace-id"] == TRACE_ID
        finally:
            proc.send_signal(signal.SIGTERM)  # the app's shutdown exports what its batch still holds
            assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()

        spans = receiver.wait_for(lambda found: any(s.name == "encode" for _, s in found), timeout=10)
    ours = [(resource, span) for resource, span in spans if span.trace_id.hex() == TRACE_ID]
    names = sorted(span.name for _, span in ours)
    assert names == sorted(["POST /v1/segment", *STAGES]), names
    resource = ours[0][0]
    assert resource["service.name"] == "transfiner" and resource["deployment.environment"] == "test"
    root = next(span for _, span in ours if span.name == "POST /v1/segment")
    assert root.parent_span_id.hex() == PARENT_ID
    assert all(span.parent_span_id == root.span_id for _, span in ours if span.name in STAGES)


def test_ray_replicas_get_the_drivers_otel_variables(no_otel):
    """A replica on another node does not inherit the driver's environment: the ``OTEL_*``
    variables travel in the deployment's ``runtime_env``, and nothing else does."""
    from transfiner.service.ray_serve import Scaling, build_application

    assert "runtime_env" not in build_application(ServiceSettings(), Scaling())._bound_deployment.ray_actor_options
    no_otel.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    no_otel.setenv("OTEL_SERVICE_NAME", "segmenter")
    no_otel.setenv("TRANSFINER_NOT_OTEL", "1")
    options = build_application(ServiceSettings(), Scaling())._bound_deployment.ray_actor_options
    assert options["runtime_env"] == {
        "env_vars": {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "segmenter"}
    }


def test_an_open_inference_protocol_request_has_the_same_stage_spans(traced):
    server, exporter = traced
    body = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(encode(scene())).decode()]}
        ]
    }
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    headers = {"traceparent": f"00-{trace_id}-{PARENT_ID}-01"}
    answer = httpx.post(f"{server.url}/v2/models/default/infer", json=body, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-trace-id"] == trace_id
    root = server_span(exporter, trace_id)
    assert root.name == "POST /v2/models/{name}/infer" and format(root.parent.span_id, "016x") == PARENT_ID
    assert root.attributes["transfiner.model.name"] == answer.json()["model_name"] == "default"
    children = sorted(
        (s for s in exporter.get_finished_spans() if s.parent is not None and s.parent.span_id == root.context.span_id),
        key=lambda s: s.start_time,
    )
    assert [s.name for s in children] == list(STAGES)


def test_a_grpc_call_is_traced_under_its_traceparent_metadata_with_the_same_stages(traced):
    server, exporter = traced
    trace_id = "5b8efff798038103d269b633813fc60c"
    request = pb.ModelInferRequest(model_name="default")
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(encode(scene()))
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = (("traceparent", f"00-{trace_id}-{PARENT_ID}-01"),)
        _, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=60)
    assert dict(call.initial_metadata())["x-trace-id"] == trace_id
    root = server_span(exporter, trace_id)
    assert root.name == "inference.GRPCInferenceService/ModelInfer"
    assert format(root.parent.span_id, "016x") == PARENT_ID
    assert root.attributes["transfiner.model.name"] == "default"
    children = sorted(
        (s for s in exporter.get_finished_spans() if s.parent is not None and s.parent.span_id == root.context.span_id),
        key=lambda s: s.start_time,
    )
    assert [s.name for s in children] == list(STAGES)
