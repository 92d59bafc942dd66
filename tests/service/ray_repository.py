"""The model repository on the Ray engine (no tests here), run as ``python -m
tests.service.ray_repository WORKDIR REPOSITORY IMAGE`` inside a loopback-only network namespace
(see tests/service/ray_cluster.py for why).

It runs ``transfiner serve --engine ray --model-repository REPOSITORY`` on a Ray instance of its
own, one replica, and asks it through Ray's proxy what a client of the FastAPI engine would: the
models, the index, a segment request per model (and one to the default model, one to an unknown
model), and the same image per model over the Open Inference Protocol's REST routes. It records
the answers in WORKDIR/report.json; the test asserts on them."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.service.ray_cluster import _wait_ready
from transfiner.service.loadtest.servers import SERVE_COMMAND, free_port


def main(workdir: Path, repository: Path, image: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (workdir / "serve.log").open("w")
    command = [*SERVE_COMMAND, "--engine", "ray", "--port", str(port), "--model-repository", str(repository)]
    command += ["--default-model", "shapes", "--device", "cpu", "--max-batch-size", "2", "--log-level", "warning"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    report: dict = {}
    try:
        report["ready"] = _wait_ready(server, url)
        report["models"] = httpx.get(url + "/v1/models", timeout=10).json()
        report["index"] = httpx.get(url + "/v1/repository/index", timeout=10).json()
        data = image.read_bytes()
        answers = {}
        for path in ("/v1/models/animals/segment", "/v1/models/shapes/versions/1/segment", "/v1/segment"):
            response = httpx.post(url + path, content=data, params={"score_threshold": "0"}, timeout=60)
            answers[path] = {"status": response.status_code, "body": response.json()}
        unknown = httpx.post(url + "/v1/models/zebras/segment", content=data, timeout=60)
        answers["unknown"] = {"status": unknown.status_code, "body": unknown.json()}
        report["answers"] = answers
        request = {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}],
            "parameters": {"score_threshold": 0},
        }
        report["v2"] = {}
        for name in ("animals", "shapes"):
            response = httpx.post(f"{url}/v2/models/{name}/infer", json=request, timeout=60)
            report["v2"][name] = {"status": response.status_code, "body": response.json()}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            report["exit"] = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            report["exit"] = "timeout"
        (workdir / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
