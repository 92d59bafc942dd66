"""The loaded models: which versions of which models serve, and their loading and unloading.

- Where models come from: a repository folder (``model_repository``: ``NAME/VERSION/`` folders,
  ``service.repository``), or one ``--model`` served as the model ``default`` (its one version
  named by its weights' digest).
- ``sync`` compares what is on disk with what is loaded: wanted versions that are new load and
  warm up in the background; a version no longer wanted unloads (after draining what it admitted)
  once a newer wanted version is READY, or at once when its folder is gone. A version that fails
  leaves the serving one untouched, and is not tried again until its files change.
- Requests go to a model's newest READY version (or the version they name); finding it and taking
  an admission place happen with no await in between, so a request admitted by a version that
  then starts unloading is still answered by it.
- The budget (``max_loaded_models``, host and GPU bytes of weights) refuses a load that would not
  fit, with a clear error, rather than running out of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from transfiner.service.engine.loading import resolved_settings, worker_devices
from transfiner.service.engine.model_version import BatcherFactory, ModelLoader, ModelVersion, load_model
from transfiner.service.engine.segmenting import ByteBudget
from transfiner.service.engine.turns import DeviceTurns
from transfiner.service.errors import ServiceError
from transfiner.service.metrics import ServiceMetrics
from transfiner.service.repository.layout import (
    VERSION_PATTERN,
    ModelFolder,
    RepositoryError,
    scan_repository,
    signature,
    version_model_path,
)
from transfiner.service.settings import ServiceSettings
from transfiner.service.telemetry.tracing import NO_TRACING, Tracing

log = logging.getLogger("service")

SINGLE_MODEL = "default"  # what ``--model SPEC`` is called


@dataclass
class ManagedModel:
    """One model's versions on record (loading, ready, unloading or failed)."""

    name: str
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    signatures: dict[str, tuple | None] = field(default_factory=dict)  # version -> its files when last loaded
    error: str | None = None  # its config.yaml's problem, if any
    wanted: set[str] = field(default_factory=set)  # the versions its policy serves, as last synced
    served: bool = False  # has served: readiness waits for it from then on
    unloaded: bool = False  # unloaded on request: polls leave it alone until it is loaded again
    gone: bool = False  # its folder left the repository: forgotten once its versions have unloaded

    def newest_ready(self) -> ModelVersion | None:
        ready = [v for v in self.versions.values() if v.state == "READY"]
        return max(ready, key=lambda v: version_order(v.version), default=None)


def version_order(version: str) -> tuple[int, str]:
    """Repository versions sort by number; a digest (``--model``) is its model's only version."""
    return (int(version), "") if VERSION_PATTERN.fullmatch(version) else (0, version)


@dataclass(frozen=True)
class VersionSource:
    """A version as found on disk: the settings it loads with, or why it cannot be loaded."""

    settings: ServiceSettings | None
    signature: tuple | None
    error: str | None = None


class ModelManager:
    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
        pools: tuple[Executor, Executor],
        loader: ModelLoader = load_model,
        batcher_factory: BatcherFactory | None = None,
        settings_for: Callable[[ServiceSettings], ServiceSettings] = resolved_settings,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing
        self.root = Path(settings.model_repository) if settings.model_repository else None
        self.default_name = settings.default_model or (SINGLE_MODEL if self.root is None else None)
        self.models: dict[str, ManagedModel] = {}
        self.total_bytes = ByteBudget(settings.max_queued_bytes)
        self._pools = pools
        self._loader = loader
        self._batcher_factory = batcher_factory
        self._settings_for = settings_for  # a version's settings as they run (Ray: one worker per replica)
        self._turns: dict[str, DeviceTurns] = {}
        self._loads: dict[tuple[str, str], asyncio.Task] = {}
        self._unloads: set[asyncio.Task] = set()
        self._sync_lock = asyncio.Lock()
        self._poll_task: asyncio.Task | None = None
        self._started = False  # the first sync has loaded (or failed) every model

    # -- what serves -------------------------------------------------------------------------

    def find(self, name: str | None, version: str | None = None) -> ModelVersion:
        """The version that answers a request for model ``name`` (None: the default model), at
        ``version`` or its newest READY one; ``ServiceError`` 404 for an unknown model or version,
        503 while it is still loading."""
        if name is None:
            name = self.default_name or (next(iter(self.models)) if len(self.models) == 1 else None)
            if name is None:
                raise ServiceError(
                    404,
                    "no_default_model",
                    "no default model: name one with --default-model, or use /v1/models/{name}/segment "
                    f"(models: {', '.join(sorted(self.models)) or 'none'})",
                    reason="unknown_model",
                )
        model = self.models.get(name)
        if model is None or (not model.versions and model.error is None):
            raise ServiceError(
                404,
                "model_not_found",
                f"no model {name!r} (models: {', '.join(sorted(self.models)) or 'none'})",
                reason="unknown_model",
            )
        if version is not None:
            found = model.versions.get(version)
            if found is None or found.state in ("UNLOADING",):
                known = ", ".join(v for v, mv in model.versions.items() if mv.state == "READY") or "none"
                raise ServiceError(
                    404,
                    "version_not_found",
                    f"model {name!r} has no version {version!r} being served (ready: {known})",
                    reason="unknown_model",
                )
            return self._usable(found)
        newest = model.newest_ready()
        if newest is not None:
            return newest
        loading = [v for v in model.versions.values() if v.state == "LOADING"]
        if loading:
            raise ServiceError(503, "not_ready", f"model {name!r} is loading", reason="not_ready", retry_after=5)
        why = model.error or "; ".join(
            f"version {v.version}: {v.error}" for v in model.versions.values() if v.error is not None
        )
        raise ServiceError(
            404,
            "model_unavailable",
            f"model {name!r} has no version ready ({why or 'unloaded'})",
            reason="unknown_model",
        )

    @staticmethod
    def _usable(version: ModelVersion) -> ModelVersion:
        if version.state == "LOADING":
            raise ServiceError(
                503,
                "not_ready",
                f"model {version.name!r} version {version.version} is loading",
                reason="not_ready",
                retry_after=5,
            )
        if version.state != "READY":
            raise ServiceError(
                404,
                "version_unavailable",
                f"model {version.name!r} version {version.version} is unavailable: {version.error}",
                reason="unknown_model",
            )
        return version

    @contextlib.asynccontextmanager
    async def admission(
        self, name: str | None, version: str | None, client: str, deadline: float | None
    ) -> AsyncIterator[ModelVersion]:
        """The version for the request, with an admission place held in it (``ModelVersion.admission``)."""
        found = self.find(name, version)
        async with found.admission(client, deadline):
            yield found

    @property
    def ready(self) -> bool:
        """Every model that must be served is: each that has served (and was not unloaded on
        purpose, nor removed from disk) and the default model, once the first load is done."""
        return self._started and not self.not_ready()

    def not_ready(self) -> list[str]:
        """What keeps readiness at 503 (empty when ready)."""
        waiting = []
        for model in self.models.values():
            must = model.served or model.name == self.default_name
            if not must or model.unloaded:
                continue
            newest = model.newest_ready()
            if newest is None:
                waiting.append(f"model {model.name} has no version ready")
            elif newest.workers_down():
                down = ", ".join(map(str, newest.workers_down()))
                waiting.append(f"model {model.name}: worker process {down} is starting again")
        if self.default_name is not None and self.default_name not in self.models and self._started:
            waiting.append(f"the default model {self.default_name} is not in the repository")
        return waiting

    def loaded(self) -> list[ModelVersion]:
        return [v for m in self.models.values() for v in m.versions.values() if v.state in ("LOADING", "READY")]

    def all_versions(self) -> list[ModelVersion]:
        return [v for m in self.models.values() for v in m.versions.values()]

    def index(self) -> list[dict]:
        """Every model version on record, as Triton's repository index: name, version, state, reason."""
        rows = []
        for name in sorted(self.models):
            model = self.models[name]
            if not model.versions:
                row = {"name": name, "state": "UNAVAILABLE"}
                if model.error or model.unloaded:
                    row["reason"] = model.error or "unloaded"
                rows.append(row)
            for version in sorted(model.versions.values(), key=lambda v: version_order(v.version)):
                row = {"name": name, "version": version.version, "state": version.state}
                if version.error is not None:
                    row["reason"] = version.error
                elif model.error is not None:
                    row["reason"] = model.error
                rows.append(row)
        return rows

    # -- loading and unloading ---------------------------------------------------------------

    async def start(self) -> None:
        """Loads every model (waits for their first loads); then polls, if asked to."""
        await self.sync()
        await self.wait_loads()
        self._started = True
        if self.root is not None and self.settings.repository_poll_s:
            self._poll_task = asyncio.create_task(self._poll(), name="transfiner-repository-poll")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.sync()
            except Exception:  # noqa: BLE001 - the next poll tries again
                log.exception("the model repository could not be read")

    async def wait_loads(self, name: str | None = None) -> None:
        tasks = [task for (model, _), task in self._loads.items() if name is None or model == name]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def load(self, name: str) -> None:
        """Loads model ``name`` (again) from the repository and waits until its versions are up;
        ``ServiceError`` 404 if it is not there, 400 if none of its versions could be loaded."""
        model = self.models.get(name)
        if self.root is None and name != SINGLE_MODEL:
            raise ServiceError(404, "model_not_found", f"no model {name!r} (this server serves one model, 'default')")
        if model is not None:
            model.unloaded = False
        await self.sync(only=name)
        await self.wait_loads(name)
        model = self.models.get(name)
        if model is None:
            raise ServiceError(404, "model_not_found", f"no model {name!r} in the repository")
        if model.newest_ready() is None:
            reasons = model.error or "; ".join(
                f"version {v.version}: {v.error}" for v in model.versions.values() if v.error
            )
            raise ServiceError(400, "load_failed", f"model {name!r} could not be loaded: {reasons or 'no versions'}")

    async def unload(self, name: str) -> None:
        """Unloads every version of model ``name`` (admitted requests finish first)."""
        model = self.models.get(name)
        if model is None:
            raise ServiceError(404, "model_not_found", f"no model {name!r}")
        model.unloaded, model.served = True, False
        async with self._sync_lock:
            versions = list(model.versions.values())
        await asyncio.gather(*(self._retire(model, v) for v in versions))

    async def sync(self, only: str | None = None) -> None:
        """Brings what is loaded in line with what is on disk (all models, or ``only`` that one)."""
        async with self._sync_lock:
            found = await asyncio.to_thread(self._scan)
            names = [only] if only is not None else sorted(set(found) | set(self.models))
            for name in names:
                folder = found.get(name)
                model = self.models.get(name)
                if folder is None:
                    if model is not None:  # gone from disk: its versions unload after draining
                        model.served, model.gone, model.wanted = False, True, set()
                        for version in list(model.versions.values()):
                            self._retire_later(model, version)
                        if not model.versions:
                            del self.models[name]
                    continue
                error, sources, on_disk = folder
                model = self.models.setdefault(name, ManagedModel(name))
                model.gone = False
                if model.unloaded:
                    continue
                model.error, model.wanted = error, set(sources)
                for version, source in sources.items():
                    self._load_if_new(model, version, source)
                self._retire_unwanted(model, on_disk)

    def _scan(self) -> dict[str, tuple[str | None, dict[str, VersionSource], set[str]]]:
        """Blocking: model -> (config error, wanted versions' sources, versions on disk)."""
        if self.root is None:
            settings = self._settings_for(self.settings)
            return {SINGLE_MODEL: (None, {self._single_version(): VersionSource(settings, None)}, set())}
        try:
            folders = scan_repository(self.root)
        except RepositoryError as error:
            log.error("%s", error)
            return {}
        return {
            name: (folder.error, self._sources(folder), set(map(str, folder.versions)))
            for name, folder in folders.items()
        }

    def _single_version(self) -> str:
        from transfiner.export.resolve import resolve_model

        return resolve_model(self.settings.model, self.settings.backend).weights_digest

    def _sources(self, folder: ModelFolder) -> dict[str, VersionSource]:
        sources = {}
        overrides = folder.config.settings() if folder.config is not None else {}
        for number in folder.wanted():
            path = folder.versions[number]
            try:
                sig = signature(path)
                settings = self.settings.model_copy(update={**overrides, "model": str(version_model_path(path))})
                settings = self._settings_for(type(self.settings).model_validate(settings.model_dump()))
                sources[str(number)] = VersionSource(settings, sig)
            except (OSError, ValueError) as error:
                sources[str(number)] = VersionSource(None, None, str(error))
        return sources

    def _load_if_new(self, model: ManagedModel, version: str, source: VersionSource) -> None:
        existing = model.versions.get(version)
        if existing is not None and existing.state in ("LOADING", "READY", "UNLOADING"):
            return  # a version's files are not reloaded in place: a new version is a new folder
        if existing is not None and model.signatures.get(version) == source.signature:
            return  # it failed with these very files: tried again once they change
        if existing is not None:
            self.metrics.forget_version(model.name, version)
        pools = self._pools
        mv = ModelVersion(
            model.name,
            version,
            source.settings or self.settings,
            self.metrics.for_version(model.name, version),
            pools,
            self._device_turns,
            self.total_bytes,
            self._loader,
            self._batcher_factory,
            tracing=self.tracing,
        )
        model.versions[version] = mv
        model.signatures[version] = source.signature
        refusal = source.error or self._over_budget(mv)
        if refusal is not None:
            self._failed(mv, refusal)
            return
        self.metrics.set_state(model.name, version, "LOADING")
        task = asyncio.create_task(self._load(model, mv), name=f"transfiner-load-{model.name}-{version}")
        self._loads[mv.key] = task
        task.add_done_callback(lambda _: self._loads.pop(mv.key, None))

    async def _load(self, model: ManagedModel, version: ModelVersion) -> None:
        if await version.load():
            self.metrics.set_state(model.name, version.version, "READY")
            model.served = True
            # Traffic has moved to the newest ready version: older unwanted ones can go.
            async with self._sync_lock:
                self._retire_unwanted(model, on_disk=None)
        elif version.state == "UNAVAILABLE":
            self._failed(version, version.error or "failed")

    def _failed(self, version: ModelVersion, error: str) -> None:
        version.state, version.error = "UNAVAILABLE", error
        self.metrics.set_state(version.name, version.version, "UNAVAILABLE")
        self.metrics.model_load_failures.labels(model=version.name).inc()
        log.error("model %s version %s is unavailable: %s", version.name, version.version, error)

    def _retire_unwanted(self, model: ManagedModel, on_disk: set[str] | None) -> None:
        """Unloads the versions its policy no longer wants once a wanted version serves, or at
        once when their folder is gone (``on_disk``: the versions on disk; None: not looked at)."""
        newest = model.newest_ready()
        for version in list(model.versions.values()):
            if version.version in model.wanted:
                continue
            gone = on_disk is not None and self.root is not None and version.version not in on_disk
            replaced = newest is not None and newest.version in model.wanted
            if version.state == "UNAVAILABLE" and (gone or replaced):
                del model.versions[version.version]
                self.metrics.forget_version(model.name, version.version)
                self.metrics.forget_state(model.name, version.version)
            elif version.state in ("READY", "LOADING") and (gone or replaced):
                self._retire_later(model, version)

    def _retire_later(self, model: ManagedModel, version: ModelVersion) -> None:
        task = asyncio.create_task(self._retire(model, version), name=f"transfiner-unload-{model.name}")
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _retire(self, model: ManagedModel, version: ModelVersion) -> None:
        load = self._loads.get(version.key)
        self.metrics.set_state(model.name, version.version, "UNLOADING")
        await version.unload(self.settings.drain_timeout_s)
        if load is not None and not load.done():  # it sees UNLOADING and stops the workers it started
            with contextlib.suppress(BaseException):
                await load
        if model.versions.get(version.version) is version:
            del model.versions[version.version]
        self.metrics.forget_version(model.name, version.version)
        self.metrics.forget_state(model.name, version.version)
        if model.gone and not model.versions and self.models.get(model.name) is model:
            del self.models[model.name]

    def _device_turns(self, device: str) -> DeviceTurns:
        return self._turns.setdefault(device, DeviceTurns())

    def _over_budget(self, version: ModelVersion) -> str | None:
        """Why loading ``version`` would not fit the budget (None if it fits)."""
        settings = self.settings
        others = [v for v in self.loaded() if v is not version]
        names = {v.name for v in others}
        limit = settings.max_loaded_models
        if limit is not None and version.name not in names and len(names) >= limit:
            return f"refused: {len(names)} models are loaded and max_loaded_models is {limit}"
        need_host, need_gpu = weight_bytes(version.settings)
        for need, budget, where in (
            (need_host, settings.max_model_host_bytes, "host"),
            (need_gpu, settings.max_model_gpu_bytes, "GPU"),
        ):
            if budget is None or not need:
                continue
            held = sum(weight_bytes(v.settings)[where == "GPU"] for v in others)
            if held + need > budget:
                return (
                    f"refused: its weights need {need} bytes of {where} memory; the loaded versions hold {held} "
                    f"of the budget of {budget} (max_model_{where.lower()}_bytes)"
                )
        return None

    async def close(self) -> None:
        """Stops polling and loading, and unloads every version (after the drain)."""
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(BaseException):
                await self._poll_task
        for task in list(self._loads.values()):
            task.cancel()
        await asyncio.gather(*self._loads.values(), return_exceptions=True)
        await asyncio.gather(*self._unloads, return_exceptions=True)
        await asyncio.gather(*(v.unload(0.0) for v in self.all_versions()), return_exceptions=True)


def weight_bytes(settings: ServiceSettings) -> tuple[int, int]:
    """(host, GPU) bytes of a version's weights: its weight files' size, once per device copy (a
    worker process holds a copy of its own; in-process workers on one device share one)."""
    path = Path(settings.model)
    try:
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    except OSError:
        return 0, 0
    devices = worker_devices(settings.device, settings.workers)
    copies = len(devices) if settings.worker_process else len(set(devices))
    on_gpu = sum(1 for d in devices if d.type == "cuda")
    gpu_copies = copies if on_gpu else 0
    return size * (copies if not on_gpu else 1), size * gpu_copies
