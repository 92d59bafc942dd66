"""Prometheus metrics of one service instance, on a registry of its own (no global state).

Durations are histograms in seconds. GPU gauges exist only when CUDA is available: torch's
allocator memory always, utilisation and device memory from NVML when the ``pynvml`` module
(package ``nvidia-ml-py``) is installed too; the import is guarded.
"""

from __future__ import annotations

import contextlib
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("service")

# Sub-millisecond decode of a thumbnail up to tens of seconds on a saturated CPU.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
INSTANCE_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100)
MEGAPIXEL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 12, 24, 50)

# Every metric of one loaded model version carries these (model name, version).
VERSION_LABELS = ("model", "version")
# What each version's metrics are called on ``VersionMetrics`` (and on ``ServiceMetrics``).
VERSION_METRICS = (
    "queue_seconds",
    "decode_seconds",
    "preprocess_seconds",
    "inference_seconds",
    "postprocess_seconds",
    "batch_size",
    "queue_depth",
    "inflight",
    "queued_bytes",
    "instances",
    "megapixels",
    "worker_restarts",
)
MODEL_STATES = ("LOADING", "READY", "UNLOADING", "UNAVAILABLE")

REJECTION_REASONS = (
    "queue_full",
    "deadline",
    "bad_image",
    "too_large",
    "unsupported_type",
    "unauthorized",
    "client_limit",
    "draining",
    "not_ready",
    "unknown_model",
    "client_disconnected",
    "deadline_unmeetable",
    "memory_budget",
    "body_timeout",
)


class ServiceMetrics:
    """Every metric the service exports; ``render()`` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_seconds = Histogram(
            "transfiner_request_duration_seconds",
            "End-to-end time of HTTP requests, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "transfiner_queue_wait_seconds",
            "Time a request waits in the batch queue",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "transfiner_decode_seconds",
            "Image decoding (sniff, decode, EXIF, mode conversion)",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            "transfiner_preprocess_seconds",
            "Resize and pad of a batch (inside the worker)",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "transfiner_inference_seconds",
            "Model forward pass of a batch",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.postprocess_seconds = Histogram(
            "transfiner_postprocess_seconds",
            "Per request: records, polygon tracing and JSON encoding (masks are sampled and run-length encoded "
            "by the worker, in its inference time)",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "transfiner_batch_size",
            "Images per forward pass",
            VERSION_LABELS,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "transfiner_queue_depth", "Requests waiting in the batch queue", VERSION_LABELS, registry=r
        )
        self.inflight = Gauge(
            "transfiner_inflight_requests",
            "Segment requests admitted and not yet answered",
            VERSION_LABELS,
            registry=r,
        )
        self.queued_bytes = Gauge(
            "transfiner_queued_image_bytes",
            "Bytes of decoded images held by requests not yet through the model",
            VERSION_LABELS,
            registry=r,
        )
        self.instances = Histogram(
            "transfiner_instances_per_image",
            "Instances returned per image",
            VERSION_LABELS,
            buckets=INSTANCE_BUCKETS,
            registry=r,
        )
        self.megapixels = Histogram(
            "transfiner_input_megapixels",
            "Decoded input size in megapixels",
            VERSION_LABELS,
            buckets=MEGAPIXEL_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "transfiner_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        # The gRPC server's calls of inference.GRPCInferenceService (health and reflection not counted).
        self.grpc_requests = Counter(
            "transfiner_grpc_requests",
            "gRPC calls by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.grpc_seconds = Histogram(
            "transfiner_grpc_request_duration_seconds",
            "End-to-end time of gRPC calls, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "transfiner_rejections",
            "Requests refused, by reason",
            ["reason"],
            registry=r,
        )
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)  # export zeros, so rate() works from the start
        self.model_info = Gauge(
            "transfiner_model_info",
            "Each loaded model version (value 1)",
            ["name", "version", "backend", "precision", "device"],
            registry=r,
        )
        self.model_state = Gauge(
            "transfiner_model_state",
            "1 for the state each model version on record is in (LOADING, READY, UNLOADING, UNAVAILABLE)",
            [*VERSION_LABELS, "state"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "transfiner_model_load_failures",
            "Model versions that failed to load or warm up (or were refused by the memory budget)",
            ["model"],
            registry=r,
        )
        self.ready = Gauge("transfiner_ready", "1 when the service accepts segment requests", registry=r)
        self.worker_restarts = Counter(
            "transfiner_worker_restarts",
            "Model worker processes started again after theirs exited",
            VERSION_LABELS,
            registry=r,
        )

    def for_version(self, model: str, version: str) -> VersionMetrics:
        """The metrics of one model version (each already labelled with it)."""
        return VersionMetrics(self, model, version)

    def set_state(self, model: str, version: str, state: str) -> None:
        for name in MODEL_STATES:
            self.model_state.labels(model=model, version=version, state=name).set(int(name == state))

    def forget_state(self, model: str, version: str) -> None:
        """Drops a version's state series (it is no longer on record)."""
        for name in MODEL_STATES:
            with contextlib.suppress(KeyError):
                self.model_state.remove(model, version, name)

    def forget_version(self, model: str, version: str) -> None:
        """Drops an unloaded version's series (its state and failure records stay)."""
        for name in VERSION_METRICS:
            family = getattr(self, name)
            with contextlib.suppress(KeyError):
                family.remove(model, version)
        for labels in list(self.model_info._metrics):  # noqa: SLF001 - prometheus_client has no public lookup
            if labels[0] == model and labels[1] == version:
                self.model_info.remove(*labels)

    def enable_gpu_metrics(self, allocator: bool = True) -> bool:
        """Registers the GPU collector when CUDA is available; True if it did. ``allocator``:
        export torch's allocator gauges of this process (False when the model lives in worker
        processes, where this one allocates nothing; NVML's figures cover every process)."""
        collector = GpuCollector.create(allocator)
        if collector is None:
            return False
        self.registry.register(collector)
        return True

    def render(self) -> bytes:
        return generate_latest(self.registry)


class VersionMetrics:
    """``ServiceMetrics``' per-version metrics, labelled with one model version, under the same
    attribute names; the engine's parts take either and need not know about versions."""

    def __init__(self, metrics: ServiceMetrics, model: str, version: str) -> None:
        self.model, self.version = model, version
        for name in VERSION_METRICS:
            setattr(self, name, getattr(metrics, name).labels(model=model, version=version))
        self._metrics = metrics

    def set_model(self, backend: str, precision: str, devices: list[str]) -> None:
        self._metrics.model_info.labels(
            name=self.model, version=self.version, backend=backend, precision=precision, device=",".join(devices)
        ).set(1)


class GpuCollector:
    """Per-GPU gauges read at each scrape: utilisation and device memory from NVML (when the
    ``pynvml`` module of package nvidia-ml-py is installed), and the memory torch's caching
    allocator holds for this process (always)."""

    def __init__(self, torch_cuda, nvml, handles: list, allocator: bool = True) -> None:
        self._cuda = torch_cuda
        self._allocator = allocator
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def create(cls, allocator: bool = True) -> GpuCollector | None:
        import torch

        if not torch.cuda.is_available():
            return None
        nvml, handles = None, []
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(torch.cuda.device_count())]
            nvml = pynvml
        except Exception as error:  # noqa: BLE001 - without NVML only the allocator gauges remain
            log.info("NVML unavailable (%s): GPU utilisation is not exported", error)
        return cls(torch.cuda, nvml, handles, allocator)

    def describe(self):
        return []

    def collect(self):
        if self._allocator:
            yield from self._allocator_gauges()
        if self._nvml is not None:
            yield from self._nvml_gauges()

    def _allocator_gauges(self):
        allocated = GaugeMetricFamily(
            "transfiner_gpu_torch_allocated_bytes", "Memory held by tensors of this process (torch)", labels=["gpu"]
        )
        reserved = GaugeMetricFamily(
            "transfiner_gpu_torch_reserved_bytes",
            "Memory cached by torch's allocator in this process",
            labels=["gpu"],
        )
        for index in range(self._cuda.device_count()):
            allocated.add_metric([str(index)], float(self._cuda.memory_allocated(index)))
            reserved.add_metric([str(index)], float(self._cuda.memory_reserved(index)))
        yield allocated
        yield reserved

    def _nvml_gauges(self):
        util = GaugeMetricFamily("transfiner_gpu_utilization_ratio", "GPU busy fraction (NVML)", labels=["gpu"])
        used = GaugeMetricFamily(
            "transfiner_gpu_memory_used_bytes", "GPU memory in use, all processes (NVML)", labels=["gpu"]
        )
        total = GaugeMetricFamily("transfiner_gpu_memory_total_bytes", "GPU memory (NVML)", labels=["gpu"])
        for index, handle in enumerate(self._handles):
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:  # noqa: BLE001 - a failing read must not break the scrape
                continue
            util.add_metric([str(index)], rates.gpu / 100.0)
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
        yield util
        yield used
        yield total
