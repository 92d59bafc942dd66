"""docker-compose.yml's topology on loopback, without a Docker engine: two replicas run from the
CPU image (buildah, tests/deploy/containers.py), nginx (Debian package) in front of them configured from
docker/nginx.conf.template, and Prometheus (Debian package) scraping both with the `transfiner`
job of docker/prometheus.yml. Traffic goes through nginx; Prometheus's query API must then show
request series from both replicas, and every dashboard query must evaluate.

Without nginx or prometheus installed the test is skipped, unless TRANSFINER_REQUIRE_TOPOLOGY=1
(.ci/run installs both and sets it), which turns the skip into a failure.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.containers import Container, built_image
from tests.deploy.support import (
    PROMETHEUS_CONFIG,
    REPO,
    SERVICE,
    dashboard_queries,
    grafana_to_promql,
    load_compose,
    missing_tool,
    render_nginx_template,
    wait_http,
)
from tests.service.support import free_port
from tests.support import encode, scene

REQUESTS = 6  # through nginx; round robin gives each replica three


def _nginx_main_config(workdir: Path, server_config: Path) -> str:
    """The main nginx.conf around the rendered template (what the nginx image's own nginx.conf is):
    every path inside ``workdir``, in the foreground, one process (master_process off), so nginx
    runs the same as root or not and never needs /var/log/nginx or /var/lib/nginx."""
    temp = {name: workdir / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir()
    return f"""
daemon off;
master_process off;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
    access_log {workdir / "access.log"};
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {server_config};
}}
"""


def _prometheus_config(targets: list[str]) -> dict:
    """docker/prometheus.yml's `transfiner` job as it is, with its DNS discovery swapped for the two
    loopback replicas and a one-second scrape interval (the test should not wait 15 s)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == SERVICE]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": targets}]
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["scrape_configs"] = [job]
    return config


class Topology:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[subprocess.Popen] = []
        self.replicas: list[tuple[int, Container]] = []
        self.replica_ports: list[int] = []

    def start(self, name: str, command: list[str], **kwargs) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs
            )
        self.processes.append(process)
        return process, log

    def stop(self) -> None:
        # SIGTERM: replicas drain (nothing is in flight by now), nginx and Prometheus shut down fast.
        for port, container in self.replicas:
            container.stop(port)
            container.remove()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _nginx_binary() -> str:
    # Debian puts nginx in /usr/sbin, which a non-root user's PATH often lacks.
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if nginx is None:
        missing_tool("nginx (Debian package nginx)")
    return nginx


def _start_nginx(topo: Topology, nginx: str, **variables: str) -> tuple[subprocess.Popen, Path]:
    """nginx from docker/nginx.conf.template with compose's NGINX_* values, ``variables`` replacing
    some, checked with ``nginx -t`` first."""
    values = {key: str(value) for key, value in load_compose()["services"]["nginx"]["environment"].items()}
    values.update(variables)
    server_config = topo.workdir / "default.conf"
    server_config.write_text(render_nginx_template(values))
    main_config = topo.workdir / "nginx.conf"
    main_config.write_text(_nginx_main_config(topo.workdir, server_config))
    error_log = str(topo.workdir / "error.log")
    check = subprocess.run([nginx, "-t", "-q", "-e", error_log, "-c", str(main_config)], capture_output=True, text=True)
    assert check.returncode == 0, f"nginx rejects the rendered template:\n{check.stderr}\n{server_config.read_text()}"
    return topo.start("nginx", [nginx, "-e", error_log, "-c", str(main_config)])


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    nginx = _nginx_binary()
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        missing_tool("prometheus (Debian package prometheus)")

    workdir = tmp_path_factory.mktemp("topology")
    topo = Topology(workdir)
    try:
        # Two replicas: containers of the CPU image as built from docker/Dockerfile.cpu, with the
        # compose service's environment (what `docker compose up` passes them). Here they share the
        # host's network: each its own loopback port instead of 0.0.0.0:8000, and one torch thread
        # each, since the CPU is shared.
        image = built_image("cpu")
        environment = {
            key: str(value)
            for key, value in load_compose()["services"][SERVICE]["environment"].items()
            if value is not None
        }
        for index in range(2):
            port = free_port()
            env = dict(
                environment,
                TRANSFINER_HOST="127.0.0.1",
                TRANSFINER_PORT=str(port),
                TRANSFINER_GRPC_PORT=str(free_port()),  # 8001 for both would clash on one network
                TRANSFINER_TORCH_THREADS="1",
                TRANSFINER_MAX_CLIENT_INFLIGHT="1",
            )
            topo.replicas.append((port, Container(image.tag, workdir / f"replica{index}.log", env)))
            topo.replica_ports.append(port)

        # nginx from the compose template; only the upstream servers, port and resolver differ.
        topo.nginx_port = free_port()
        nginx_process, nginx_log = _start_nginx(
            topo,
            nginx,
            NGINX_PORT=f"127.0.0.1:{topo.nginx_port}",
            NGINX_RESOLVER="127.0.0.1",  # nothing is resolved: the servers are addresses
            NGINX_UPSTREAM_SERVERS=" ".join(f"server 127.0.0.1:{p} max_fails=0;" for p in topo.replica_ports),
        )

        # Prometheus with the compose job, its own storage and port; not the packaged daemon.
        topo.prometheus_port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(_prometheus_config([f"127.0.0.1:{p}" for p in topo.replica_ports])))
        prometheus_process, prometheus_log = topo.start(
            "prometheus",
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{topo.prometheus_port}",
                "--log.level=warn",
            ],
        )

        topo.nginx_url = f"http://127.0.0.1:{topo.nginx_port}"
        topo.prometheus_url = f"http://127.0.0.1:{topo.prometheus_port}"
        wait_http(topo.nginx_url + "/nginx-health", 30, nginx_process, nginx_log)
        wait_http(topo.prometheus_url + "/-/ready", 30, prometheus_process, prometheus_log)
        for port, container in topo.replicas:
            container.wait_ready(f"http://127.0.0.1:{port}", timeout=180)
        yield topo
    finally:
        topo.stop()


def _query(topo: Topology, promql: str) -> list[dict]:
    response = httpx.get(topo.prometheus_url + "/api/v1/query", params={"query": promql}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (promql, body)
    return body["data"]["result"]


@pytest.mark.slow  # two replica containers, nginx and Prometheus
@pytest.mark.container
def test_requests_through_nginx_reach_both_replicas_and_prometheus_sees_both(topology):
    png = encode(scene(96, 96))
    with httpx.Client(base_url=topology.nginx_url, timeout=60) as client:
        for index in range(REQUESTS):
            response = client.post("/v1/segment", content=png, params={"image_id": index})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["image"] == {"width": 96, "height": 96, "image_id": index}
            assert isinstance(body["instances"], list)
        assert client.get("/health/ready").status_code == 200  # readiness answers through nginx too
        assert client.get("/metrics").status_code == 404  # for Prometheus on the inside only
    assert httpx.get(f"http://127.0.0.1:{topology.replica_ports[0]}/metrics").status_code == 200

    # Prometheus scrapes each replica every second: wait until both show the requests they served.
    expected = {f"127.0.0.1:{port}" for port in topology.replica_ports}
    promql = f'transfiner_requests_total{{job="{SERVICE}", route="/v1/segment", method="POST", status="200"}}'
    deadline = time.monotonic() + 30
    while True:
        series = {s["metric"]["instance"]: float(s["value"][1]) for s in _query(topology, promql)}
        if set(series) == expected and sum(series.values()) == REQUESTS:
            break
        assert time.monotonic() < deadline, f"Prometheus shows {series}, wanted both of {expected}"
        time.sleep(0.25)
    assert all(count >= 1 for count in series.values()), series  # nginx balanced the requests
    up = {s["metric"]["instance"]: s["value"][1] for s in _query(topology, f'up{{job="{SERVICE}"}}')}
    assert up == {instance: "1" for instance in expected}


@pytest.mark.slow  # two replica containers, nginx and Prometheus
@pytest.mark.container
def test_a_client_cannot_escape_its_limit_by_naming_itself_in_x_forwarded_for(topology):
    """The replicas allow one request in flight per client (TRANSFINER_MAX_CLIENT_INFLIGHT=1) and
    know clients by the address nginx passes on. Six requests at once from one client, each
    claiming another address: with two replicas, some find their client's place taken (429)."""
    png = encode(scene(96, 96))

    def send(index: int) -> int:
        headers = {"X-Forwarded-For": f"203.0.113.{index}"}
        return httpx.post(topology.nginx_url + "/v1/segment", content=png, headers=headers, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = sorted(pool.map(send, range(6)))
    assert set(statuses) == {200, 429}, statuses


@pytest.mark.slow  # two replica containers, nginx and Prometheus
@pytest.mark.container
def test_every_dashboard_query_evaluates_on_the_real_prometheus(topology):
    """Grafana's panels, with $instance = all and $__rate_interval = 1m: valid PromQL for a real
    Prometheus, and the core panels return data for the replicas (rates need two scrapes after the
    traffic, hence the polling)."""
    core = (
        "Replicas ready",
        "Request rate by replica",
        "Latency (p50 / p95 / p99)",
        "Queue wait (p50 / p95 / p99)",
        "Batch size",
        "Queue depth and in-flight requests",
        "Model",
    )
    deadline = time.monotonic() + 20
    while True:
        by_title: dict[str, list] = {}
        for title, expr in dashboard_queries():
            by_title.setdefault(title, []).extend(_query(topology, grafana_to_promql(expr)))
        empty = [title for title in core if not by_title[title]]
        if not empty:
            break
        assert time.monotonic() < deadline, f"panels show nothing: {empty}"
        time.sleep(0.5)
    per_replica = {s["metric"]["instance"] for s in by_title["Request rate by replica"]}
    assert per_replica == {f"127.0.0.1:{port}" for port in topology.replica_ports}
    assert {s["value"][1] for s in by_title["Replicas ready"]} >= {"2"}  # sum(transfiner_ready), count(up)


@pytest.mark.slow  # two replica containers, nginx and Prometheus
@pytest.mark.container
def test_container_healthcheck_script_reports_readiness(topology):
    script = str(REPO / "docker" / "healthcheck.py")
    env = dict(os.environ, TRANSFINER_PORT=str(topology.replica_ports[0]))
    assert subprocess.run([sys.executable, script], env=env, capture_output=True).returncode == 0
    env["TRANSFINER_PORT"] = str(free_port())  # nothing listens there
    failed = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and "not ready" in failed.stderr


def test_nginx_answers_its_health_check_and_waits_the_proxy_timeout(tmp_path):
    """The template's own health route answers without a replica; NGINX_PROXY_TIMEOUT is how long
    nginx waits for a replica's answer (compose sets it above the service's longest deadline,
    tests/deploy/test_compose.py, so the service's own 504 comes first). Here it is 1 s, in front of an
    upstream that accepts connections and never answers: nginx gives up after 1 s with 504,
    where its built-in default would wait 60 s."""
    nginx = _nginx_binary()
    topo = Topology(tmp_path)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshakes; nothing ever reads or answers
        port = free_port()
        try:
            process, log = _start_nginx(
                topo,
                nginx,
                NGINX_PORT=f"127.0.0.1:{port}",
                NGINX_RESOLVER="127.0.0.1",
                NGINX_PROXY_TIMEOUT="1s",
                NGINX_UPSTREAM_SERVERS=f"server 127.0.0.1:{silent.getsockname()[1]} max_fails=0;",
            )
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/nginx-health", 30, process, log)
            assert httpx.get(url + "/nginx-health").text == "ok\n"
            started = time.monotonic()
            response = httpx.post(url + "/v1/segment", content=b"an image", timeout=30)
            waited = time.monotonic() - started
        finally:
            topo.stop()
    assert response.status_code == 504, response.text
    assert waited > 0.9, waited  # nginx waited the proxy timeout; its default 60 s would outlast the client's 30
