"""The load generator: clients for the segment routes (/v1, or the Open Inference Protocol's /v2
infer, or its gRPC ``ModelInfer``) and two drivers.

Both drivers take ``send(index) -> HTTP status`` (an awaitable), so the same loops also drive the
service's runtime in-process (``scripts/bench_service.py``).

* Closed loop (``run_closed_loop``): ``concurrency`` users, each sending its next request as soon
  as its previous answer arrived. Throughput at a given concurrency; but when the server slows
  down the users slow down with it, so the queueing a real arrival stream would meet is hidden.
* Open loop (``run_open_loop``): requests are sent at the times of a Poisson process of the
  target rate (``poisson_arrivals``), independently of completions, and every latency is counted
  from the scheduled arrival time, so a server (or a client) falling behind shows as latency and
  is not silently absorbed ("coordinated omission"). Outstanding requests are capped, generously;
  an arrival that finds the cap reached is dropped and counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import grpc
import httpx
import numpy as np

from transfiner.service.grpc import inference_pb2 as pb
from transfiner.service.grpc import inference_pb2_grpc as pb_grpc
from transfiner.service.grpc.messages import set_parameters
from transfiner.service.loadtest.metrics_delta import GRPC_INFER_ROUTE, MODEL_SEGMENT_ROUTE, SEGMENT_ROUTE
from transfiner.service.oip import rest
from transfiner.service.oip.tensors import InferRequest, Tensor, TensorError

# send(index) -> HTTP status. Transport failures raise; the drivers record them as errors.
Send = Callable[[int], Awaitable[int]]
Progress = Callable[[], None]


class InvalidAnswer(Exception):
    """A success status whose body is not the complete JSON answer."""


# Raised by a send that got no usable answer: connection refused or reset, timeouts, protocol
# errors, a truncated body. The drivers record them as errors; anything else is a bug and raises.
TRANSPORT_ERRORS = (httpx.TransportError, OSError, asyncio.TimeoutError, InvalidAnswer)


@dataclass(frozen=True)
class WorkloadImage:
    name: str
    data: bytes
    content_type: str
    width: int
    height: int


@dataclass
class RequestRecord:
    """One request. Times are seconds since the start of the run (``time.perf_counter`` based)."""

    index: int
    scheduled_s: float  # when it was due: the arrival time (open loop), or when the user sent it (closed)
    sent_s: float
    finished_s: float
    status: int | None  # None: no HTTP answer (see ``error``)
    error: str | None = None  # exception class name for transport failures

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.scheduled_s

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class RunResult:
    """A driver's outcome: every completed request, the run's wall time and dropped arrivals."""

    records: list[RequestRecord] = field(default_factory=list)
    duration_s: float = 0.0  # from the start of the run to the last answer
    dropped: int = 0  # open loop: arrivals not sent because ``max_outstanding`` requests were in flight
    arrivals: int = 0  # open loop: arrivals scheduled (sent + dropped)
    arrival_window_s: float = 0.0  # open loop: time of the last scheduled arrival


async def _timed(send: Send, index: int, scheduled: float, origin: float) -> RequestRecord:
    sent = time.perf_counter()
    try:
        status, error = await send(index), None
    except TRANSPORT_ERRORS as exc:
        status, error = None, type(exc).__name__
    return RequestRecord(index, scheduled - origin, sent - origin, time.perf_counter() - origin, status, error)


async def run_closed_loop(
    send: Send,
    concurrency: int,
    *,
    requests: int | None = None,
    duration_s: float | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """``concurrency`` users share ``requests`` requests, or send until ``duration_s`` has passed
    (requests in flight then are finished and counted)."""
    if requests is None and duration_s is None:
        raise ValueError("a closed loop needs a number of requests or a duration")
    origin = time.perf_counter()
    result = RunResult()
    next_index = 0  # shared by the users; asyncio runs one at a time, so no lock is needed

    async def user() -> None:
        nonlocal next_index
        while True:
            if requests is not None and next_index >= requests:
                return
            now = time.perf_counter()
            if duration_s is not None and now - origin >= duration_s:
                return
            index, next_index = next_index, next_index + 1
            result.records.append(await _timed(send, index, now, origin))
            if progress is not None:
                progress()

    await asyncio.gather(*(user() for _ in range(concurrency)))
    result.duration_s = time.perf_counter() - origin
    return result


def poisson_arrivals(
    rate: float,
    *,
    count: int | None = None,
    duration_s: float | None = None,
    seed: int = 0,
) -> list[float]:
    """Arrival times (seconds from 0) of a Poisson process of ``rate`` per second: exponential
    gaps of mean ``1 / rate``. Stops after ``count`` arrivals or before ``duration_s``."""
    if rate <= 0:
        raise ValueError(f"the arrival rate must be positive, got {rate}")
    if count is None and duration_s is None:
        raise ValueError("an open loop needs a number of requests or a duration")
    rng = np.random.default_rng(seed)
    arrivals: list[float] = []
    t = 0.0
    while count is None or len(arrivals) < count:
        t += float(rng.exponential(1.0 / rate))
        if duration_s is not None and t >= duration_s:
            break
        arrivals.append(t)
    return arrivals


async def run_open_loop(
    send: Send,
    arrivals: Sequence[float],
    *,
    max_outstanding: int,
    progress: Progress | None = None,
) -> RunResult:
    """Sends request ``i`` at ``arrivals[i]`` seconds after the start, whatever earlier requests
    are doing. Latency runs from the scheduled time, so lateness of this loop counts too."""
    origin = time.perf_counter()
    result = RunResult(arrivals=len(arrivals), arrival_window_s=arrivals[-1] if arrivals else 0.0)
    tasks: list[asyncio.Task] = []
    outstanding: set[asyncio.Task] = set()

    def finished(task: asyncio.Task) -> None:
        outstanding.discard(task)
        if progress is not None:
            progress()

    for index, offset in enumerate(arrivals):
        delay = origin + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(outstanding) >= max_outstanding:
            result.dropped += 1
            if progress is not None:
                progress()
            continue
        task = asyncio.create_task(_timed(send, index, origin + offset, origin))
        tasks.append(task)
        outstanding.add(task)
        task.add_done_callback(finished)
    result.records = list(await asyncio.gather(*tasks))
    result.duration_s = time.perf_counter() - origin
    return result


def segment_path(model: str | None = None) -> str:
    """The segment route of ``model`` (None: the server's default model)."""
    return "/v1/segment" if model is None else f"/v1/models/{quote(model, safe='')}/segment"


class SegmentClient:
    """One shared ``httpx.AsyncClient`` posting the workload's images to the segment route of
    ``model`` (None: ``/v1/segment``), in turn (request ``i`` sends image ``i mod n``), as raw
    bodies with the query ``params``.

    - ``protocol``: what ``transfiner bench --protocol`` calls it; ``route``: the route template
      the server's request metrics label its requests with.
    - A client for another protocol overrides ``request`` and ``check``."""

    protocol = "v1"

    def __init__(
        self,
        url: str,
        images: Sequence[WorkloadImage],
        *,
        model: str | None = None,
        params: dict[str, str] | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_connections: int = 64,
    ) -> None:
        if not images:
            raise ValueError("the workload has no images")
        self.images = list(images)
        self.path = segment_path(model)
        self.route = MODEL_SEGMENT_ROUTE if model is not None else SEGMENT_ROUTE
        self.model = model
        self.params = dict(params or {})
        headers = {"X-API-Key": api_key} if api_key else {}
        # Enough connections for every request in flight: a smaller pool would queue requests
        # inside this client, where the server's queue-wait metric cannot see them.
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers=headers,
            timeout=timeout_s,
            limits=limits,
        )

    async def request(self, index: int) -> httpx.Response:
        """Sends request ``index`` (image ``index mod n``); the answer, read but not checked."""
        image = self.images[index % len(self.images)]
        return await self.http.post(
            self.path,
            content=image.data,
            params=self.params,
            headers={"Content-Type": image.content_type},
        )

    def check(self, response: httpx.Response) -> None:
        """Reads a success's body as a real client would; ``InvalidAnswer`` if it cannot."""
        try:
            json.loads(response.content)
        except ValueError:
            raise InvalidAnswer(f"status {response.status_code} with a body that is not JSON") from None

    async def send(self, index: int) -> int:
        response = await self.request(index)
        if response.is_success:
            self.check(response)
        return response.status_code

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> SegmentClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class OipHttpClient(SegmentClient):
    """The same workload as Open Inference Protocol requests over REST, to
    ``/v2/models/{model}/infer`` (``model`` is required), the image as binary tensor data and the
    answer asked for in binary too; ``params`` go as the request's parameters."""

    protocol = "v2-http"

    def __init__(self, url: str, images: Sequence[WorkloadImage], *, model: str | None = None, **options) -> None:
        if model is None:
            raise ValueError("the Open Inference Protocol names the model: pass one")
        super().__init__(url, images, model=model, **options)
        self.path = f"/v2/models/{quote(model, safe='')}/infer"
        self.route = "/v2/models/{name}/infer"
        parameters = {**{k: _json_value(v) for k, v in self.params.items()}, "binary_data_output": True}
        # Encoded once per image: the client's own work should not weigh on the comparison.
        self._bodies = [
            rest.encode_request(InferRequest([Tensor("image", "BYTES", (1,), [image.data])], parameters=parameters))
            for image in self.images
        ]

    async def request(self, index: int) -> httpx.Response:
        body, length = self._bodies[index % len(self._bodies)]
        return await self.http.post(self.path, content=body, headers={rest.HEADER_LENGTH: str(length)})

    def check(self, response: httpx.Response) -> None:
        length = response.headers.get(rest.HEADER_LENGTH)
        try:
            rest.parse_response(response.content, None if length is None else int(length))
        except (ValueError, TensorError):
            raise InvalidAnswer(
                f"status {response.status_code} with a body that is not an inference response"
            ) from None


def _json_value(value):
    """A parameter given as text (``--params score_threshold=0.5``) as JSON would carry it: a
    number or boolean where the text is one, else the text."""
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    return parsed if isinstance(parsed, (bool, int, float)) else value


# What the drivers count a gRPC call's status code as: the HTTP status the service answers the
# same refusal with over REST (a code the service never sends counts as 500).
GRPC_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
GRPC_PORT = 8001  # the service's default --grpc-port


class OipGrpcClient(SegmentClient):
    """The same workload as Open Inference Protocol calls over gRPC: ``ModelInfer`` on the
    generated stub (grpc.aio, one channel: HTTP/2 carries every call in flight) to ``grpc_target``
    (default: the url's host at port 8001), the image as raw BYTES contents, ``params`` as the
    request's parameters (strings).

    - ``request`` gives the outcome as an ``httpx.Response`` of the status the service answers the
      same refusal with over REST (``GRPC_HTTP_STATUS``), its body the serialised answer or the
      refusal's code and message, so the drivers and the test request treat every protocol alike.
    - The url still serves the models list and the metrics."""

    protocol = "v2-grpc"

    def __init__(
        self,
        url: str,
        images: Sequence[WorkloadImage],
        *,
        model: str | None = None,
        grpc_target: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        **options,
    ) -> None:
        if model is None:
            raise ValueError("the Open Inference Protocol names the model: pass one")
        super().__init__(url, images, model=model, api_key=api_key, timeout_s=timeout_s, **options)
        self.route = GRPC_INFER_ROUTE
        self.target = grpc_target or f"{urlsplit(url).hostname}:{GRPC_PORT}"
        # No size limit on this side: the server's is what a benchmark should meet.
        self.channel = grpc.aio.insecure_channel(
            self.target, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        )
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = (("x-api-key", api_key),) if api_key else ()
        self.timeout_s = timeout_s
        # Built once per image: the client's own work should not weigh on the comparison.
        self._requests = []
        for image in self.images:
            message = pb.ModelInferRequest(model_name=model)
            message.inputs.add(name="image", datatype="BYTES", shape=[1])
            message.raw_input_contents.append(len(image.data).to_bytes(4, "little") + image.data)
            set_parameters(message.parameters, self.params)
            self._requests.append(message)

    async def request(self, index: int) -> httpx.Response:
        try:
            answer = await self.stub.ModelInfer(
                self._requests[index % len(self._requests)], metadata=self.metadata, timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            text = f"{error.code().name}: {error.details()}"
            return httpx.Response(GRPC_HTTP_STATUS.get(error.code(), 500), text=text)
        return httpx.Response(200, content=answer.SerializeToString())

    def check(self, response: httpx.Response) -> None:
        answer = pb.ModelInferResponse.FromString(response.content)
        if len(answer.raw_output_contents) != len(answer.outputs) or not answer.outputs:
            raise InvalidAnswer("an inference response whose outputs and raw contents do not match")

    async def aclose(self) -> None:
        await self.channel.close()
        await super().aclose()


# ``transfiner bench --protocol``: each protocol's client (same constructor, same ``send``).
PROTOCOLS: dict[str, type[SegmentClient]] = {
    client.protocol: client for client in (SegmentClient, OipHttpClient, OipGrpcClient)
}
