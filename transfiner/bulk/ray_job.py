"""``transfiner predict --engine ray``: segment a data set on a Ray cluster with Ray Data.

The pipeline streams: the driver lists the inputs and leaves out what a resumed job has
committed; Ray Data reads and decodes the images in tasks, runs the model in ``map_batches`` on an
actor pool of replicas (each a ``Predictor``: a forward pass per canvas, as local ``predict`` and the
service), and hands each finished batch back to the driver, which commits JSON Lines shards
(``bulk.shards``). Ray Data's backpressure bounds what is in flight, so no stage holds the data
set; the driver holds its list of locations and the ids it has written.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transfiner.bulk.decode import DECODE_BATCH, DECODE_CPUS, decode_images
from transfiner.bulk.inputs import resolve_inputs
from transfiner.bulk.shards import ShardStore
from transfiner.export.resolve import ResolvedModel, resolve_model
from transfiner.model.inference.detections import coco_records
from transfiner.model.inference.naming import image_ids, overlay_names


@dataclass(frozen=True)
class ModelSpec:
    """The model every replica loads (``--model``, ``--backend``, ``--config``, ...)."""

    model: str  # as given: "default", a checkpoint, an export folder; it must exist on every node
    backend: str = "pytorch"
    config: str | None = None
    device: str = "auto"  # auto: CUDA on replicas given GPUs, else the CPU
    precision: str | None = None
    max_cells: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class PredictOptions:
    score_threshold: float | None = None
    max_detections: int | None = None
    mask_threshold: float = 0.5
    refine: bool = True


@dataclass(frozen=True)
class Scaling:
    """How many replicas, and what each holds (``--replicas`` or ``--min/--max-replicas``)."""

    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    def __post_init__(self) -> None:
        autoscaling = self.min_replicas is not None or self.max_replicas is not None
        if self.replicas is not None and autoscaling:
            raise ValueError("give --replicas or --min-replicas/--max-replicas, not both")
        if autoscaling and (self.min_replicas or 1) > (self.max_replicas or math.inf):
            raise ValueError("--min-replicas may not exceed --max-replicas")
        for name in ("replicas", "min_replicas", "max_replicas"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.replica_cpus <= 0 or self.replica_gpus < 0:
            raise ValueError("--replica-cpus must be above 0 and --replica-gpus at least 0")

    @property
    def least(self) -> int:
        """The replicas the pool starts with."""
        return self.replicas or self.min_replicas or 1

    @property
    def most(self) -> int:
        """The most replicas the pool may hold at once (autoscaling without a maximum: as many as fit)."""
        return self.max_replicas or self.replicas or self.min_replicas or 1

    def cpus_needed(self, replicas: int) -> float:
        """CPUs for ``replicas`` and one decode task (without the latter's room, replicas holding
        every CPU would starve the tasks that feed them)."""
        return replicas * self.replica_cpus + DECODE_CPUS

    def strategy(self):
        from ray.data import ActorPoolStrategy

        if self.min_replicas is None and self.max_replicas is None:
            return ActorPoolStrategy(size=self.replicas or 1)
        return ActorPoolStrategy(min_size=self.min_replicas or 1, max_size=self.max_replicas)


@dataclass(frozen=True)
class BulkJob:
    inputs: list[str]
    out: Path
    model: ModelSpec
    options: PredictOptions = field(default_factory=PredictOptions)
    scaling: Scaling = field(default_factory=Scaling)
    batch_size: int = 2  # images a replica takes at a time (a forward pass per canvas among them)
    shard_size: int = 1000  # images a shard commits
    resume: bool = False
    overlay: Path | None = None  # a folder every node can write to
    ray_address: str | None = None  # None or "local": a cluster started here; "auto" or HOST:PORT: join one
    coco_results: Path | None = None  # every committed shard merged into one COCO results file at the end


class JobFailed(RuntimeError):
    """The cluster could not finish the job; what was committed stays, and ``--resume`` continues it."""


@dataclass
class Summary:
    """What a run did: images segmented, failed and skipped (committed by an earlier run)."""

    total: int
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    shards: int = 0
    seconds: float = 0.0
    coco_instances: int | None = None  # records written to ``coco_results``

    def table(self) -> str:
        rate = self.succeeded / self.seconds if self.seconds else 0.0
        rows = [
            ("images", self.total),
            ("segmented", self.succeeded),
            ("failed (errors.jsonl)", self.failed),
            ("skipped (already committed)", self.skipped),
            ("shards committed", self.shards),
            ("seconds", f"{self.seconds:.1f}"),
            ("images/s", f"{rate:.2f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)


class Segmenter:
    """A replica: a ``Predictor`` in a Ray actor; decoded images in, JSON lines out."""

    def __init__(self, spec: ModelSpec, resolved: ResolvedModel, options: PredictOptions, overlay: Path | None):
        import ray
        import torch

        from transfiner.export.backends import load_backend
        from transfiner.model.inference.predictor import Predictor

        assigned = ray.get_runtime_context().get_assigned_resources()
        threads = max(1, int(assigned.get("CPU", 1)))
        torch.set_num_threads(threads)
        device = spec.device
        if device == "auto":
            device = "cuda" if assigned.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"
        backend = load_backend(
            resolved, spec.backend, spec.config, device, threads, precision=spec.precision, max_cells=spec.max_cells
        )
        self.predictor = Predictor.from_backend(backend)
        self.model = {"model": resolved.name, "version": resolved.weights_digest}
        self.options = asdict(options)  # Predictor.predict's keyword arguments
        self.overlay = overlay

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = range(len(batch["path"]))
        lines = [""] * len(rows)
        errors = [str(e) for e in batch["error"]]
        ok = [i for i in rows if not errors[i]]
        try:
            predictions = dict(zip(ok, self.predictor.predict([batch["image"][i] for i in ok], **self.options)))
        except Exception:  # noqa: BLE001 (one image that breaks the batch must not fail its batch-mates)
            predictions = {}
            for i in ok:
                try:
                    predictions[i] = self.predictor.predict([batch["image"][i]], **self.options)[0]
                except Exception as error:  # noqa: BLE001
                    errors[i] = f"cannot segment: {type(error).__name__}: {error}"
        for i, prediction in predictions.items():
            lines[i] = json.dumps(self._line(str(batch["image_id"][i]), str(batch["path"][i]), prediction))
            if self.overlay is not None:
                self._draw(batch["image"][i], prediction, str(batch["overlay"][i]))
        return {
            "image_id": batch["image_id"],
            "path": batch["path"],
            "line": np.array(lines, dtype=object),
            "error": np.array(errors, dtype=object),
        }

    def _line(self, image_id: str, path: str, prediction) -> dict[str, Any]:
        cfg, p = self.predictor.cfg, prediction
        height, width = p.image_size
        records = coco_records(
            image_id, p.boxes, p.scores, p.classes, cfg.category_ids, p.rles, class_names=cfg.class_names
        )
        instances = [{key: value for key, value in record.items() if key != "image_id"} for record in records]
        return {
            "image_id": image_id,
            "path": path,
            "height": height,
            "width": width,
            **self.model,
            "instances": instances,
        }

    def _draw(self, image: np.ndarray, prediction, name: str) -> None:
        from transfiner.model.inference.visualize import prediction_overlay

        prediction_overlay(image, prediction, self.predictor.cfg.class_names).save(self.overlay / name)


def job_settings(job: BulkJob, resolved: ResolvedModel) -> dict[str, Any]:
    """What the results depend on: a resumed job must match it."""
    return {
        "model": resolved.name,
        "version": resolved.weights_digest,
        "backend": job.model.backend,
        "precision": job.model.precision,
        "max_cells": list(job.model.max_cells) if job.model.max_cells else None,
        **asdict(job.options),
    }


def connect(address: str | None, scaling: Scaling) -> None:
    """Joins the cluster ``address`` names, or starts one here (None or "local") with room for
    ``scaling``; a cluster too small for the replicas the pool starts with is an error here, not a
    job that waits forever."""
    import ray

    quiet = {"logging_level": "WARNING", "log_to_driver": False}
    if not ray.is_initialized():
        if address in (None, "local"):
            # Logical CPUs: at least the machine's, and room for every replica and a decode task
            # (a replica's torch threads are its whole CPUs, so the decode slot costs little).
            cpus = max(os.cpu_count() or 1, math.ceil(scaling.cpus_needed(scaling.most)))
            ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    available = ray.cluster_resources()
    cpus, gpus = scaling.cpus_needed(scaling.least), scaling.least * scaling.replica_gpus
    if available.get("CPU", 0) < cpus or available.get("GPU", 0) < gpus:
        raise ValueError(
            f"the cluster has {available.get('CPU', 0):g} CPUs and {available.get('GPU', 0):g} GPUs; "
            f"{scaling.least} replicas of {scaling.replica_cpus:g} CPUs and {scaling.replica_gpus:g} GPUs, "
            f"plus {DECODE_CPUS:g} CPU for decoding, need more: fewer --replicas or a smaller --replica-cpus"
        )


def run(job: BulkJob, progress: bool | None = None) -> Summary:
    """Runs the job to its end; what was committed stays committed if it fails."""
    import ray
    from tqdm import tqdm

    locations = resolve_inputs(job.inputs)
    ids = image_ids(locations)
    overlays = overlay_names(locations) if job.overlay else [""] * len(ids)
    resolved = resolve_model(job.model.model, job.model.backend)
    store = ShardStore(job.out, job_settings(job, resolved))
    committed = store.open(job.resume)
    todo = [
        {"image_id": image_id, "path": location, "overlay": overlay}
        for image_id, location, overlay in zip(ids, locations, overlays)
        if image_id not in committed.image_ids
    ]
    summary = Summary(total=len(ids), skipped=len(ids) - len(todo))
    if job.overlay:
        job.overlay.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if todo:
        connect(job.ray_address, job.scaling)
        _quiet_ray_data()
        dataset = (
            ray.data.from_items(todo, override_num_blocks=_blocks(len(todo), job.scaling.most))
            .map_batches(decode_images, batch_size=None, num_cpus=DECODE_CPUS)  # a block at a time
            .map_batches(
                Segmenter,
                fn_constructor_args=(job.model, resolved, job.options, job.overlay),
                batch_size=job.batch_size,
                compute=job.scaling.strategy(),
                num_cpus=job.scaling.replica_cpus,
                num_gpus=job.scaling.replica_gpus or None,
            )
        )
        results: list[dict] = []
        errors: list[dict] = []
        seen = set(committed.image_ids)  # a retried task's rows come back once more: written once
        bar = tqdm(total=len(todo), desc="predict", unit="img", disable=None if progress is None else not progress)
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for image_id, path, line, error in zip(batch["image_id"], batch["path"], batch["line"], batch["error"]):
                    image_id = str(image_id)
                    if image_id in seen:
                        continue
                    seen.add(image_id)
                    if error:
                        errors.append({"image_id": image_id, "path": str(path), "error": str(error)})
                    else:
                        results.append(json.loads(line))
                    bar.update()
                    if len(results) + len(errors) >= job.shard_size:
                        _commit(store, results, errors, summary)
                bar.set_postfix(failed=summary.failed + len(errors), refresh=False)
        except Exception as error:  # noqa: BLE001 (Ray's errors, a replica's failure to load the model)
            raise JobFailed(
                f"the job stopped ({type(error).__name__}: {error}); {summary.succeeded + len(results)} images "
                f"segmented and {summary.failed + len(errors)} failed are committed in {job.out}: run it again "
                "with --resume to go on"
            ) from error
        finally:
            bar.close()
            _commit(store, results, errors, summary)  # what arrived is whole: keep it
            store.close()
    summary.seconds = time.monotonic() - started
    if job.coco_results is not None:
        records = store.coco_results()
        job.coco_results.parent.mkdir(parents=True, exist_ok=True)
        job.coco_results.write_text(json.dumps(records))
        summary.coco_instances = len(records)
    return summary


def _blocks(images: int, replicas: int) -> int:
    """Blocks (what Ray Data schedules and backpressures) for ``images``: small enough that every
    replica gets work from the start, at most DECODE_BATCH images each."""
    return min(images, max(math.ceil(images / DECODE_BATCH), 4 * replicas))


def _commit(store: ShardStore, results: list[dict], errors: list[dict], summary: Summary) -> None:
    if not results and not errors:
        return
    store.commit(results, errors)
    summary.succeeded += len(results)
    summary.failed += len(errors)
    summary.shards += 1
    results.clear()
    errors.clear()


def _quiet_ray_data() -> None:
    """The driver shows one progress bar (ours); Ray Data's per-operator bars would fight it."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.execution_options.verbose_progress = False
