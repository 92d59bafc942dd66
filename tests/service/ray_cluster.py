"""The multi-node Ray Serve scenario of tests/service/test_ray_serve.py (no tests here), run as
``python -m tests.service.ray_cluster WORKDIR CHECKPOINT IMAGE OTHER_IMAGE`` inside a network
namespace that has nothing but loopback, so whatever address Ray binds to, no traffic leaves the machine.

It starts a real two-node Ray cluster (``ray.cluster_utils.Cluster``: a GCS, and a raylet per
node, each node with 1 CPU), runs ``transfiner serve --engine ray --ray-address <the cluster>
--replicas 2`` as a subprocess, and drives it through Ray's HTTP proxy on loopback: readiness,
segment requests, a burst their deadline cannot cover, an invalid one, a replica killed with
SIGKILL, its replacement, SIGTERM. It records what it saw in WORKDIR/report.json; the test
asserts on that (and decodes the RLEs)."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.ray_namespace import wait_for
from transfiner.service.loadtest.servers import SERVE_COMMAND, free_port

REPLICA_CLASS = "ServeReplica:transfiner:transfiner"  # Serve's actor class: ServeReplica:<app>:<deployment>
# Series of Ray's metrics that every node with a replica that served must export.
RAY_METRICS = (
    "ray_serve_deployment_request_counter_total",
    "ray_serve_actual_batch_size_count",
    "ray_serve_batch_wait_time_ms_count",
    "ray_serve_deployment_processing_latency_ms_count",
)


def _replicas() -> list[dict]:
    """The live replica actors, from Ray's state API: id, node, worker pid."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", REPLICA_CLASS), ("state", "=", "ALIVE")], detail=True)
    return sorted(
        ({"actor_id": a.actor_id, "node_id": a.node_id, "pid": a.pid, "name": a.name} for a in actors),
        key=lambda a: a["node_id"],
    )


def _app_running() -> bool:
    from ray import serve

    app = serve.status().applications.get("transfiner")
    return app is not None and app.status == "RUNNING"


def _segment(url: str, image: bytes, headers: dict | None = None) -> dict:
    started = time.monotonic()
    try:
        response = httpx.post(
            f"{url}/v1/segment?score_threshold=0&image_id=7", content=image, headers=headers, timeout=60
        )
    except httpx.TransportError as error:
        return {"status": None, "error": repr(error), "seconds": time.monotonic() - started}
    return {
        "status": response.status_code,
        "replica": response.headers.get("x-transfiner-replica"),
        "retry_after": response.headers.get("retry-after"),
        "body": response.json()
        if response.headers.get("content-type", "").startswith("application/json")
        else response.text,
        "seconds": time.monotonic() - started,
    }


def _burst(url: str, image: bytes, count: int) -> list[dict]:
    return _concurrently(url, [image] * count)


def _concurrently(url: str, images: list[bytes], headers: dict | None = None) -> list[dict]:
    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(lambda data: _segment(url, data, headers), images))


def _start_server(workdir: Path, name: str, address: str, port: int, checkpoint: Path, *flags: str):
    log = (workdir / f"{name}.log").open("w")
    return subprocess.Popen(
        [
            *SERVE_COMMAND,
            "--engine",
            "ray",
            "--ray-address",
            address,
            "--port",
            str(port),
            "--model",
            str(checkpoint),
            "--max-batch-size",
            "4",
            "--log-level",
            "warning",
            *flags,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait_ready(server: subprocess.Popen, url: str) -> bool:
    def ready():
        if server.poll() is not None:
            raise RuntimeError(f"transfiner serve exited with {server.returncode}")
        try:
            return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    return bool(wait_for(ready, 120))


def _stop(server: subprocess.Popen) -> int | str:
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        return "timeout"


def _ray_metrics(nodes: list[dict]) -> dict[str, dict[str, float]]:
    """Per node, the ray_serve_* series its metrics agent exports for our deployment, summed by name."""
    found = {}
    for node in nodes:
        try:
            text = httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=5).text
        except httpx.TransportError:
            text = ""
        series: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("ray_serve_") and 'deployment="transfiner"' in line:
                name, value = line.split("{")[0], line.rsplit(" ", 1)[-1]
                series[name] = series.get(name, 0.0) + float(value)
        found[node["NodeID"]] = series
    return found


def _fixed_replicas(
    report: dict,
    workdir: Path,
    address: str,
    checkpoint: Path,
    image: bytes,
    other: bytes,
    mark,
) -> None:
    """Two replicas: placement, requests, the error model, a replica killed and replaced."""
    import ray

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(workdir, "serve-fixed", address, port, checkpoint, "--replicas", "2")
    try:
        report["ready"] = _wait_ready(server, url)
        mark("ready")
        report["live"] = httpx.get(f"{url}/health/live", timeout=5).json()
        report["models"] = httpx.get(f"{url}/v1/models", timeout=5).json()
        # Readiness answers once one replica is up; the application runs once both are.
        report["running"] = bool(wait_for(_app_running, 60, 0.5))
        report["replicas_before"] = _replicas()

        # Concurrent requests, which Serve's router spreads over both replicas (in bursts until
        # both have answered: the proxies learn of new replicas asynchronously).
        report["first"] = []
        for _ in range(5):
            report["first"] += _burst(url, image, 8)
            if len({r["replica"] for r in report["first"]}) >= 2:
                break
        # Two canvases (padded input sizes) arriving together: Serve's batches mix them, a forward
        # pass must not.
        report["mixed"] = _concurrently(url, [image, other] * 4)
        # A burst of 16 requests per replica with a deadline of 3 batch times (the slow end of
        # the batches just answered, as admission judges them): a replica can answer a few in
        # time and must refuse the others up front.
        batches = sorted({r["body"]["timing"]["inference_ms"] for r in report["first"] + report["mixed"]})
        slow_s = batches[math.ceil(0.9 * len(batches)) - 1] / 1000
        report["burst_deadline_s"] = deadline = round(3 * slow_s, 3)
        report["burst"] = _concurrently(url, [image] * 32, headers={"X-Request-Timeout": str(deadline)})
        invalid = httpx.post(f"{url}/v1/segment?score_threshold=2", content=image, timeout=30)
        report["invalid"] = {"status": invalid.status_code, "body": invalid.json()}
        garbage = httpx.post(f"{url}/v1/segment", content=b"not an image", timeout=30)
        report["garbage"] = {"status": garbage.status_code, "body": garbage.json()}
        metrics = httpx.get(f"{url}/metrics", timeout=5)
        report["service_metrics"] = sorted(
            {line.split("{")[0].split(" ")[0] for line in metrics.text.splitlines() if line.startswith("transfiner_")}
        )
        # What the cluster listens on (the namespace has no interface but loopback anyway).
        listening = subprocess.run(["ss", "-Htln"], capture_output=True, text=True).stdout
        report["listeners"] = sorted({line.split()[3] for line in listening.splitlines() if line.strip()})
        mark("served")

        # SIGKILL one replica's worker process, as a crash or the OOM killer would.
        victim = report["replicas_before"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        report["killed"] = victim
        # While Serve replaces it, the other replica answers.
        report["during"] = [_segment(url, image) for _ in range(4)]

        def replaced():
            now = _replicas()
            return now if len(now) == 2 and victim["actor_id"] not in {r["actor_id"] for r in now} else None

        report["replicas_after"] = wait_for(replaced, 90, 0.5)
        report["running_after"] = bool(wait_for(_app_running, 60, 0.5))
        mark("replaced")
        # Bursts until the replacement has answered too (the proxies learn of it asynchronously).
        replacement = {r["name"].rsplit("#", 1)[1] for r in report["replicas_after"] or []} - {
            victim["name"].rsplit("#", 1)[1]
        }
        report["after"] = []
        for _ in range(6):
            report["after"] += _burst(url, image, 8)
            if replacement <= {(r["replica"] or "").split(";")[0] for r in report["after"]}:
                break
        mark("served_again")

        # Ray's own metrics (requests, latency, Serve's batches) on every node's metrics agent;
        # the agents export every few seconds.
        nodes = [n for n in ray.nodes() if n["Alive"]]

        def exported():
            found = _ray_metrics(nodes)
            return found if all(series.get(name, 0) > 0 for series in found.values() for name in RAY_METRICS) else None

        report["ray_metrics"] = wait_for(exported, 60, 1.0) or _ray_metrics(nodes)
        mark("ray_metrics")
    finally:
        report["fixed_exit"] = _stop(server)
    mark("fixed_stopped")


def _autoscaling(report: dict, workdir: Path, address: str, checkpoint: Path, image: bytes, mark) -> None:
    """One replica to start with; under load Serve adds the second, which Ray puts on the other node."""
    import threading

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(
        workdir,
        "serve-autoscaling",
        address,
        port,
        checkpoint,
        "--min-replicas",
        "1",
        "--max-replicas",
        "2",
        "--target-ongoing-requests",
        "1",
        "--upscale-delay-s",
        "1",
    )
    try:
        report["auto_ready"] = _wait_ready(server, url)
        report["auto_replicas_idle"] = _replicas()
        mark("auto_ready")
        stop = threading.Event()
        statuses: list = []

        def client() -> None:
            while not stop.is_set():
                statuses.append(_segment(url, image)["status"])

        clients = [threading.Thread(target=client) for _ in range(6)]
        for thread in clients:
            thread.start()
        try:
            report["auto_replicas_loaded"] = wait_for(
                lambda: (lambda r: r if len(r) == 2 else None)(_replicas()), 90, 1
            )
        finally:
            stop.set()
            for thread in clients:
                thread.join()
        report["auto_statuses"] = statuses
        mark("auto_scaled")
    finally:
        report["auto_exit"] = _stop(server)
    mark("auto_stopped")


def run(workdir: Path, checkpoint: Path, image: bytes, other: bytes) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    report: dict = {"timeline": {}}
    started = time.monotonic()

    def mark(name: str) -> None:
        report["timeline"][name] = round(time.monotonic() - started, 2)

    # Every node's proxy listens on the same loopback port (SO_REUSEPORT) and by default sends
    # requests to replicas on its own node first; which proxy accepts a connection is then up to
    # the kernel. Off, Serve's router (power of two choices) spreads requests over all replicas,
    # so both nodes' replicas are seen answering. Read by the proxies, which inherit it.
    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        report["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        report["node_addresses"] = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
        mark("cluster")
        _fixed_replicas(report, workdir, cluster.address, checkpoint, image, other, mark)
        _autoscaling(report, workdir, cluster.address, checkpoint, image, mark)
    finally:
        ray.shutdown()
        cluster.shutdown()
    mark("done")
    return report


def main() -> None:
    workdir = Path(sys.argv[1])
    report = run(workdir, Path(sys.argv[2]), Path(sys.argv[3]).read_bytes(), Path(sys.argv[4]).read_bytes())
    (workdir / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
