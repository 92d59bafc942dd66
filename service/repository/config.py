"""A model's ``config.yaml`` in the repository: per-model serving settings and its version policy.

- Every key is optional and sets, for this model only, what the ``transfiner serve`` flag of the
  same name sets for all of them (backend, precision, device, workers, batching knobs ...).
- ``version_policy``: ``{latest: N}`` (default ``{latest: 1}``), ``{specific: [1, 3]}`` or ``{all: true}``,
  as Triton's model repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from transfiner.model.config import parse_max_cells

CONFIG_FILE = "config.yaml"


class ConfigError(ValueError):
    """A model's ``config.yaml`` cannot be read or holds a setting that does not exist or fit."""


class VersionPolicy(BaseModel):
    """Which of a model's versions on disk are served (exactly one of the three)."""

    model_config = ConfigDict(extra="forbid")

    latest: Annotated[int, Field(ge=1)] | None = None
    specific: list[Annotated[int, Field(ge=1)]] | None = None
    all: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> VersionPolicy:
        given = [name for name in ("latest", "specific", "all") if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("give exactly one of latest: N, specific: [versions] or all: true")
        return self

    def select(self, versions: list[int]) -> list[int]:
        """The versions to serve among ``versions`` (those on disk), newest first."""
        newest_first = sorted(versions, reverse=True)
        if self.all:
            return newest_first
        if self.specific is not None:
            return [v for v in newest_first if v in self.specific]
        return newest_first[: self.latest]


class ModelFileConfig(BaseModel):
    """What a model's ``config.yaml`` may set (``ServiceSettings`` fields of the same names)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    backend: Literal["pytorch", "torchscript", "onnxruntime"] | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = None
    max_cells: tuple[int, int, int] | None = None
    config: str | None = None
    device: str | None = None
    workers: Annotated[int, Field(ge=1, le=64)] | None = None
    worker_process: bool | None = None
    torch_threads: Annotated[int, Field(ge=1)] | None = None
    max_batch_size: Annotated[int, Field(ge=1, le=256)] | None = None
    max_delay_ms: Annotated[float, Field(ge=0, le=10_000)] | None = None
    max_arrival_wait_ms: Annotated[float, Field(ge=0, le=10_000)] | None = None
    max_batch_pixels: Annotated[int, Field(ge=1)] | None = None
    max_queue_size: Annotated[int, Field(ge=1)] | None = None
    max_client_inflight: Annotated[int, Field(ge=0)] | None = None
    max_queued_bytes: Annotated[int, Field(ge=1)] | None = None
    warmup_batches: Annotated[int, Field(ge=0)] | None = None
    version_policy: VersionPolicy = Field(default_factory=lambda: VersionPolicy(latest=1))

    @field_validator("max_cells", mode="before")
    @classmethod
    def _parse_max_cells(cls, value: object) -> object:
        return parse_max_cells(value) if isinstance(value, str) else value

    def settings(self) -> dict:
        """The serving settings this file sets (the version policy is the repository's)."""
        return self.model_dump(exclude_none=True, exclude={"version_policy"})


def read_model_config(folder: Path) -> ModelFileConfig:
    """``folder/config.yaml`` (defaults when there is none); raises ``ConfigError`` saying what is wrong."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return ModelFileConfig()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot be read as YAML: {error}") from None
    if data is None:
        return ModelFileConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return ModelFileConfig.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors(include_url=False)
        )
        raise ConfigError(f"{path}: {problems}") from None
