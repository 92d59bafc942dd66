"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on grpc.aio, with the
standard health (``grpc.health.v1``) and reflection services.

- It runs in uvicorn's event loop, on the same ``ServiceRuntime`` as the HTTP routes
  (``service/server.py`` starts it before the models load and stops it after the drain), so both
  protocols share one admission, one queue and one set of limits.
- Every RPC goes through the shared protocol core (``transfiner.service.oip``); this module only
  moves messages, metadata, deadlines and status codes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from transfiner.model.inference.images import without_object_reprs
from transfiner.service.engine.runtime import ServiceRuntime
from transfiner.service.errors import MAX_MESSAGE_CHARS, ServiceError
from transfiner.service.grpc import inference_pb2 as pb
from transfiner.service.grpc import inference_pb2_grpc as pb_grpc
from transfiner.service.grpc import messages
from transfiner.service.oip import inference
from transfiner.service.oip.errors import OipError, from_service_error
from transfiner.service.security import key_in, key_matches
from transfiner.service.telemetry.logs import FIELDS
from transfiner.service.telemetry.middleware import request_id_from
from transfiner.service.telemetry.tracing import trace_id_hex

log = logging.getLogger("service")
request_log = logging.getLogger("service.request")  # the HTTP requests' log, in JSON mode

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# The call's trace id (tracing on), as X-Trace-Id over HTTP.
TRACE_ID_KEY = "x-trace-id"
# How often health watchers are told of the runtime's state (it calls nobody back).
HEALTH_POLL_S = 0.25


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata by lower-case key (binary ``-bin`` entries left out)."""
    return {key.lower(): value for key, value in context.invocation_metadata() or () if isinstance(value, str)}


def _peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` -> the address without the port."""
    _, _, address = peer.partition(":")
    return address.rsplit(":", 1)[0] if ":" in address else address or "unknown"


def details(message: str) -> str:
    """A refusal's message as the JSON errors carry it: no object reprs (Pillow's file object), at
    most ``MAX_MESSAGE_CHARS``, since messages quote what was sent."""
    message = without_object_reprs(message, "(the upload)")
    if len(message) > MAX_MESSAGE_CHARS:
        message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS} more characters)"
    return message


def retry_metadata(retry_after: float | None) -> tuple[tuple[str, str], ...]:
    """The retry hint as trailing metadata, whole seconds and never 0, as HTTP's Retry-After."""
    if retry_after is None:
        return ()
    return (("retry-after", str(max(1, math.ceil(retry_after)))),)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` on one runtime: each RPC timed and counted by method and
    status code, its refusals turned into status codes (with ``retry-after`` where one helps)."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime
        self.metrics = runtime.metrics

    # -- health and metadata (liveness and readiness need no key: probes have none) ------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._answer("ServerLive", context, lambda: pb.ServerLiveResponse(live=inference.server_live()))

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._answer(
            "ServerReady", context, lambda: pb.ServerReadyResponse(ready=inference.server_ready(self.runtime))
        )

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        def answer() -> pb.ServerMetadataResponse:
            found = inference.server_metadata()
            return pb.ServerMetadataResponse(
                name=found["name"], version=found["version"], extensions=list(found.get("extensions", ()))
            )

        return await self._answer("ServerMetadata", context, answer)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        def answer() -> pb.ModelReadyResponse:
            ready = inference.model_ready(self.runtime, request.name, request.version or None)
            return pb.ModelReadyResponse(ready=ready)

        return await self._answer("ModelReady", context, answer, keyed=True)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        def answer() -> pb.ModelMetadataResponse:
            found = inference.model_metadata(self.runtime, request.name, request.version or None)
            return messages.model_metadata(found)

        return await self._answer("ModelMetadata", context, answer, keyed=True)

    # -- inference -----------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        # Traced as an HTTP request is: a server span under the caller's traceparent (metadata),
        # its trace id in the initial metadata, the stage spans below it.
        metadata = _metadata(context)
        facts = {"request_id": request_id_from(metadata.get("x-request-id"))}
        attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "ModelInfer"}
        with self.runtime.tracing.server_span(f"{SERVICE}/ModelInfer", metadata, attributes) as span:
            facts["trace_id"] = trace_id_hex(span)
            reply = [("x-request-id", facts["request_id"])]
            if facts["trace_id"] is not None:
                reply.append((TRACE_ID_KEY, facts["trace_id"]))
            await context.send_initial_metadata(tuple(reply))
            work = functools.partial(self._infer, request, context, facts)
            return await self._answer("ModelInfer", context, work, keyed=True, facts=facts)

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, facts: dict[str, Any]
    ) -> pb.ModelInferResponse:
        tracing = self.runtime.tracing
        with tracing.stage("receive"):
            converted = messages.infer_request(request)
        # The client cancelling (or its deadline passing) cancels this handler. The core runs in
        # a task of its own, shielded, and is told through ``disconnected``: it then drops the
        # queued job and gives back its place, as for an HTTP client that went away.
        gone = asyncio.Event()
        context.add_done_callback(lambda _: gone.set())
        task = asyncio.ensure_future(
            inference.infer(
                self.runtime,
                request.model_name,
                request.model_version or None,
                converted,
                client=self._client(context),
                deadline=self._deadline(context),
                disconnected=gone.wait,
            )
        )
        try:
            response = await asyncio.shield(task)
        except asyncio.CancelledError:
            gone.set()
            await asyncio.wait([task])
            error = task.exception() if not task.cancelled() else None
            if isinstance(error, OipError) and error.reason:  # client_disconnected, counted as over HTTP
                self.metrics.rejections.labels(reason=error.reason).inc()
            raise
        facts.update(model=response.model_name, version=response.model_version)
        tracing.annotate(
            {"transfiner.model.name": response.model_name, "transfiner.model.version": response.model_version}
        )
        with tracing.stage("encode"):
            return messages.infer_response(response)

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        """The call's own deadline, at most ``max_request_timeout_s``; without one the HTTP
        default (``request_timeout_s``)."""
        settings = self.runtime.settings
        remaining = context.time_remaining()
        timeout = settings.request_timeout_s if remaining is None else min(remaining, settings.max_request_timeout_s)
        return time.monotonic() + timeout

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        """Who the call counts against for ``max_client_inflight``: as over HTTP, its key when
        keys are checked, else its address."""
        if self.runtime.settings.api_key is not None:
            key = key_in(_metadata(context))
            if key:
                return "key:" + key
        return "addr:" + _peer_host(context.peer() or "")

    def _check_key(self, context: grpc.aio.ServicerContext) -> None:
        expected = self.runtime.settings.api_key
        if expected is not None and not key_matches(key_in(_metadata(context)), expected):
            raise ServiceError(
                401,
                "unauthorized",
                "missing or wrong API key (metadata x-api-key, or authorization: Bearer)",
                reason="unauthorized",
            )

    async def _answer(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        work: Callable[[], Any | Awaitable[Any]],
        keyed: bool = False,
        facts: dict[str, Any] | None = None,
    ) -> Any:
        """``work()``'s message, or the call aborted with the refusal's status code; counted, and
        with ``facts`` (the request's id, trace, model) logged as HTTP requests are in JSON mode."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            try:
                if keyed:
                    self._check_key(context)
                answer = work()
                return await answer if asyncio.iscoroutine(answer) else answer
            except (ServiceError, OipError) as error:
                refusal = from_service_error(error) if isinstance(error, ServiceError) else error
                if refusal.reason:
                    self.metrics.rejections.labels(reason=refusal.reason).inc()
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                log.exception("unhandled error in gRPC %s", method)
                code = grpc.StatusCode.INTERNAL
                await context.abort(code, "internal server error (logged on the server)")
            code = refusal.grpc_code
            if refusal.reason == "deadline_unmeetable":
                # Over HTTP a 503 to retry; a gRPC retry shares the call's deadline, which the
                # expected wait already exceeds, so the call ends as gRPC ends late calls.
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            await context.abort(code, details(refusal.message), trailing_metadata=retry_metadata(refusal.retry_after))
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.grpc_requests.labels(method=method, code=code.name).inc()
            self.metrics.grpc_seconds.labels(method=method).observe(elapsed)
            if facts is not None and self.runtime.settings.log_format == "json":
                fields = {
                    **facts,
                    "method": "gRPC",
                    "route": f"{SERVICE}/{method}",
                    "status": code.name,
                    "client": _peer_host(context.peer() or ""),
                    "total_ms": round(elapsed * 1000, 3),
                }
                request_log.info("gRPC %s %s", method, code.name, extra={FIELDS: fields})


class RuntimeHealth(health.aio.HealthServicer):
    """The standard health service for the server ("") and the inference service: SERVING while
    the runtime is ready, NOT_SERVING while the models load or it drains. A check reads the
    runtime at once; watchers hear of changes from ``follow`` (the runtime calls nobody back)."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self._shown: bool | None = None

    async def refresh(self) -> None:
        ready = self.runtime.ready
        if ready != self._shown:
            self._shown = ready
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE):
                await self.set(name, status)

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        await self.refresh()
        return await super().Check(request, context)

    async def follow(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(HEALTH_POLL_S)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """The files reflection describes. The inference messages live in a pool of their own
    (``inference_pb2.POOL``, see scripts/generate_grpc.py), so reflection gets one holding them and
    the health and reflection services' files too."""
    pool = descriptor_pool.DescriptorPool()
    for module in (pb, health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"


class GrpcServer:
    """The gRPC server of one runtime on ``host:grpc_port``; ``start`` and ``stop`` in the event
    loop that serves HTTP."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.address = _address(settings.host, settings.grpc_port)
        limit = settings.grpc_message_bytes
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # gRPC shares a port with any other process that asks (SO_REUSEPORT) by default: a
                # second server on the same port would silently take half the calls.
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(runtime), self.server)
        self.health = RuntimeHealth(runtime)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self.server, pool=reflection_pool()
        )
        self._follow: asyncio.Task | None = None

    async def start(self) -> int:
        """Listens and serves; returns the port. Raises ValueError when the address cannot be bound."""
        await self.health.refresh()  # NOT_SERVING until the models are loaded
        try:
            port = self.server.add_insecure_port(self.address)
        except RuntimeError as error:
            raise ValueError(f"cannot listen on {self.address}: {error}") from None
        await self.server.start()
        self._follow = asyncio.create_task(self.health.follow(), name="transfiner-grpc-health")
        log.info("listening on grpc://%s", self.address)
        return port

    async def stop(self, grace: float) -> None:
        """NOT_SERVING from now; calls in progress get ``grace`` seconds, then are cancelled."""
        if self._follow is not None:
            self._follow.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
