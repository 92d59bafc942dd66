"""JSON logs: a ``transfiner serve --log-format json`` process writes nothing but JSON lines, its
request lines carry the request's ids, route, status, client, model and times, and uvicorn's
access and error logs come in the same format; the text format stays as it was."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone

import grpc
import httpx
import pytest
from uvicorn.config import LOGGING_CONFIG

from tests.service.otlp_receiver import OtlpReceiver
from tests.service.support import free_port, wait_ready
from tests.support import REPO, encode, scene
from transfiner.service.grpc import inference_pb2 as pb
from transfiner.service.grpc import inference_pb2_grpc as pb_grpc
from transfiner.service.loadtest.servers import SERVE_COMMAND
from transfiner.service.server import uvicorn_config
from transfiner.service.settings import ServiceSettings
from transfiner.service.telemetry.logs import JsonFormatter

pytestmark = pytest.mark.timeout(300)
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def test_the_log_format_is_a_setting_and_a_flag_and_text_keeps_uvicorns_own(monkeypatch):
    from transfiner.cli.main import build_parser
    from transfiner.cli.serve import settings_from_args

    assert ServiceSettings().log_format == "text"
    assert settings_from_args(build_parser().parse_args(["serve", "--log-format", "json"])).log_format == "json"
    monkeypatch.setenv("TRANSFINER_LOG_FORMAT", "json")
    assert ServiceSettings().log_format == "json"
    with pytest.raises(ValueError):
        ServiceSettings(log_format="xml")
    assert uvicorn_config(None, ServiceSettings(log_format="text")).log_config == LOGGING_CONFIG


def test_a_json_line_escapes_what_it_holds_and_keeps_the_traceback():
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record = logging.LogRecord("service", logging.ERROR, __file__, 1, 'said "%s"', ("x",), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == ("ERROR", "service", 'said "x"')
    assert "RuntimeError: boom" in entry["exception"]


def test_a_json_logging_server_writes_only_json_lines_with_the_requests_facts(checkpoint, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with OtlpReceiver() as receiver:  # traces on, so that request lines carry their trace id
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, TRANSFINER_TORCH_THREADS="1")
        command = [*SERVE_COMMAND, "--model", str(checkpoint), "--device", "cpu", "--port", str(port)]
        grpc_port = free_port()
        command += ["--log-format", "json", "--log-level", "info", "--grpc-port", str(grpc_port)]
        with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, cwd=REPO)
        try:
            wait_ready(url, timeout=120)
            png = encode(scene())
            given = httpx.post(
                url + "/v1/segment",
                content=png,
                headers={"X-Request-Id": "order-42/a", "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
                timeout=60,
            )
            made = httpx.post(url + "/v1/segment", content=png, headers={"X-Request-Id": "no spaces please"})
            refused = httpx.post(url + "/v1/segment?score_threshold=2", content=png, timeout=60)
            request = pb.ModelInferRequest(model_name="default")
            request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(png)
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                _, call = stub.ModelInfer.with_call(request, metadata=(("x-request-id", "grpc-7"),), timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    lines = (tmp_path / "stderr").read_text().splitlines() + (tmp_path / "stdout").read_text().splitlines()
    assert code == 0, lines
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    for entry in entries:
        moment = datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
        assert entry["time"].endswith("Z") and moment.utcoffset() == timezone.utc.utcoffset(None)

    assert given.status_code == 200 and given.headers["x-request-id"] == "order-42/a"
    assert given.headers["x-trace-id"] == TRACE_ID
    requests = [e for e in entries if e["logger"] == "service.request" and e["route"] == "/v1/segment"]
    line = next(e for e in requests if e["request_id"] == "order-42/a")
    model = given.json()["model"]
    assert (line["model"], line["version"]) == ("default", model["version"])
    assert (line["method"], line["status"], line["client"], line["trace_id"]) == ("POST", 200, "127.0.0.1", TRACE_ID)
    timing = given.json()["timing"]
    for name in ("queue_ms", "inference_ms", "postprocess_ms"):
        assert line[name] == timing[name]
    assert line["total_ms"] >= timing["total_ms"] > 0

    assert made.status_code == 200
    generated = made.headers["x-request-id"]
    assert generated != "no spaces please" and len(generated) == 32
    assert any(e["request_id"] == generated and e["status"] == 200 for e in requests)

    assert refused.status_code == 422
    line = next(e for e in requests if e["request_id"] == refused.headers["x-request-id"])
    assert line["status"] == 422 and "model" not in line  # refused before a model was chosen
    access = [e for e in entries if e["logger"] == "uvicorn.access" and e["path"].startswith("/v1/segment")]
    assert sorted(e["status"] for e in access) == [200, 200, 422]
    assert any(e["logger"] == "uvicorn.error" and e["message"].startswith("Started server") for e in entries)
    # A gRPC call: the same request line, its id given back in the initial metadata.
    assert dict(call.initial_metadata())["x-request-id"] == "grpc-7"
    line = next(e for e in entries if e.get("request_id") == "grpc-7")
    assert (line["route"], line["status"], line["client"]) == (
        "inference.GRPCInferenceService/ModelInfer",
        "OK",
        "127.0.0.1",
    )
    assert (line["model"], line["version"]) == ("default", model["version"]) and len(line["trace_id"]) == 32
    assert any(e["logger"] == "service" and e["message"].startswith("ready") for e in entries)
