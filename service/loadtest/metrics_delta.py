"""What the server did during one load-test step, from two scrapes of its ``/metrics``.

- Counters and histograms only ever grow, so the difference of a scrape taken after a step and one
  taken before it describes exactly the requests of that step (warm-up excluded): how many batches
  ran and how big they were, the mean queue wait, inference and post-processing times, and which
  requests were refused. Gauges (queue depth, in-flight requests) are instantaneous and are left out
  of the difference.
- Behind a load balancer each replica has its own ``/metrics``; scrapes of several URLs are summed
  sample by sample, which is what the Prometheus aggregation ``sum(...)`` would give.
- Quantiles from a histogram are approximate: like PromQL's ``histogram_quantile`` they assume the
  observations are spread evenly inside a bucket, so they are only as fine as the buckets
  (``service.metrics.LATENCY_BUCKETS``). Means (sum / count) are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

# A sample: its name (with the _bucket/_sum/_count/_total suffix) and its sorted labels.
SampleKey = tuple[str, tuple[tuple[str, str], ...]]

# Families whose samples accumulate; their differences mean something.
_CUMULATIVE_TYPES = {"counter", "histogram", "summary"}

SEGMENT_ROUTE = "/v1/segment"
GRPC_INFER_ROUTE = "grpc ModelInfer"  # no HTTP route: the gRPC server's metrics of that method
MODEL_SEGMENT_ROUTE = "/v1/models/{name}/segment"  # the route template, as the request metrics label it


@dataclass
class Scrape:
    """The cumulative samples (counters and histograms) of one or more ``/metrics`` bodies."""

    samples: dict[SampleKey, float] = field(default_factory=dict)
    sources: int = 1  # how many replicas were summed into it

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[SampleKey, float] = {}
        for family in text_string_to_metric_families(text):
            if family.type not in _CUMULATIVE_TYPES:
                continue
            for sample in family.samples:
                # _created is a timestamp, not a count: it must not be summed or differenced.
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = samples.get(key, 0.0) + sample.value
        return cls(samples)

    @classmethod
    def combine(cls, scrapes: list[Scrape]) -> Scrape:
        """The sum over replicas, sample by sample."""
        total: dict[SampleKey, float] = {}
        for scrape in scrapes:
            for key, value in scrape.samples.items():
                total[key] = total.get(key, 0.0) + value
        return cls(total, sources=sum(s.sources for s in scrapes))

    def minus(self, earlier: Scrape) -> Scrape:
        """What accumulated since ``earlier``. A sample that went down belongs to a replica that
        restarted in between; as Prometheus' ``increase()`` does, its new value is the increase."""
        delta = {}
        for key, value in self.samples.items():
            before = earlier.samples.get(key, 0.0)
            delta[key] = value - before if value >= before else value
        return Scrape(delta, sources=self.sources)

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(
            value
            for (sample, sample_labels), value in self.samples.items()
            if sample == name and _has_labels(sample_labels, labels)
        )

    def by_label(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """``name`` summed per value of ``label`` (e.g. requests per status)."""
        out: dict[str, float] = {}
        for (sample, sample_labels), value in self.samples.items():
            if sample == name and _has_labels(sample_labels, labels):
                key = dict(sample_labels).get(label, "")
                out[key] = out.get(key, 0.0) + value
        return out

    def histogram(self, name: str, **labels: str) -> Histogram:
        """Histogram ``name`` (without suffix), summed over the label sets that include ``labels``."""
        cumulative: dict[float, float] = {}
        for (sample, sample_labels), value in self.samples.items():
            if sample == f"{name}_bucket" and _has_labels(sample_labels, labels):
                bound = float(dict(sample_labels)["le"])  # "+Inf" parses to inf
                cumulative[bound] = cumulative.get(bound, 0.0) + value
        return Histogram(
            count=self.total(f"{name}_count", **labels),
            sum=self.total(f"{name}_sum", **labels),
            buckets=sorted(cumulative.items()),
        )


def _has_labels(sample_labels: tuple[tuple[str, str], ...], wanted: dict[str, str]) -> bool:
    present = dict(sample_labels)
    return all(present.get(k) == v for k, v in wanted.items())


@dataclass
class Histogram:
    """A Prometheus histogram (or the difference of two): cumulative ``(upper bound, count)`` buckets."""

    count: float
    sum: float
    buckets: list[tuple[float, float]]

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """Approximate ``q``-quantile, interpolating linearly inside the bucket that holds it
        (PromQL's ``histogram_quantile``). In the +Inf bucket: the highest finite bound."""
        if not self.buckets or self.buckets[-1][1] <= 0:
            return None
        rank = q * self.buckets[-1][1]
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in self.buckets:
            if count >= rank and count > lower_count:
                if math.isinf(bound):
                    return lower_bound
                return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
            lower_bound, lower_count = bound, count
        return lower_bound

    def distribution(self) -> list[tuple[float, float, int]]:
        """Non-cumulative buckets that hold observations: ``(lower bound (exclusive), upper bound, count)``."""
        out = []
        previous_bound, previous_count = 0.0, 0.0
        for bound, count in self.buckets:
            if count > previous_count:
                out.append((previous_bound, bound, int(round(count - previous_count))))
            previous_bound, previous_count = bound, count
        return out


def integer_bucket_label(lower: float, upper: float) -> str:
    """Label of a bucket of integer observations (batch sizes): (3, 4] -> '4', (4, 6] -> '5-6'."""
    if math.isinf(upper):
        return f">{int(lower)}"
    first, last = int(math.floor(lower)) + 1, int(upper)
    return str(last) if first >= last else f"{first}-{last}"


@dataclass
class StageTiming:
    """One server stage over a step, in seconds. Quantiles are approximate (bucket interpolation)."""

    count: int
    mean_s: float | None
    p50_s: float | None
    p99_s: float | None

    @classmethod
    def of(cls, histogram: Histogram) -> StageTiming:
        return cls(int(round(histogram.count)), histogram.mean, histogram.quantile(0.5), histogram.quantile(0.99))


@dataclass
class ServerBreakdown:
    """The server's account of one step, from the difference of two ``/metrics`` scrapes."""

    replicas: int
    segment_requests: int  # answered by the segment route, any status
    responses_by_status: dict[str, int]
    rejections: dict[str, int]  # by reason, only reasons that occurred
    request: StageTiming  # end to end inside the server (route /v1/segment)
    queue_wait: StageTiming  # per request, batch queue
    decode: StageTiming  # per request
    preprocess: StageTiming  # per batch: resize + pad
    inference: StageTiming  # per batch: the forward pass
    postprocess: StageTiming  # per request: paste, RLE/polygon, JSON
    inference_per_image_s: float | None  # inference seconds / images inferred
    batches: int
    mean_batch_size: float | None
    batch_size_distribution: dict[str, int]  # bucket label ("1", "5-6") -> batches


def breakdown(delta: Scrape, model: str | None = None, route: str | None = None) -> ServerBreakdown:
    """The step's figures; with ``model``, that model's (its segment route and its versions'
    metrics), else those of ``/v1/segment`` and every model's work. ``route``: the route template
    the requests went to, when not /v1's (the Open Inference Protocol's; ``GRPC_INFER_ROUTE``: its
    gRPC calls)."""
    route = route or (SEGMENT_ROUTE if model is None else MODEL_SEGMENT_ROUTE)
    of_model = {} if model is None else {"model": model}

    def stage(name: str) -> StageTiming:
        return StageTiming.of(delta.histogram(name, **of_model))

    batch = delta.histogram("transfiner_batch_size", **of_model)
    inference = delta.histogram("transfiner_inference_seconds", **of_model)
    if route == GRPC_INFER_ROUTE:  # by status code name (OK, UNAVAILABLE, ...)
        by_status = delta.by_label("transfiner_grpc_requests_total", "code", method="ModelInfer")
        request = delta.histogram("transfiner_grpc_request_duration_seconds", method="ModelInfer")
    else:
        by_status = delta.by_label("transfiner_requests_total", "status", route=route)
        request = delta.histogram("transfiner_request_duration_seconds", route=route)
    rejections = delta.by_label("transfiner_rejections_total", "reason")
    return ServerBreakdown(
        replicas=delta.sources,
        segment_requests=int(round(sum(by_status.values()))),
        responses_by_status={k: int(round(v)) for k, v in sorted(by_status.items()) if v > 0},
        rejections={k: int(round(v)) for k, v in sorted(rejections.items()) if v > 0},
        request=StageTiming.of(request),
        queue_wait=stage("transfiner_queue_wait_seconds"),
        decode=stage("transfiner_decode_seconds"),
        preprocess=stage("transfiner_preprocess_seconds"),
        inference=StageTiming.of(inference),
        postprocess=stage("transfiner_postprocess_seconds"),
        inference_per_image_s=inference.sum / batch.sum if batch.sum > 0 else None,
        batches=int(round(batch.count)),
        mean_batch_size=batch.mean,
        batch_size_distribution={
            integer_bucket_label(lower, upper): count for lower, upper, count in batch.distribution()
        },
    )


class ScrapeError(Exception):
    """A /metrics URL that did not answer 200 with Prometheus text."""


async def scrape(client: httpx.AsyncClient, urls: list[str]) -> Scrape:
    """One scrape of every URL, summed."""
    scrapes = []
    for url in urls:
        try:
            response = await client.get(url)
        except httpx.TransportError as error:
            raise ScrapeError(f"cannot scrape {url}: {error or type(error).__name__}") from None
        if response.status_code != 200:
            raise ScrapeError(f"cannot scrape {url}: it answered {response.status_code}")
        try:
            scrapes.append(Scrape.parse(response.text))
        except ValueError as error:
            raise ScrapeError(f"{url} is not Prometheus text: {error}") from None
    return Scrape.combine(scrapes)
