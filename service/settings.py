"""Service settings: environment variables ``TRANSFINER_*``, overridden by ``transfiner serve`` flags."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from transfiner.model.config import parse_max_cells
from transfiner.model.inference.predictor import parse_device


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as a container's cpuset sets)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class ServiceSettings(BaseSettings):
    """Everything the service can be told; each field is also ``TRANSFINER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="TRANSFINER_", extra="ignore", protected_namespaces=())

    # Model
    model: str = Field(
        "default",
        description="'default' (the shipped model), a checkpoint path, or (for the torchscript and "
        "onnxruntime backends) a `transfiner export` folder",
    )
    model_repository: str | None = Field(
        None,
        description="a folder of models, NAME/VERSION/ (a checkpoint or an export folder each) with an optional "
        "NAME/config.yaml; served instead of `model`",
    )
    default_model: str | None = Field(
        None, description="the model POST /v1/segment answers with (default: the only one, or `default` for --model)"
    )
    repository_poll_s: float | None = Field(
        None, gt=0, description="look for new, changed and removed versions in the repository this often"
    )
    max_loaded_models: int | None = Field(None, ge=1, description="models loaded at once; a load beyond it is refused")
    max_model_host_bytes: int | None = Field(
        None, ge=1, description="host memory for the weights of all loaded versions; a load beyond it is refused"
    )
    max_model_gpu_bytes: int | None = Field(
        None, ge=1, description="GPU memory for the weights of all loaded versions; a load beyond it is refused"
    )
    backend: Literal["pytorch", "torchscript", "onnxruntime"] = Field(
        "pytorch", description="runtime; torchscript/onnxruntime export a checkpoint once into a cache folder"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA devices that support it, else fp32 (exported models: fp32)"
    )
    max_cells: Annotated[tuple[int, int, int] | None, NoDecode] = Field(
        None,
        description="node caps per quadtree level as A,B,C (default: the checkpoint's; 784,784,784 selects "
        "exactly the official nodes, smaller is faster); exported models keep their own",
    )
    config: str | None = Field(None, description="preset name, only for checkpoints that hold no config")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    workers: int | None = Field(
        None, ge=1, le=64, description="model workers; default one per GPU (round robin), else 1 on CPU"
    )
    worker_process: bool | None = Field(
        None,
        description="run each model worker in a process of its own, so the thread that launches its "
        "kernels never waits for the GIL held by HTTP, decoding or post-processing; default (None): on CUDA "
        "devices yes, on the CPU no",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads of torch (and of ONNX Runtime sessions); default: theirs"
    )

    # HTTP
    host: str = "127.0.0.1"  # 0.0.0.0 in containers, via TRANSFINER_HOST
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="if set, /v1/* needs X-API-Key or a Bearer token")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_body_bytes_total: int = Field(
        1024 * 1024 * 1024,
        ge=1024,
        description="the bytes of all request bodies held at once (received so far, "
        "until their request ends); beyond it 503 memory_budget + Retry-After, so many large uploads at once "
        "cannot exhaust the memory",
    )
    max_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb guard: width x height")
    body_timeout_s: float = Field(
        10.0, gt=0, description="a request body must arrive within this, else 408 (before any queue place is taken)"
    )
    head_timeout_s: float = Field(10.0, gt=0, description="request line and headers must arrive within this")
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after this")
    max_connections: int = Field(1000, ge=1, description="open connections and requests at once; beyond: 503")
    log_level: str = "info"
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: as a person reads it; json: one object a line (time, level, logger, message, and the "
        "request log's ids, route, status, model and times), uvicorn's access and error log included",
    )
    demo: bool = Field(True, description="serve the browser demo page at / and /demo (TRANSFINER_DEMO=false: 404)")

    # gRPC: the Open Inference Protocol's inference.GRPCInferenceService, with the standard health
    # and reflection services, on host:grpc_port beside HTTP (same process, same event loop)
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="the Open Inference Protocol over gRPC on this port (0: no gRPC server)"
    )
    grpc_max_message_bytes: int | None = Field(
        None,
        ge=1024,
        description="largest gRPC message received or sent (beyond it RESOURCE_EXHAUSTED); default: max_body_bytes",
    )

    # Batching
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=256,
        description="images per forward pass; default (None): 8 where a model worker is on a GPU, 4 on the CPU",
    )
    max_delay_ms: float = Field(5.0, ge=0, le=10_000, description="how long a batch waits to fill")
    max_arrival_wait_ms: float = Field(
        100.0,
        ge=0,
        le=10_000,
        description="how long a batch that is not full waits for requests still being "
        "decoded (never longer than a recent batch took; 0: not at all)",
    )
    max_batch_pixels: int | None = Field(
        None, ge=1, description="cap on batch size x padded network-input pixels (None: no cap)"
    )
    max_queue_size: int = Field(64, ge=1, description="requests waiting beyond what the workers hold")
    max_client_inflight: int = Field(0, ge=0, description="per client (API key or address); 0: no limit -> 429")
    max_queued_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1,
        description="pixels held by admitted requests (decoded, at network size); beyond it 503 + Retry-After",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="deadline when X-Request-Timeout is absent")
    max_request_timeout_s: float = Field(300.0, gt=0)

    # Threads off the event loop (decoding and resizing, pasting and encoding: all release the GIL
    # for most of their time, so one per core keeps the cores busy)
    decode_threads: int = Field(default_factory=available_cores, ge=1, description="default: the cores")
    postprocess_threads: int = Field(default_factory=available_cores, ge=1, description="default: the cores")
    gil_switch_interval_ms: float = Field(
        5.0,
        gt=0,
        le=1000,
        description="Python's thread switch interval in this process (sys.setswitchinterval); "
        "a worker thread that launches many small kernels waits up to this long for the GIL at each while "
        "another thread runs Python",
    )
    keep_freed_memory: bool | None = Field(
        None,
        description="keep the memory each upload's buffers freed in this process for the next upload "
        "(glibc), instead of faulting fresh pages in for every request; default (None): when no model runs on "
        "the CPU in this process (worker processes, CUDA workers)",
    )

    # Lifecycle
    warmup_batches: int = Field(1, ge=0)
    drain_timeout_s: float = Field(30.0, ge=0, description="SIGTERM: longest wait for in-flight work")
    shutdown_grace_s: float = Field(
        0.0, ge=0, description="SIGTERM: minimum time readiness reports 503 before the port closes"
    )

    @property
    def grpc_message_bytes(self) -> int:
        """``grpc_max_message_bytes``, or the HTTP body limit when unset."""
        return self.grpc_max_message_bytes or self.max_body_bytes

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        # Here, not at the first forward pass: TRANSFINER_DEVICE=tpu must fail as one line.
        if value != "auto" and parse_device(value).type not in ("cpu", "cuda"):
            raise ValueError(f"the service runs on cpu, cuda, cuda:N or auto, not {value!r}")
        return value

    @field_validator("max_cells", mode="before")
    @classmethod
    def _parse_max_cells(cls, value: object) -> object:
        # TRANSFINER_MAX_CELLS=784,196,64 (the flag's form), not JSON.
        return parse_max_cells(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError("request_timeout_s must not exceed max_request_timeout_s")
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"grpc_port and port are both {self.port}: give gRPC a port of its own")
        if self.max_body_bytes_total < self.max_body_bytes:  # else one allowed body could never fit
            raise ValueError("max_body_bytes_total must be at least max_body_bytes")
        return self
