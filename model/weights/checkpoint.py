"""Our checkpoint format, model building, and conversion of the official SysCV/transfiner weights.

Our checkpoints are ``{"format": "transfiner/1", "config": ModelConfig.to_dict(), "model":
state_dict}``; the config travels with the weights so a file is all a user needs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transfiner.model.config import COVERING_MAX_CELLS, ModelConfig, preset, with_current_chunking, with_max_cells
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.weights.files import CheckpointError, load_torch_file, state_dict_of

FORMAT = "transfiner/1"
# What ``transfiner train`` saves as ``last.pth`` to resume from: config and weights as in
# ``FORMAT``, with the optimizer's state beside them. A run that stopped early has only this file.
TRAIN_STATE_FORMAT = "transfiner-train/1"

# Official name -> our name, for the mask branch (everything else keeps detectron2's names).
OFFICIAL_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^roi_heads\.mask_pooler\.conv_norm_relus_semantic\.", "mask_head.semantic.convs."),
    (r"^roi_heads\.mask_head\.mask_fcn_uncertain(\d)\.", r"mask_head.incoherence.conv\1."),
    (r"^roi_heads\.mask_head\.deconv_uncertain\.", "mask_head.incoherence.deconv."),
    (r"^roi_heads\.mask_head\.predictor_uncertain\.", "mask_head.incoherence.predictor."),
    (r"^roi_heads\.mask_head\.encoder\.conv_fuse\.", "mask_head.refiner.node_encoder.fuse."),
    (r"^roi_heads\.mask_head\.encoder\.layers\.", "mask_head.refiner.sequence_encoder.layers."),
    (r"^roi_heads\.mask_head\.encoder\.conv_r1\.", "mask_head.refiner.pixel_decoder.layers."),
    (r"^roi_heads\.mask_head\.(mask_fcn\d|deconv|predictor)\.", r"mask_head.coarse.\1."),
)
# Keys only the official training uses (boundary branch, semantic loss head, cached anchors).
OFFICIAL_TRAINING_ONLY = re.compile(
    r"^roi_heads\.mask_head\.(deconv_bo|predictor_bo|predictor_semantic_s)\.|"
    r"^proposal_generator\.anchor_generator\.|\.num_batches_tracked$"
)


def official_to_ours(name: str) -> str:
    for pattern, replacement in OFFICIAL_RENAMES:
        new, count = re.subn(pattern, replacement, name)
        if count:
            return new
    return name


@dataclass
class ConversionReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # our keys the file lacks
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # official training-only keys
    unexpected: list[str] = field(default_factory=list)  # keys we do not know

    @property
    def ok(self) -> bool:
        return not self.missing and not self.wrong_shape

    def format(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for title, items in (
            ("missing (needed for inference)", self.missing),
            ("ignored (training-only in the official code)", self.ignored),
            ("unexpected (unknown, not loaded)", self.unexpected),
        ):
            lines.append(f"{title}: {len(items)}")
            lines.extend(f"  {name}" for name in items)
        lines.append(f"wrong shape: {len(self.wrong_shape)}")
        lines.extend(f"  {name}: file {got} vs model {want}" for name, got, want in self.wrong_shape)
        return "\n".join(lines)


def official_config(name: str) -> ModelConfig:
    """The config a converted official checkpoint stores: the preset, with node caps that cover
    every cell, so the converted model selects exactly the official nodes in every box (the
    official code has no cap). ``--max-cells`` trades that for speed at inference."""
    return with_max_cells(preset(name), COVERING_MAX_CELLS)


def convert_official_state_dict(
    official: dict[str, torch.Tensor], model: MaskTransfiner
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Maps an official (detectron2-format) state dict onto ``model``'s parameter names."""
    target = model.state_dict()
    report = ConversionReport()
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in official.items():
        if OFFICIAL_TRAINING_ONLY.search(name):
            report.ignored.append(name)
            continue
        ours = official_to_ours(name)
        if ours not in target:
            report.unexpected.append(name)
            continue
        want = target[ours].shape
        if tensor.shape != want and tensor.numel() == target[ours].numel() and tensor.dim() == len(want) + 2:
            tensor = tensor.reshape(want)  # 1x1 convs in the official code are linears here
        if tensor.shape != want:
            report.wrong_shape.append((name, tuple(tensor.shape), tuple(want)))
            continue
        converted[ours] = tensor.to(target[ours].dtype)
        report.loaded.append(name)
    report.missing = sorted(set(target) - set(converted))
    return converted, report


def save_checkpoint(path: str | os.PathLike, model: MaskTransfiner, **extra) -> None:
    torch.save({"format": FORMAT, "config": model.cfg.to_dict(), "model": model.state_dict(), **extra}, path)


def load_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig | None, dict[str, torch.Tensor]]:
    """Reads our checkpoint (config + weights; a training state's too) or a bare state dict
    (config ``None``), once."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    data = load_torch_file(Path(path))
    if isinstance(data, dict) and data.get("format") in (FORMAT, TRAIN_STATE_FORMAT):
        return with_current_chunking(ModelConfig.from_dict(data["config"])), data["model"]
    return None, state_dict_of(data, Path(path))


def load_model(
    weights: str | os.PathLike,
    config: str | ModelConfig | None = None,
    device: str | torch.device = "cpu",
    max_cells: tuple[int, int, int] | None = None,
) -> MaskTransfiner:
    """A model in eval mode from a checkpoint file, read once: with the config stored in it unless
    ``config`` (a preset name or a ``ModelConfig``; needed for a bare state dict) is given, and
    with node caps ``max_cells`` instead of the config's."""
    stored, state = load_checkpoint(weights)
    config = stored if config is None else config
    if config is None:
        raise ValueError(f"{weights} holds no config: give one (e.g. --config R50-FPN)")
    cfg = with_max_cells(preset(config) if isinstance(config, str) else config, max_cells)
    return _with_weights(MaskTransfiner(cfg), state, weights).to(device).eval()


def build_model(
    config: ModelConfig, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> MaskTransfiner:
    """A model in eval mode; with ``weights``, every parameter must load (strict)."""
    model = MaskTransfiner(config)
    if weights is not None:
        model = _with_weights(model, load_checkpoint(weights)[1], weights)
    return model.to(device).eval()


def _with_weights(model: MaskTransfiner, state: dict[str, torch.Tensor], source: str | os.PathLike) -> MaskTransfiner:
    """Loads every parameter of ``model`` from ``state`` (strict), or says what does not match."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not match config {model.cfg.name!r}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:3]}). "
            "Official checkpoints must be converted first: transfiner convert-official."
        )
    model.load_state_dict(state)
    return model
