"""deploy/k8s, checked without a cluster: both overlays rendered by ``kubectl kustomize`` (what
``kubectl apply -k`` sends), every object validated against the Kubernetes API's JSON schemas
(``kubernetes-validate``, offline, strict: unknown fields are errors), and the manifests checked
against the service itself: ports, health and metrics routes, settings, drain timing, the images'
user, and the metric the GPU autoscaler reads."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy.support import DOCKER_DIR, REPO, kustomize, registry_metric_families
from transfiner.service.server import AFTER_DRAIN_S
from transfiner.service.settings import ServiceSettings

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# The Kubernetes release whose API the manifests must fit (kubernetes-validate bundles its schemas).
KUBERNETES_VERSION = "1.35.0"
KINDS = {"ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, dict[str, dict]]:
    objects = kustomize(K8S / "overlays" / request.param)
    by_kind = {obj["kind"]: obj for obj in objects}
    assert len(by_kind) == len(objects), "one object of each kind"
    return request.param, by_kind


def _container(objects: dict[str, dict]) -> dict:
    containers = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _cores(quantity: str) -> float:
    """A Kubernetes CPU quantity ("2", "500m") in cores."""
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _env(objects: dict[str, dict]) -> dict[str, str]:
    """The container's environment as the kubelet sets it: plain values, and the CPU request
    (resourceFieldRef, divisor 1: whole cores, rounded up) where the downward API gives it."""
    container = _container(objects)
    names = [item["name"] for item in container["env"]]
    assert len(names) == len(set(names)), f"duplicate variables: {names}"
    env = {}
    for item in container["env"]:
        assert ("value" in item) != ("valueFrom" in item), f"one source for {item['name']}"
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        field = item["valueFrom"]["resourceFieldRef"]
        assert (field["resource"], field["divisor"]) == ("requests.cpu", "1"), item
        env[item["name"]] = str(math.ceil(_cores(container["resources"]["requests"]["cpu"])))
    return env


def _seconds_setting(env: dict[str, str], name: str) -> float:
    return float(env.get(f"TRANSFINER_{name.upper()}", ServiceSettings.model_fields[name].default))


def test_every_object_a_user_applies_is_valid_against_the_kubernetes_api(overlay):
    name, objects = overlay
    assert set(objects) == KINDS
    for obj in objects.values():
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    # The validation is not vacuous: a misspelt field and a wrong type are rejected.
    broken = copy.deepcopy(objects["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/health/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(objects["Service"])
    broken["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_each_overlay_runs_its_image_and_everything_is_labelled(overlay):
    name, objects = overlay
    assert _container(objects)["image"] == f"transfiner:{name}"  # the images docker-compose.yml builds
    assert (DOCKER_DIR / f"Dockerfile.{name}").exists()
    for obj in objects.values():
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "transfiner"


def test_ports_probes_and_scraping_match_the_service(overlay):
    from transfiner.service.routes.health import router

    _, objects = overlay
    container = _container(objects)
    env = _env(objects)
    port, grpc_port = container["ports"]
    # The port the service listens on = the container port = the images' EXPOSE = the scrape port;
    # the same for gRPC (which no probe or scrape uses).
    assert int(env["TRANSFINER_PORT"]) == port["containerPort"] == 8000
    assert int(env["TRANSFINER_GRPC_PORT"]) == grpc_port["containerPort"] == 8001
    for dockerfile in DOCKER_DIR.glob("Dockerfile.*"):
        for exposed in (port, grpc_port):
            assert re.search(rf"^EXPOSE {exposed['containerPort']}$", dockerfile.read_text(), re.M), dockerfile.name
    assert env["TRANSFINER_HOST"] == "0.0.0.0"  # reachable from the Service, not only loopback
    routes = {route.path for route in router.routes}
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/health/ready"  # 503 while loading and draining
    assert probes["livenessProbe"]["path"] == "/health/live"  # 200 while the process serves HTTP
    # The port is bound before the model loads, so only the ready route tells that start-up ended;
    # a load that never ends must restart the container, after a budget a slow GPU load fits into.
    assert probes["startupProbe"]["path"] == "/health/ready"
    startup = container["startupProbe"]
    assert 300 <= startup["periodSeconds"] * startup["failureThreshold"] <= 900
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] == port["name"]
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in routes
    # The Service sends its ports to the named container ports.
    service_ports = objects["Service"]["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in service_ports] == [(8000, port["name"]), (8001, grpc_port["name"])]


def test_the_environment_is_valid_service_settings(overlay, monkeypatch):
    _, objects = overlay
    env = _env(objects)
    extra = {"TRANSFINER_CACHE"}  # read by export/backends.py, not a setting
    for name in env:
        assert name in extra or name.removeprefix("TRANSFINER_").lower() in ServiceSettings.model_fields, name
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = ServiceSettings()  # validates every value as the service would at start-up
    assert settings.port == 8000 and settings.host == "0.0.0.0"


def test_thread_pools_follow_the_cores_the_pod_requests(overlay):
    name, objects = overlay
    env = _env(objects)
    requested = {"cpu": "2", "gpu": "4"}[name]
    for pool in ("TORCH_THREADS", "DECODE_THREADS", "POSTPROCESS_THREADS"):
        assert env[f"TRANSFINER_{pool}"] == requested, pool


def test_termination_grace_covers_the_prestop_wait_the_drain_and_the_readiness_grace(overlay):
    _, objects = overlay
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = _container(objects)
    env = _env(objects)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 1
    drain = _seconds_setting(env, "drain_timeout_s")
    grace = _seconds_setting(env, "shutdown_grace_s")
    # The service drains for up to drain_timeout_s and keeps readiness 503 until shutdown_grace_s
    # after SIGTERM, then uvicorn gives answers being written AFTER_DRAIN_S; Kubernetes must not
    # SIGKILL it before.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + max(drain, grace) + AFTER_DRAIN_S
    assert grace > 0, "readiness must be seen 503 before the port closes"
    # A readiness probe period fits into the grace: endpoints notice the 503.
    assert container["readinessProbe"]["periodSeconds"] * container["readinessProbe"]["failureThreshold"] <= (
        pre_stop + grace
    )


def test_pods_run_as_the_images_user_on_a_read_only_root_filesystem(overlay):
    _, objects = overlay
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = _container(objects)
    for dockerfile in DOCKER_DIR.glob("Dockerfile.*"):
        assert re.search(
            rf"^USER {pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}$",
            dockerfile.read_text(),
            re.M,
        ), dockerfile.name
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # What the service writes goes to volumes: temporary files and the export cache.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in mounts.values()} <= volumes
    assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly")
    cache = Path(_env(objects)["TRANSFINER_CACHE"])
    assert any(cache.is_relative_to(path) and not m.get("readOnly") for path, m in mounts.items())
    assert mounts["/models"]["readOnly"] is True  # docker-compose.yml's user model folder, read-only too


def test_gpu_overlay_asks_for_a_gpu_and_scales_on_a_metric_the_service_exports(overlay):
    name, objects = overlay
    container = _container(objects)
    resources = container["resources"]
    env = _env(objects)
    hpa = objects["HorizontalPodAutoscaler"]
    if name == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert env["TRANSFINER_DEVICE"] == "cuda"
        pod = objects["Deployment"]["spec"]["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods"
        families = registry_metric_families()
        assert families[metric["pods"]["metric"]["name"]] == "gauge"
    else:
        assert "nvidia.com/gpu" not in resources.get("limits", {}) and env["TRANSFINER_DEVICE"] == "cpu"
        assert float(resources["requests"]["cpu"]) == float(env["TRANSFINER_TORCH_THREADS"])
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
        assert "cpu" in resources["requests"], "CPU utilisation is relative to the request"
    assert "memory" in resources["requests"] and "memory" in resources["limits"]


def test_selectors_autoscaler_and_disruption_budget_fit_together(overlay):
    name, objects = overlay
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (spread,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        objects["Service"]["spec"]["selector"],
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        spread["labelSelector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    # With the fewest replicas, one may still be drained and one still serves.
    assert hpa["minReplicas"] - objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] >= 1
    assert hpa["maxReplicas"] > hpa["minReplicas"]
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    if name == "gpu":
        # No surge pod that needs a spare GPU; one replica at a time, and one still serves.
        assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (0, 1)
        assert hpa["minReplicas"] - rolling["maxUnavailable"] >= 1
    else:
        # A rolling update never goes below the current replicas (a new one is ready first).
        assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1


def test_prometheus_scrape_job_keeps_the_annotated_pods_and_scrapes_their_port():
    config = yaml.safe_load((K8S / "prometheus-scrape.yml").read_text())
    (job,) = config["scrape_configs"]
    rules = {tuple(r["source_labels"]): r for r in job["relabel_configs"]}
    address = rules[("__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port")]
    # Prometheus joins source labels with ';' and anchors the regex; $1 in the replacement is \1 here.
    match = re.fullmatch(address["regex"], "10.1.2.3:9999;8000")
    assert match and match.expand(address["replacement"].replace("$", "\\")) == "10.1.2.3:8000"
    assert re.fullmatch(rules[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["regex"], "true")
    assert re.fullmatch(rules[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)]["regex"], "transfiner")
    # Every rule is one Prometheus knows (promtool cannot check this file: Debian builds Prometheus
    # without Kubernetes service discovery).
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    for rule in job["relabel_configs"]:
        assert set(rule) <= {"source_labels", "action", "regex", "replacement", "target_label"}
        assert rule.get("action", "replace") in {"keep", "replace"}
        re.compile(rule.get("regex", "(.*)"))


def test_the_adapter_rule_serves_the_gpu_autoscalers_metric_from_the_scraped_series():
    """prometheus-adapter-values.yaml: the series it reads is a gauge the service exports, under
    the labels the scrape job adds, and it names the metric as the GPU overlay's HPA asks for it."""
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    series = re.fullmatch(r"(\w+)\{(.*)\}", rule["seriesQuery"])
    assert registry_metric_families()[series.group(1)] == "gauge"  # summed per pod, not a rate
    scrape = yaml.safe_load((K8S / "prometheus-scrape.yml").read_text())["scrape_configs"][0]
    added = {r["target_label"]: r["source_labels"] for r in scrape["relabel_configs"] if "target_label" in r}
    overrides = rule["resources"]["overrides"]
    assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert added["namespace"] == ["__meta_kubernetes_namespace"] and added["pod"] == ["__meta_kubernetes_pod_name"]
    assert all(f'{label}!=""' in series.group(2) for label in overrides)
    assert re.fullmatch(rule["name"]["matches"], series.group(1))
    hpa = kustomize(K8S / "overlays" / "gpu")
    (metric,) = [obj for obj in hpa if obj["kind"] == "HorizontalPodAutoscaler"][0]["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]


def test_an_overlay_kubectl_cannot_render_is_an_error_not_an_empty_list(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["../nowhere.yaml"]}))
    with pytest.raises(RuntimeError, match="nowhere.yaml"):
        kustomize(tmp_path)
