"""``transfiner train``: iteration-based training on any COCO-format data set, CPU or GPU.

Writes into ``--out``:

- ``last.pth``: everything needed to ``--resume``;
- ``model_final.pth``: our inference checkpoint;
- ``config.json``: the model config and the solver;
- ``metrics.jsonl``: one line per logged iteration; ``loss_curve.png``;
- with ``--val``, an evaluation report in ``eval/``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from transfiner.model.config import ModelConfig, preset, small_config
from transfiner.model.datasets.coco import CocoDataset, DatasetError, TrainingSample, make_loader
from transfiner.model.evaluation.evaluate import evaluate, evaluation_dataset
from transfiner.model.inference.predictor import Predictor, resolve_device
from transfiner.model.inference.preprocess import pad_batch, padded_shape
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.training.losses import TrainingLosses
from transfiner.model.weights.checkpoint import TRAIN_STATE_FORMAT, load_checkpoint, save_checkpoint
from transfiner.model.weights.files import CheckpointError, load_torch_file

# What a run writes into its --out folder.
RUN_FILES = ("last.pth", "model_final.pth", "config.json", "metrics.jsonl", "loss_curve.png", "eval")


class TrainingDiverged(ValueError):
    """The loss stopped being a finite number: the learning rate is too high for this data and batch."""


@dataclass
class SolverConfig:
    iters: int = 3000
    batch_size: int = 4
    optimizer: str = "sgd"  # or "adamw"
    lr: float = 0.005  # default_lr("sgd", 4)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 200
    warmup_factor: float = 0.001
    steps: tuple[float, ...] = (0.75, 0.9)  # fractions of `iters` where the lr drops by `gamma`
    gamma: float = 0.1
    clip_grad: float | None = None  # max gradient norm
    amp: bool = True  # mixed precision, used on CUDA only
    checkpoint_period: int = 500
    log_period: int = 20
    seed: int = 0
    workers: int = 0
    semantic_loss: bool = True
    boundary_loss: bool = True

    def lr_at(self, iteration: int) -> float:
        """Linear warm-up, then step decay (detectron2's WarmupMultiStepLR)."""
        factor = self.gamma ** sum(iteration >= int(s * self.iters) for s in self.steps)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return self.lr * factor


def default_lr(optimizer: str, batch_size: int) -> float:
    """SGD: detectron2's 0.02 for 16 images a batch, scaled linearly to the batch (the full 0.02
    diverges at small batches: README, "Train and evaluate"); AdamW: the rate the shipped default
    model was trained with."""
    return 0.02 * batch_size / 16 if optimizer == "sgd" else 0.0004


def model_config_for_data(name: str | ModelConfig, dataset: CocoDataset) -> ModelConfig:
    """The preset with the data set's classes (the head sizes follow the number of classes).

    A ``ModelConfig`` is used as it is, after checking that its classes are the data set's."""
    names, ids = tuple(dataset.class_names), tuple(dataset.category_ids)
    if isinstance(name, ModelConfig):
        if (name.class_names, name.category_ids) != (names, ids):
            raise ValueError(f"config classes {name.class_names} differ from the data set's {names}")
        return name
    if name == "small":
        return small_config(names, ids)
    cfg = preset(name)
    if names == cfg.class_names and ids == cfg.category_ids:
        return cfg
    heads = dataclasses.replace(cfg.roi_heads, num_classes=len(names))
    return dataclasses.replace(cfg, roi_heads=heads, class_names=names, category_ids=ids)


def load_matching_weights(model: MaskTransfiner, path: str | Path) -> list[str]:
    """Initialises from a checkpoint, skipping tensors whose shape differs (e.g. class heads when
    fine-tuning an 80-class model on other classes). Returns the skipped names."""
    _, state = load_checkpoint(path)
    target = model.state_dict()
    usable = {
        k: v.float() if v.is_floating_point() else v
        for k, v in state.items()
        if k in target and v.shape == target[k].shape
    }
    if not usable:
        raise CheckpointError(f"{path} shares no weights with config {model.cfg.name!r}")
    model.load_state_dict(usable, strict=False)
    return sorted(set(target) - set(usable))


def read_train_state(path: Path) -> dict:
    """The training state ``train`` saves in ``last.pth``, read with ``weights_only=True``: it holds
    only tensors and plain containers, so resuming runs no code from the file."""
    if not path.is_file():
        raise CheckpointError(f"--resume: no {path} to resume from")
    state = load_torch_file(path)
    found = state.get("format") if isinstance(state, dict) else None
    if found != TRAIN_STATE_FORMAT:
        raise CheckpointError(
            f"--resume: {path} is not a training state this version can resume "
            f"(format {found!r}, expected {TRAIN_STATE_FORMAT!r}); start a new --out"
        )
    return state


def build_optimizer(parameters: list[torch.nn.Parameter], solver: SolverConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases, as detectron2 (WEIGHT_DECAY_NORM = 0).
    decay = [p for p in parameters if p.ndim > 1]
    no_decay = [p for p in parameters if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": solver.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if solver.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=solver.lr, momentum=solver.momentum)
    if solver.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=solver.lr)
    raise ValueError(f"unknown optimizer {solver.optimizer!r}; use sgd or adamw")


def train(
    config_name: str | ModelConfig,
    data: str | Path,
    out: str | Path,
    solver: SolverConfig,
    val: str | Path | None = None,
    resume: bool = False,
    init_weights: str | Path | None = None,
    device: str = "auto",
    image_root: str | Path | None = None,
    *,
    val_image_root: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Trains and returns the path of the final inference checkpoint.

    - Everything a run needs is checked before its first iteration: the data, the validation data
      (read as the final evaluation will read it), and that ``out`` holds no earlier run unless
      ``resume`` (continue it) or ``overwrite`` (replace it).
    - The steps: those checks, the model and solver state (``_TrainingRun``), the iterations
      (``_train_loop``), then the final checkpoint and evaluation (``_finish``).
    """
    out = Path(out)
    earlier = _check_out(out, resume, init_weights, overwrite)
    device = resolve_device(device)
    torch.manual_seed(solver.seed)
    random.seed(solver.seed)
    np.random.seed(solver.seed)

    state = None
    if resume:
        state = read_train_state(out / "last.pth")
        solver = _resumed_solver(state, solver)
    dataset, cfg = _training_data(config_name, data, image_root, state, out, solver.seed)
    if val is not None:
        evaluation_dataset(val, cfg, val_image_root)  # a bad --val fails now, not after training
    dataset.input_cfg = cfg.input
    if earlier and overwrite:  # nothing of the replaced run may pass for this one's
        _remove_run_files(out)
    out.mkdir(parents=True, exist_ok=True)
    run = _TrainingRun.build(cfg, solver, device, out / "last.pth", init_weights, state)

    (out / "config.json").write_text(
        json.dumps({"model": cfg.to_dict(), "solver": dataclasses.asdict(solver)}, indent=2)
    )
    metrics_path = out / "metrics.jsonl"
    if not resume and metrics_path.exists():
        metrics_path.unlink()
    _train_loop(run, dataset, metrics_path, out / "loss_curve.png")
    return _finish(run, out, data, val, val_image_root)


def _check_out(out: Path, resume: bool, init_weights: str | Path | None, overwrite: bool) -> list[str]:
    """The run files of an earlier run in ``out``; raises ValueError when the flags do not say what to do
    with them (or ask for a resumed run and fresh weights at once)."""
    if resume and init_weights is not None:
        raise ValueError("--resume continues a run from its own last.pth; --weights starts a new run: give one of them")
    earlier = [name for name in ("last.pth", "model_final.pth") if (out / name).exists()]
    if earlier and not resume and not overwrite:
        raise ValueError(
            f"{out} holds an earlier run ({', '.join(earlier)}): --resume it, --overwrite it, or give another --out"
        )
    return earlier


def _training_data(
    config_name: str | ModelConfig,
    data: str | Path,
    image_root: str | Path | None,
    state: dict | None,
    out: Path,
    seed: int,
) -> tuple[CocoDataset, ModelConfig]:
    """The training set and the model config: the resumed run's own, which must have the data's categories,
    or ``config_name`` with the data's classes."""
    dataset = CocoDataset(data, image_root=image_root, train=True, seed=seed)
    if len(dataset) == 0:
        raise DatasetError(f"{data}: no image has an instance to train on (crowd regions alone do not count)")
    cfg = ModelConfig.from_dict(state["config"]) if state else model_config_for_data(config_name, dataset)
    if state and (cfg.class_names, cfg.category_ids) != (dataset.class_names, dataset.category_ids):
        raise DatasetError(
            f"--resume: the run in {out} was trained on categories {_categories(cfg.category_ids, cfg.class_names)}, "
            f"{data} has {_categories(dataset.category_ids, dataset.class_names)}"
        )
    return dataset, cfg


def _remove_run_files(out: Path) -> None:
    for name in RUN_FILES:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink(missing_ok=True)


@dataclass
class _TrainingRun:
    """What the iterations update, and what ``last.pth`` saves of it."""

    cfg: ModelConfig
    solver: SolverConfig
    device: torch.device
    state_path: Path  # last.pth
    model: MaskTransfiner
    losses_fn: TrainingLosses
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool
    start: int  # the first iteration to run

    @classmethod
    def build(
        cls,
        cfg: ModelConfig,
        solver: SolverConfig,
        device: torch.device,
        state_path: Path,
        init_weights: str | Path | None,
        state: dict | None,
    ) -> _TrainingRun:
        """A fresh model (from ``init_weights`` where they fit), or the resumed ``state``."""
        model = MaskTransfiner(cfg).to(device)
        losses_fn = TrainingLosses(model, solver.semantic_loss, solver.boundary_loss).to(device)
        if init_weights is not None and state is None:
            skipped = load_matching_weights(model, init_weights)
            print(f"initialised from {init_weights}; {len(skipped)} tensors kept their fresh initialisation")
        parameters = [p for p in list(model.parameters()) + list(losses_fn.parameters()) if p.requires_grad]
        optimizer = build_optimizer(parameters, solver)
        use_amp = solver.amp and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        start = 0
        if state:
            model.load_state_dict(state["model"])
            losses_fn.load_state_dict(state["aux"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
            start = state["iter"]
        return cls(cfg, solver, device, state_path, model, losses_fn, parameters, optimizer, scaler, use_amp, start)

    def save_state(self, iteration: int) -> None:
        torch.save(
            {
                "format": TRAIN_STATE_FORMAT,
                "config": self.cfg.to_dict(),
                "solver": dataclasses.asdict(self.solver),
                "model": self.model.state_dict(),
                "aux": self.losses_fn.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": torch.get_rng_state(),
                "iter": iteration,
            },
            self.state_path,
        )

    def step(
        self, samples: list[TrainingSample], iteration: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
        """One optimizer step on a batch: its losses, their total and the learning rate it ran with."""
        lr = self.solver.lr_at(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            losses = canvas_losses(self.losses_fn, self.model, samples, self.device)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise TrainingDiverged(
                f"the loss became {total.item()} at iteration {iteration} (lr {lr:.3g}; {_fmt(losses)}): "
                "lower --lr, or add --clip-grad 5, or use --optimizer adamw --lr 0.0004"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.solver.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.solver.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return losses, total, lr


def _train_loop(run: _TrainingRun, dataset: CocoDataset, metrics_path: Path, loss_png: Path) -> None:
    """The iterations from ``run.start``: a line of ``metrics_path`` every ``log_period``, the training
    state and the loss plot every ``checkpoint_period``."""
    solver = run.solver
    run.model.train()
    loader = make_loader(dataset, solver.batch_size, shuffle=True, num_workers=solver.workers, seed=solver.seed)
    epoch = run.start * solver.batch_size // max(len(dataset), 1)
    batches = _cycle(loader, dataset, epoch)
    progress = tqdm(range(run.start, solver.iters), initial=run.start, total=solver.iters, desc="train", disable=None)
    window: list[dict[str, float]] = []
    tic = time.perf_counter()
    for iteration in progress:
        losses, total, lr = run.step(next(batches), iteration)
        window.append({k: float(v.detach()) for k, v in losses.items()} | {"total": float(total.detach())})
        if (iteration + 1) % solver.log_period == 0 or iteration + 1 == solver.iters:
            _log_window(window, iteration + 1, lr, time.perf_counter() - tic, metrics_path, progress, solver.iters)
            window, tic = [], time.perf_counter()
        if (iteration + 1) % solver.checkpoint_period == 0:
            run.save_state(iteration + 1)
            plot_losses(metrics_path, loss_png)


def _log_window(
    window: list[dict[str, float]],
    done: int,
    lr: float,
    elapsed: float,
    metrics_path: Path,
    progress: tqdm,
    iters: int,
) -> None:
    """The mean losses of the iterations since the last log: a line of ``metrics_path``, and the progress bar's
    (or a printed line without a terminal)."""
    mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
    record = {"iter": done, "lr": lr, "s_per_iter": elapsed / len(window)} | mean
    with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    progress.set_postfix(loss=f"{mean['total']:.3f}", lr=f"{lr:.2g}")
    if progress.disable:  # no terminal (a log file, a pipe): a line a logged iteration instead
        print(
            f"iter {done}/{iters}  loss {mean['total']:.3f}  lr {lr:.2g}  {record['s_per_iter']:.2f} s/iter", flush=True
        )


def _finish(
    run: _TrainingRun, out: Path, data: str | Path, val: str | Path | None, val_image_root: str | Path | None
) -> Path:
    """The last training state, the inference checkpoint ``model_final.pth``, the loss plot and, with
    ``val``, the evaluation report in ``eval/``."""
    run.save_state(run.solver.iters)
    run.model.eval()
    final = out / "model_final.pth"
    save_checkpoint(final, run.model, trained_iters=run.solver.iters, data=str(data))
    plot_losses(out / "metrics.jsonl", out / "loss_curve.png")
    if val is not None:
        evaluate(Predictor(run.cfg, final, run.device), val, out / "eval", image_root=val_image_root, weights=final)
    return final


def _categories(ids: tuple[int, ...], names: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"{i} {n}" for i, n in zip(ids, names)) + "]"


def _resumed_solver(state: dict, given: SolverConfig) -> SolverConfig:
    """The run's own solver with the new ``iters``: resuming continues the same schedule, so the
    other solver flags given now are not applied (and the run's own are printed)."""
    saved = SolverConfig(**state["solver"])
    finished = int(state["iter"])
    if given.iters <= finished:
        raise ValueError(f"--resume: the run has finished {finished} iterations; give --iters above that")
    print(
        f"resuming at iteration {finished} of {given.iters} with the run's own solver (other solver flags are "
        f"not applied): {saved.optimizer}, lr {saved.lr:g}, batch size {saved.batch_size}, "
        f"warm-up {saved.warmup_iters}, clip-grad {saved.clip_grad}, seed {saved.seed}"
    )
    return dataclasses.replace(saved, iters=given.iters, workers=given.workers)  # loader processes change nothing


def canvas_losses(
    losses_fn: TrainingLosses, model: MaskTransfiner, samples: list[TrainingSample], device: torch.device
) -> dict[str, torch.Tensor]:
    """The batch's losses with every sample padded to its own canvas (``padded_shape``), as the
    Predictor and the service run it: one pass per canvas in the batch (a single pass for the
    batches of ``CanvasBatchSampler``), each weighted by its share of the samples."""
    groups: dict[tuple[int, int], list[TrainingSample]] = {}
    for sample in samples:
        groups.setdefault(padded_shape(*sample.image.shape[1:], model.cfg.input), []).append(sample)
    losses: dict[str, torch.Tensor] = {}
    for group in groups.values():
        images, sizes = pad_batch([s.image.to(device) for s in group], model.cfg.input)
        for name, value in losses_fn(model, images, sizes, group).items():
            weighted = value * (len(group) / len(samples))
            losses[name] = losses[name] + weighted if name in losses else weighted
    return losses


def _cycle(loader, dataset: CocoDataset, epoch: int):
    while True:
        dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def _fmt(losses: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())


def plot_losses(metrics_path: Path, png: Path) -> None:
    """Each loss (and the total) against the iteration, log scale."""
    if not metrics_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not records:
        return
    names = [k for k in records[0] if k.startswith("loss") or k == "total"]
    fig, ax = plt.subplots(figsize=(9, 5))
    iters = [r["iter"] for r in records]
    for name in names:
        ax.plot(iters, [r[name] for r in records], label=name, linewidth=2.5 if name == "total" else 1.2)
    ax.set(xlabel="iteration", ylabel="loss", yscale="log", title="training losses")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
