"""Helpers for the deployment tests (no tests here): the compose file as Compose reads it, the
nginx template as the nginx image renders it, the Kubernetes overlays as ``kubectl kustomize``
renders them, the Dockerfiles as dockerfile-parse reads them, and the metric names the service
really exports."""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.support import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKER_DIR = REPO / "docker"
NGINX_TEMPLATE = DOCKER_DIR / "nginx.conf.template"
PROMETHEUS_CONFIG = DOCKER_DIR / "prometheus.yml"
DOCKERFILES = sorted(DOCKER_DIR.glob("Dockerfile*"))
DASHBOARD_DIR = DOCKER_DIR / "grafana" / "dashboards"
SERVICE = "transfiner"  # the compose service (and DNS name) of the CPU replicas

# Compose interpolation: $$ is a literal $, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}...
_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution of one string, for the variables in ``env`` (unset otherwise)."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        value = env.get(name)
        if op in (":-", "-"):
            return arg if value is None or (op == ":-" and value == "") else value
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise ValueError(f"{name} is required: {arg}")
            return value
        if op in (":+", "+"):
            return arg if value not in (None, "") or (op == "+" and value is not None) else ""
        return value or ""

    return _INTERPOLATION.sub(substitute, text)


def interpolations(text: str) -> list[re.Match]:
    return [m for m in _INTERPOLATION.finditer(text) if m.group(0) != "$$"]


def _resolve(node, env: dict[str, str]):
    if isinstance(node, dict):
        return {key: _resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(value, env) for value in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def load_compose(env: dict[str, str] | None = None, *, raw: bool = False) -> dict:
    """docker-compose.yml parsed as YAML (anchors and merge keys resolved), then interpolated as
    ``docker compose`` would with only ``env`` set (by default none: every default applies)."""
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    return document if raw else _resolve(document, env or {})


def render_nginx_template(variables: dict[str, str]) -> str:
    """The nginx image's entrypoint (20-envsubst-on-templates.sh): ``envsubst`` of ``$NAME`` and
    ``${NAME}`` restricted to the variables that are defined, so nginx's own ``$host`` etc. stay."""
    text = NGINX_TEMPLATE.read_text()

    def substitute(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", substitute, text)


def nginx_template_variables() -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", NGINX_TEMPLATE.read_text()))


_METRIC_CLASSES = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "Summary": "summary",
    "GaugeMetricFamily": "gauge",
    "CounterMetricFamily": "counter",
    "HistogramMetricFamily": "histogram",
}
_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def declared_metric_families() -> dict[str, str]:
    """{family name: type} of every metric constructed in service/metrics.py, read from its syntax
    tree: this includes the GPU gauges, which a registry only shows on a machine with CUDA."""
    tree = ast.parse((REPO / "service" / "metrics.py").read_text())
    families = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        first = node.args[0]
        if func in _METRIC_CLASSES and isinstance(first, ast.Constant) and isinstance(first.value, str):
            families[first.value.removesuffix("_total")] = _METRIC_CLASSES[func]
    return families


def registry_metric_families() -> dict[str, str]:
    """{family name: type} of a real ``ServiceMetrics`` registry (CPU: no GPU gauges)."""
    from transfiner.service.metrics import ServiceMetrics

    return {family.name: family.type for family in ServiceMetrics().registry.collect()}


def exported_sample_names(families: dict[str, str]) -> set[str]:
    """The series names Prometheus stores for these families (``_total``, ``_bucket``, ...)."""
    return {name + suffix for name, kind in families.items() for suffix in _SAMPLE_SUFFIXES[kind]}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every provisioned dashboard."""
    import json

    queries = []
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                queries.append((panel["title"], target["expr"]))
    return queries


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus's API takes it: Grafana's variables replaced by what they
    mean with the default selection (all replicas) and a scrape interval of about a second."""
    return expr.replace("$__rate_interval", "1m").replace('"$instance"', '".*"').replace('"$model"', '".*"')


def parse_port(spec) -> tuple[str | None, int | None, int, str]:
    """A short-syntax ``ports`` entry, [IP:][HOST:]CONTAINER[/PROTO] -> (ip, host, container, proto)."""
    text, _, proto = str(spec).partition("/")
    parts = text.rsplit(":", 2)
    ip = parts[0] if len(parts) == 3 else None
    host = int(parts[-2]) if len(parts) >= 2 and parts[-2] else None
    return ip, host, int(parts[-1]), proto or "tcp"


REQUIRE_TOOLS_ENV = "TRANSFINER_REQUIRE_TOPOLOGY"
REQUIRE_KUBECTL_ENV = "TRANSFINER_REQUIRE_KUBECTL"


def skip_unless_required(message: str, require_env: str) -> None:
    """Skips the test, or fails it where ``require_env``=1 (CI sets it where it installs the tool)."""
    if os.environ.get(require_env) == "1":
        pytest.fail(f"{message}, and {require_env}=1 requires it")
    pytest.skip(message)


def missing_tool(what: str) -> None:
    """Skips a test whose system tool (nginx, prometheus, promtool) is not installed, unless
    TRANSFINER_REQUIRE_TOPOLOGY=1 (set by .ci/run, which installs them): then it fails."""
    skip_unless_required(f"{what} is not installed (apt-get install nginx prometheus; .ci/run does)", REQUIRE_TOOLS_ENV)


def kustomize(directory: Path) -> list[dict]:
    """The objects ``kubectl apply -k directory`` would send to the API server, rendered by
    ``kubectl kustomize``. Without kubectl the test skips, unless TRANSFINER_REQUIRE_KUBECTL=1:
    then it fails."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        skip_unless_required(
            "kubectl is not installed (it renders deploy/k8s with kubectl kustomize)", REQUIRE_KUBECTL_ENV
        )
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed ({done.returncode}): {done.stderr.strip()}")
    return [document for document in yaml.safe_load_all(done.stdout) if document is not None]


def _parsed(dockerfile: Path) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(dockerfile.read_bytes()))  # no build context needed


def dockerfile_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped, and ``$NAME`` /
    ``${NAME}`` of an ARG replaced by its default: what a plain `docker build` uses."""
    defaults: dict[str, str] = {}
    instructions = []
    for item in _parsed(dockerfile).structure:
        keyword, value = item["instruction"], item["value"]
        if keyword == "COMMENT":
            continue
        if keyword == "ARG" and "=" in value:
            name, default = value.split("=", 1)
            defaults.setdefault(name, default)
        elif keyword != "ARG":
            value = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m[1] or m[2], m[0]), value)
        instructions.append((keyword, value))
    return instructions


def dockerfile_environment(dockerfile: Path) -> dict[str, str]:
    """The ENV of the last stage (the image that runs), with ``$VAR`` references expanded."""
    return _parsed(dockerfile).envs


def wait_http(url: str, timeout: float, process: subprocess.Popen, log: Path) -> None:
    """Polls ``url`` until it answers 200; fails early with the log if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{url} did not answer 200 within {timeout} s:\n{log.read_text()[-3000:]}")
