"""ResNet (18/34/50/101, optional deformable convs) and FPN, with detectron2's names.

State-dict keys come out as detectron2's: ``bottom_up.stem.conv1.weight``,
``bottom_up.res3.0.conv2_offset.weight``, ``fpn_lateral2.weight`` ... (under ``backbone.``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transfiner.model.config import FPNConfig, ResNetConfig
from transfiner.model.modeling.layers import Conv2d, DeformConv, c2_msra_fill, c2_xavier_fill, get_norm


class BasicStem(nn.Module):
    """7x7/2 conv, ReLU, 3x3/2 max-pool: stride 4."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "FrozenBN") -> None:
        super().__init__()
        self.conv1 = Conv2d(
            in_channels,
            out_channels,
            7,
            stride=2,
            padding=3,
            bias=False,
            norm=get_norm(norm, out_channels),
        )
        c2_msra_fill(self.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: str) -> Conv2d | None:
    if in_channels == out_channels:
        return None
    conv = Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, norm=get_norm(norm, out_channels))
    c2_msra_fill(conv)
    return conv


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str = "FrozenBN") -> None:
        super().__init__()
        self.shortcut = _shortcut(in_channels, out_channels, stride, norm)
        self.conv1 = Conv2d(
            in_channels,
            out_channels,
            3,
            stride=stride,
            padding=1,
            bias=False,
            norm=get_norm(norm, out_channels),
        )
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, bias=False, norm=get_norm(norm, out_channels))
        for conv in (self.conv1, self.conv2):
            c2_msra_fill(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu_(self.conv1(x)))
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out + shortcut)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (optionally deformable), 1x1 expand (ResNet-50/101)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bottleneck_channels: int,
        stride: int,
        num_groups: int = 1,
        stride_in_1x1: bool = True,
        deform: bool = False,
        deform_modulated: bool = False,
        norm: str = "FrozenBN",
    ) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.shortcut = _shortcut(in_channels, out_channels, stride, norm)
        self.conv1 = Conv2d(
            in_channels,
            bottleneck_channels,
            1,
            stride=stride_1x1,
            bias=False,
            norm=get_norm(norm, bottleneck_channels),
        )
        self.deform_modulated = deform_modulated
        if deform:
            # 2 offsets (and, modulated, 1 mask value) per kernel tap.
            offset_channels = 27 if deform_modulated else 18
            self.conv2_offset = nn.Conv2d(bottleneck_channels, offset_channels, 3, stride=stride_3x3, padding=1)
            nn.init.zeros_(self.conv2_offset.weight)
            nn.init.zeros_(self.conv2_offset.bias)
            self.conv2 = DeformConv(
                bottleneck_channels,
                bottleneck_channels,
                3,
                stride=stride_3x3,
                padding=1,
                groups=num_groups,
                norm=get_norm(norm, bottleneck_channels),
            )
        else:
            self.conv2_offset = None
            self.conv2 = Conv2d(
                bottleneck_channels,
                bottleneck_channels,
                3,
                stride=stride_3x3,
                padding=1,
                groups=num_groups,
                bias=False,
                norm=get_norm(norm, bottleneck_channels),
            )
        self.conv3 = Conv2d(bottleneck_channels, out_channels, 1, bias=False, norm=get_norm(norm, out_channels))
        for conv in (self.conv1, self.conv3) + ((self.conv2,) if not deform else ()):
            c2_msra_fill(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        if self.conv2_offset is None:
            out = self.conv2(out)
        elif self.deform_modulated:
            offset_x, offset_y, mask = torch.chunk(self.conv2_offset(out), 3, dim=1)
            out = self.conv2(out, torch.cat((offset_x, offset_y), dim=1), mask.sigmoid())
        else:
            out = self.conv2(out, self.conv2_offset(out))
        out = self.conv3(F.relu_(out))
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out + shortcut)


_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class ResNet(nn.Module):
    """Returns ``{"res2": stride 4, "res3": 8, "res4": 16, "res5": 32}`` feature maps."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        if cfg.depth not in _BLOCKS_PER_STAGE:
            raise ValueError(f"ResNet depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {cfg.depth}")
        basic = cfg.depth in (18, 34)
        if basic and cfg.res2_out_channels != 64:
            raise ValueError("ResNet-18/34 need res2_out_channels=64")
        self.stem = BasicStem(3, cfg.stem_out_channels, cfg.norm)
        self.stage_names = ("res2", "res3", "res4", "res5")
        self.out_channels: dict[str, int] = {}
        in_channels = cfg.stem_out_channels
        out_channels = cfg.res2_out_channels
        bottleneck = cfg.num_groups * cfg.width_per_group
        for index, (name, num_blocks) in enumerate(zip(self.stage_names, _BLOCKS_PER_STAGE[cfg.depth])):
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if (block_index == 0 and index > 0) else 1
                if basic:
                    block = BasicBlock(in_channels, out_channels, stride, cfg.norm)
                else:
                    block = BottleneckBlock(
                        in_channels,
                        out_channels,
                        bottleneck,
                        stride,
                        cfg.num_groups,
                        cfg.stride_in_1x1,
                        cfg.deform_on_per_stage[index],
                        cfg.deform_modulated,
                        cfg.norm,
                    )
                blocks.append(block)
                in_channels = out_channels
            self.add_module(name, nn.Sequential(*blocks))
            self.out_channels[name] = out_channels
            out_channels *= 2
            bottleneck *= 2
        self._freeze(cfg.freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        """Stops gradients into the stem (1) and the first stages (2..5), as detectron2."""
        modules = [self.stem] + [getattr(self, name) for name in self.stage_names]
        for module in modules[:freeze_at]:
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        outputs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outputs[name] = x
        return outputs


class FPN(nn.Module):
    """Feature pyramid P2..P6 (P6 by max-pooling P5, detectron2's ``LastLevelMaxPool``)."""

    def __init__(self, bottom_up: ResNet, cfg: FPNConfig) -> None:
        super().__init__()
        self.bottom_up = bottom_up
        self.in_features = bottom_up.stage_names
        self.out_channels = cfg.out_channels
        for level, name in enumerate(self.in_features, start=2):
            lateral = nn.Conv2d(bottom_up.out_channels[name], cfg.out_channels, 1)
            output = nn.Conv2d(cfg.out_channels, cfg.out_channels, 3, padding=1)
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"fpn_lateral{level}", lateral)
            self.add_module(f"fpn_output{level}", output)
        self.strides = (4, 8, 16, 32, 64)
        self.size_divisibility = 32

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] (H, W divisible by 32) -> [P2, P3, P4, P5, P6]."""
        bottom_up = self.bottom_up(images)
        levels = range(len(self.in_features) + 1, 1, -1)  # 5, 4, 3, 2: top-down
        results = []
        previous = None
        for level, name in zip(levels, reversed(self.in_features)):
            lateral = getattr(self, f"fpn_lateral{level}")(bottom_up[name])
            if previous is not None:
                lateral = lateral + F.interpolate(previous, scale_factor=2.0, mode="nearest")
            previous = lateral
            results.insert(0, getattr(self, f"fpn_output{level}")(lateral))
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results


def build_backbone(resnet: ResNetConfig, fpn: FPNConfig) -> FPN:
    return FPN(ResNet(resnet), fpn)
