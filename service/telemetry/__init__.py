"""Traces (OpenTelemetry, off unless the standard ``OTEL_*`` variables ask for them), request ids
and JSON logs: what follows one request through the service."""
