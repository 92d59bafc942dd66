"""Helpers for the model tests (no tests here): tiny Transfiner settings, random boxes, and a
small refiner with inputs to run it on."""

from __future__ import annotations

import dataclasses

import torch

from transfiner.model.config import TransfinerConfig
from transfiner.model.modeling.poolers import assign_fpn_levels
from transfiner.model.modeling.refiner import TransfinerRefiner

# The refiner the model tests build: feature channels, image side, FPN scales.
CHANNELS = 8
IMAGE = 512
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def tiny_transfiner_config(**overrides) -> TransfinerConfig:
    base = TransfinerConfig(d_model=16, num_heads=4, num_layers=2, dim_feedforward=32, dropout=0.0)
    return dataclasses.replace(base, **overrides)


def random_boxes(generator: torch.Generator, count: int, image_size: int, min_side: float = 6.0) -> torch.Tensor:
    """Boxes of very different sizes (so they land on every FPN level) inside the image."""
    sides = torch.exp(
        torch.empty(count, 2).uniform_(
            torch.log(torch.tensor(min_side)).item(),
            torch.log(torch.tensor(image_size * 0.95)).item(),
            generator=generator,
        )
    )
    x0 = torch.rand(count, generator=generator) * (image_size - sides[:, 0])
    y0 = torch.rand(count, generator=generator) * (image_size - sides[:, 1])
    return torch.stack((x0, y0, x0 + sides[:, 0], y0 + sides[:, 1]), dim=1)


def make_inputs(seed: int, count: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(batch, CHANNELS, IMAGE // s, IMAGE // s, generator=g) for s in (4, 8, 16, 32)]
    boxes = random_boxes(g, count, IMAGE)
    batch_index = torch.randint(0, batch, (count,), generator=g)
    context = torch.randn(count, CHANNELS, 14, 14, generator=g)
    coarse = torch.rand(count, 28, 28, generator=g)
    # Incoherence maps with structure: some cells high, most low, a few exactly tied values.
    incoherence = torch.rand(count, 28, 28, generator=g) ** 3
    return features, boxes, batch_index, context, coarse, incoherence


def build_refiner(thresholds, max_cells, seed: int = 0) -> TransfinerRefiner:
    torch.manual_seed(seed)
    cfg = tiny_transfiner_config(thresholds=thresholds, max_cells=max_cells)
    return TransfinerRefiner(cfg, CHANNELS, SCALES).eval()


def run(refiner, features, boxes, batch_index, context, coarse, incoherence):
    with torch.no_grad():
        return refiner(features, boxes, batch_index, assign_fpn_levels(boxes), context, coarse, incoherence)
