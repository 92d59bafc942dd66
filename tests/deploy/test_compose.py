"""The deployment files, checked without a Docker engine: docker-compose.yml against the Compose
Specification's JSON schema and against everything it refers to (files, ports, health checks,
the service's port and settings), the Prometheus and Grafana configuration against the metrics
the service really exports. The Dockerfiles are in tests/deploy/test_dockerfiles.py;
tests/deploy/test_topology.py runs the same topology with real processes."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.support import (
    COMPOSE_FILE,
    DASHBOARD_DIR,
    DOCKERFILES,
    NGINX_TEMPLATE,
    PROMETHEUS_CONFIG,
    REPO,
    SERVICE,
    dashboard_queries,
    declared_metric_families,
    dockerfile_environment,
    dockerfile_instructions,
    exported_sample_names,
    interpolations,
    load_compose,
    missing_tool,
    nginx_template_variables,
    parse_port,
    registry_metric_families,
    render_nginx_template,
)
from tests.support import DATA
from transfiner.service.server import AFTER_DRAIN_S
from transfiner.service.settings import ServiceSettings

SCHEMA = DATA / "compose_spec" / "compose-spec.json"
REPLICA_SERVICES = (SERVICE, f"{SERVICE}-gpu")


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def _size_bytes(nginx_size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", nginx_size).groups()
    return int(number) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower()]


def _seconds(duration: str) -> float:
    """Compose/nginx durations such as 40s, 1m30s, 310s, 2m."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


# ------------------------------------------------------------------------------------------------
# Compose: the specification, then every reference.


def test_compose_file_is_valid_against_the_compose_specification():
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    # As written (with ${...} strings) and as Compose sees it once the defaults are substituted.
    for document in (load_compose(raw=True), load_compose()):
        errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors, "\n".join(errors)
    # The schema really rejects things (so the check above is not vacuous).
    broken = load_compose()
    broken["services"]["nginx"]["ports"] = 8080
    broken["services"]["nginx"]["healthcheck"]["interval"] = {"seconds": 10}
    assert len(list(validator.iter_errors(broken))) >= 1


def test_every_variable_has_a_default_so_a_plain_compose_up_works():
    for match in interpolations(COMPOSE_FILE.read_text()):
        assert match.group("op") in (":-", "-"), f"{match.group(0)} has no default"
    # Setting a variable changes what Compose sees.
    assert load_compose({"TRANSFINER_REPLICAS": "5"})["services"][SERVICE]["deploy"]["replicas"] == "5"


def test_build_contexts_dockerfiles_and_bind_mounts_exist(compose):
    named_volumes = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        if "build" in service:
            context = REPO / service["build"]["context"]
            assert context.is_dir(), name
            assert (context / service["build"]["dockerfile"]).is_file(), name
        else:
            image = service["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (
                f"{name}: pin the image by tag ({image})"
            )
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert target.startswith("/"), volume
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in named_volumes, f"{name} uses volume {source!r}, not declared at the top level"


def test_published_ports_are_sane(compose):
    services = compose["services"]
    published = []
    for name, service in services.items():
        for spec in service.get("ports", []):
            ip, host, container, proto = parse_port(spec)
            assert proto == "tcp" and host is not None and 1 <= host <= 65535 and 1 <= container <= 65535, spec
            published.append(host)
            if name in ("prometheus", "grafana"):
                assert ip == "127.0.0.1", f"{name} has no authentication worth the name: publish it on loopback"
    assert len(published) == len(set(published)), f"a host port is published twice: {published}"
    # Replicas publish nothing (a fixed host port could not scale); nginx is the way in.
    for name in REPLICA_SERVICES:
        assert "ports" not in services[name] and "container_name" not in services[name], name
    # Each published container port is the one the container listens on.
    nginx = services["nginx"]
    assert [parse_port(p)[2] for p in nginx["ports"]] == [int(nginx["environment"]["NGINX_PORT"])]
    assert [parse_port(p)[2] for p in services["prometheus"]["ports"]] == [9090]  # Prometheus's default
    assert [parse_port(p)[2] for p in services["grafana"]["ports"]] == [3000]  # Grafana's default


def test_long_running_services_have_health_checks_that_match_what_they_serve(compose):
    services = compose["services"]
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL") and not check.get("disable"), name
        for key in ("interval", "timeout"):
            assert _seconds(check[key]) > 0, (name, key)
    # The replicas run the script the images ship, which asks for readiness on TRANSFINER_PORT.
    for name in REPLICA_SERVICES:
        test = services[name]["healthcheck"]["test"]
        assert test[-1] == "/opt/transfiner/healthcheck.py", test
    # (tests/deploy/test_topology.py runs that script against a real replica, ready and not.)
    # The others ask their own port.
    nginx = services["nginx"]
    # (tests/deploy/test_topology.py asks the nginx rendered from the template for /nginx-health.)
    assert f"127.0.0.1:{nginx['environment']['NGINX_PORT']}/nginx-health" in nginx["healthcheck"]["test"][-1]
    assert "127.0.0.1:9090/" in services["prometheus"]["healthcheck"]["test"][-1]
    assert "127.0.0.1:3000/" in services["grafana"]["healthcheck"]["test"][-1]
    # Readiness may take a model load and a warm-up: the replicas get a start period.
    for name in REPLICA_SERVICES:
        assert _seconds(services[name]["healthcheck"]["start_period"]) >= 60, name


def test_service_port_is_the_same_everywhere(compose):
    """TRANSFINER_PORT of the replicas = what they expose = nginx's upstream = Prometheus's target
    = the port the images default to; the gRPC port is exposed and the images' too."""
    services = compose["services"]
    port = int(services[SERVICE]["environment"]["TRANSFINER_PORT"])
    grpc_port = int(services[SERVICE]["environment"]["TRANSFINER_GRPC_PORT"])
    for name in REPLICA_SERVICES:
        assert int(services[name]["environment"]["TRANSFINER_PORT"]) == port
        assert int(services[name]["environment"]["TRANSFINER_GRPC_PORT"]) == grpc_port != port
        assert [int(p) for p in services[name]["expose"]] == [port, grpc_port]
    upstream = services["nginx"]["environment"]["NGINX_UPSTREAM_SERVERS"]
    assert re.fullmatch(rf"server {SERVICE}:{port} resolve( [a-z_]+=\w+)*;", upstream), upstream
    job = _prometheus_job()
    assert [sd["port"] for sd in job["dns_sd_configs"]] == [port]
    for dockerfile in DOCKERFILES:
        assert ("EXPOSE", str(port)) in dockerfile_instructions(dockerfile), dockerfile.name
        assert dockerfile_environment(dockerfile)["TRANSFINER_PORT"] == str(port), dockerfile.name
        assert ("EXPOSE", str(grpc_port)) in dockerfile_instructions(dockerfile), dockerfile.name
        assert dockerfile_environment(dockerfile)["TRANSFINER_GRPC_PORT"] == str(grpc_port), dockerfile.name


def test_every_service_setting_reaches_the_replicas_and_none_is_set_empty(compose):
    """Every ServiceSettings field can be set from the environment of `docker compose`; a key
    without a value passes a variable through only when set (an empty TRANSFINER_API_KEY would
    switch on an empty key)."""
    for name in REPLICA_SERVICES:
        environment = compose["services"][name]["environment"]
        for field in ServiceSettings.model_fields:
            assert f"TRANSFINER_{field.upper()}" in environment, f"{name} does not pass TRANSFINER_{field.upper()}"
        for key, value in environment.items():
            assert value is None or str(value) != "", f"{name}: {key} is set to an empty string"
        assert environment["TRANSFINER_HOST"] == "0.0.0.0"  # reachable from nginx and Prometheus
    # Draining, and uvicorn's wait for the answers being written after it, must end before
    # Docker's SIGKILL.
    settings = ServiceSettings()
    stopping = max(settings.drain_timeout_s, settings.shutdown_grace_s) + AFTER_DRAIN_S
    for name in REPLICA_SERVICES:
        assert _seconds(compose["services"][name]["stop_grace_period"]) > stopping


def test_replicas_scale_and_the_gpu_profile_reserves_gpus(compose):
    services = compose["services"]
    cpu, gpu = services[SERVICE], services[f"{SERVICE}-gpu"]
    assert int(cpu["deploy"]["replicas"]) >= 2 and "profiles" not in cpu
    assert cpu["build"]["dockerfile"].endswith("Dockerfile.cpu")
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"].endswith("Dockerfile.gpu")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    # GPU replicas answer to the CPU service's name, so nginx and Prometheus find them too.
    assert SERVICE in gpu["networks"]["default"]["aliases"]

    # They are told to use the GPU (without one `transfiner serve` exits instead of serving on the
    # CPU), unless TRANSFINER_DEVICE says otherwise; CPU replicas keep the image's `auto`.
    def device(env: dict[str, str], name: str) -> str:
        given = load_compose(env)["services"][name]["environment"].get("TRANSFINER_DEVICE")
        return ServiceSettings(device=given or "auto").device

    assert (device({}, f"{SERVICE}-gpu"), device({}, SERVICE)) == ("cuda", "auto")
    assert device({"TRANSFINER_DEVICE": "cuda:1"}, f"{SERVICE}-gpu") == "cuda:1"
    for name, service in services.items():
        if name not in REPLICA_SERVICES:
            assert "profiles" not in service, f"{name} must run with either profile"


def test_nginx_template_fits_compose_and_the_service_limits(compose):
    environment = compose["services"]["nginx"]["environment"]
    assert nginx_template_variables() == {k for k in environment if k.startswith("NGINX_")}
    rendered = render_nginx_template({k: str(v) for k, v in environment.items()})
    assert "${" not in rendered and "$host" in rendered  # nginx's own variables survive envsubst
    # envsubst would also replace any $NAME the nginx container defines (PATH, HOSTNAME, NGINX_VERSION,
    # ...): nginx's variables are lower case, environment variables upper case, so none may collide.
    template = NGINX_TEMPLATE.read_text()
    bare = set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", template))
    assert all(name.islower() for name in bare), bare
    defaults = ServiceSettings()
    # The service's own 413 (JSON) must be reachable, and so must its longest allowed deadline.
    assert _size_bytes(environment["NGINX_CLIENT_MAX_BODY_SIZE"]) > defaults.max_body_bytes
    # (That nginx waits NGINX_PROXY_TIMEOUT for an answer is tested on a real nginx in test_topology.py.)
    assert _seconds(environment["NGINX_PROXY_TIMEOUT"]) > defaults.max_request_timeout_s
    assert environment["NGINX_RESOLVER"] == "127.0.0.11"  # Docker's embedded DNS
    # nginx lets an idle upstream connection go before the replica would close it.
    upstream = re.search(r"upstream transfiner \{(.*?)\}", rendered, re.S).group(1)
    assert _seconds(re.search(r"keepalive_timeout (\S+);", upstream).group(1)) < defaults.keep_alive_s


# ------------------------------------------------------------------------------------------------
# Prometheus and Grafana.


def _prometheus_job() -> dict:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == SERVICE]
    return job


def test_prometheus_discovers_every_replica_by_dns(compose):
    job = _prometheus_job()
    assert job.get("metrics_path", "/metrics") == "/metrics"
    from transfiner.service.routes.health import router

    assert "/metrics" in {route.path for route in router.routes}
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == [SERVICE] and sd["type"] == "A"
    assert "static_configs" not in job  # a fixed list would miss scaled replicas
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["services"]["prometheus"]["command"]


def test_prometheus_config_passes_promtool():
    """promtool comes with the Debian prometheus package that .ci/run installs."""
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_tool("promtool (Debian package prometheus)")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_is_mounted_where_grafana_reads_it(compose):
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provisioning = REPO / next(s for s, t in mounts.items() if t == "/etc/grafana/provisioning")
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "transfiner.yml").read_text())["providers"]
    dashboards_dir = next(s for s, t in mounts.items() if t == provider["options"]["path"])
    assert (REPO / dashboards_dir).resolve() == DASHBOARD_DIR.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARD_DIR / Path(home).relative_to(provider["options"]["path"])).is_file()
    for path in DASHBOARD_DIR.glob("*.json"):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for item in [panel, *panel.get("targets", [])]:
                assert item["datasource"]["uid"] == datasource["uid"], (path.name, panel["title"])


def test_dashboard_uses_only_metrics_the_service_exports():
    declared = declared_metric_families()
    # The source scan finds everything a real registry holds (it adds the CUDA-only gauges).
    registry = registry_metric_families()
    assert registry.items() <= declared.items(), set(registry.items()) - set(declared.items())
    assert {"transfiner_gpu_utilization_ratio", "transfiner_requests"} <= set(declared)
    exported = exported_sample_names(declared) | {"up"}  # `up` is Prometheus's own, per target
    used = set()
    for title, expr in dashboard_queries():
        names = set(re.findall(r"\b(transfiner_[a-z0-9_]+|up)\b", expr))
        assert names, f"{title}: {expr}"
        assert names <= exported, f"{title}: unknown metrics {names - exported}"
        used |= names
    # What the deployment issue asks the dashboard to show.
    wanted = {
        "request rate": "transfiner_requests_total",
        "latency": "transfiner_request_duration_seconds_bucket",
        "queue wait": "transfiner_queue_wait_seconds_bucket",
        "batch size": "transfiner_batch_size_bucket",
        "queue depth": "transfiner_queue_depth",
        "rejections by reason": "transfiner_rejections_total",
        "instances per image": "transfiner_instances_per_image_bucket",
        "GPU utilisation": "transfiner_gpu_utilization_ratio",
    }
    assert not {topic for topic, name in wanted.items() if name not in used}
    # The route the queries filter on exists.
    from transfiner.service.routes.segment import router

    assert "/v1/segment" in {route.path for route in router.routes}


def _reasons_given_in_code() -> set[str]:
    """Every constant ``reason="..."`` a call in service/ passes (ServiceError, rejections.labels)."""
    reasons = set()
    for path in (REPO / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.keyword) and node.arg == "reason" and isinstance(node.value, ast.Constant):
                reasons.add(node.value.value)
    return reasons


def test_every_rejection_reason_is_a_series_before_the_first_rejection():
    """The "Rejections by reason" panel rates transfiner_rejections_total by reason: a reason that
    only appears at its first rejection has no earlier sample, so rate() misses that rejection."""
    from prometheus_client.parser import text_string_to_metric_families

    from transfiner.service.metrics import ServiceMetrics

    exported = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(ServiceMetrics().render().decode())
        for sample in family.samples
        if sample.name == "transfiner_rejections_total"
    }
    given = _reasons_given_in_code()
    assert {"queue_full", "client_disconnected", "too_large"} <= given  # the scan finds them
    assert given <= set(exported), f"not exported before use: {given - set(exported)}"
    assert set(exported.values()) == {0.0}
