"""OpenTelemetry traces of the service: a server span per request, a child span per stage.

- Off by default (a no-op tracer: nothing is created per request). On when the standard variables
  ask for it: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``; a comma-separated list),
  or an OTLP endpoint set (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``);
  ``OTEL_SDK_DISABLED=true`` wins. The SDK reads the rest itself (service name, resource
  attributes, sampler, the exporter's endpoint, headers and timeout).
- Each app owns its ``TracerProvider`` (none is made global) and shuts it down with the app.
- Transports (REST, the Open Inference Protocol's REST and gRPC) open the request's server span
  with ``Tracing.server_span``, the parent taken from W3C ``traceparent``/``tracestate`` in any
  ``Mapping[str, str]`` (HTTP headers, gRPC metadata); ``SegmentFlow.segment`` adds the stage
  spans under whatever span is current, after the fact, from the times it takes anyway.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# Span names of the stages, in the order a request passes them.
STAGES = ("receive", "decode", "queue", "forward", "postprocess", "encode")
INSTRUMENTATION = "transfiner.service"
DEFAULT_SERVICE_NAME = "transfiner"
_PROPAGATOR = TraceContextTextMapPropagator()


def extract_context(carrier: Mapping[str, str]) -> otel_context.Context:
    """The parent context in ``carrier``'s ``traceparent`` (and ``tracestate``); keys are matched
    in lower case, as HTTP/2 and gRPC metadata spell them. An empty context when absent or
    malformed (the request then starts a trace of its own)."""
    return _PROPAGATOR.extract(carrier)


def trace_id_hex(span: Span) -> str | None:
    """The span's trace id as 32 hex digits (None for an invalid span, as when tracing is off)."""
    span_context = span.get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


def wall_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` reading as wall-clock nanoseconds (what span times are), for the
    stage spans created after the fact from the times the request flow takes."""
    return time.time_ns() - time.monotonic_ns() + int(monotonic_s * 1e9)


def tracer_provider_from_env():
    """A ``TracerProvider`` exporting where the ``OTEL_*`` variables say, or None when they do not
    ask for traces. Raises ValueError for an exporter or protocol this install cannot use."""
    environ = os.environ  # as the SDK's own parts (resource, sampler, exporter) read them
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if not names and (environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    names = [name for name in names if name != "none"]
    if not names:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporters = []
    for name in names:
        if name == "otlp":
            exporters.append(_otlp_exporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER: {name!r} is not an exporter of this service (otlp, console, none)")
    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG); the app shuts the provider down itself.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _otlp_exporter():
    environ = os.environ
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = protocol or "http/protobuf"
    if protocol.strip().lower() != "http/protobuf":
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: this service exports OTLP over http/protobuf, not {protocol!r}")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout and compression from OTEL_EXPORTER_OTLP_*


class Tracing:
    """One app's tracer and the spans its transports and request flow make.

    - ``provider`` None: tracing is off; every method is then a cheap no-op.
    - ``owned``: the app made the provider and shuts it down (one passed in is only flushed).
    """

    def __init__(self, provider=None, owned: bool = False) -> None:
        self.provider = provider
        self.owned = owned
        self.enabled = provider is not None
        self.tracer = provider.get_tracer(INSTRUMENTATION) if provider is not None else trace.NoOpTracer()

    @contextlib.contextmanager
    def server_span(
        self, name: str, carrier: Mapping[str, str] | None = None, attributes: Mapping[str, Any] | None = None
    ) -> Iterator[Span]:
        """The request's span, current while the block runs: a child of the context that
        ``carrier`` propagates (W3C trace context), else the root of a new trace. An exception
        leaving the block is recorded and sets the status to ERROR."""
        if not self.enabled:
            yield trace.INVALID_SPAN
            return
        parent = extract_context(carrier or {})
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            yield span
        except BaseException as error:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            raise
        finally:
            otel_context.detach(token)
            span.end()

    def recording(self) -> bool:
        """Whether the current span records (tracing on and the request sampled): the stage spans
        are made only then."""
        return self.enabled and trace.get_current_span().is_recording()

    @contextlib.contextmanager
    def stage(self, name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
        """A stage span around the block (``receive``, ``encode``: work a transport does on the
        event loop), a child of the current span; nothing when that span is not recording."""
        if not self.recording():
            yield trace.INVALID_SPAN
            return
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def record_stage(self, name: str, start_ns: int, end_ns: int, attributes: Mapping[str, Any] | None = None) -> None:
        """A finished stage span from ``start_ns`` to ``end_ns`` (wall-clock ns), a child of the
        current span: created after the fact, so nothing is added to the work it times."""
        span = self.tracer.start_span(name, start_time=start_ns, attributes=attributes)
        span.end(end_time=end_ns)

    def annotate(self, attributes: Mapping[str, Any]) -> None:
        """Sets attributes on the current span (the request's, as the model that serves it)."""
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(attributes)

    def shutdown(self) -> None:
        """Exports what is left: the app's own provider is shut down, one passed in flushed."""
        if self.provider is None:
            return
        if self.owned:
            self.provider.shutdown()
        else:
            self.provider.force_flush()


NO_TRACING = Tracing()
