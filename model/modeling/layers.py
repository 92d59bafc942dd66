"""Small building blocks with detectron2's parameter names, so checkpoints map one to one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all stored as buffers.

    Detectron2 checkpoints hold ``weight, bias, running_mean, running_var`` for these layers and
    no ``num_batches_tracked``; buffers keep them out of the optimizer.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> the same shape. Two forms, as detectron2's ``FrozenBatchNorm2d``:

        Without gradients, ``F.batch_norm`` with the frozen statistics: detectron2's (and so the
        official code's) inference op, bit for bit; a folded ``x * scale + shift`` rounds
        differently in the last bit, which moves scores, and with them NMS ties and boxes. When
        ``x`` needs gradients (training from ``--weights``), the folded form: ``F.batch_norm``'s
        backward also computes gradients for the frozen weight and bias, and keeps more memory.
        """
        if not x.requires_grad:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
            )
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def get_norm(norm: str, channels: int) -> nn.Module:
    """detectron2's norm names: "FrozenBN" (pretrained backbones), "GN" (training from scratch), "BN"."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {norm!r}; use FrozenBN, GN or BN")


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with an optional ``norm`` child, as detectron2's (keys ``conv.norm.*``)."""

    def __init__(self, *args, norm: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return self.norm(x) if self.norm is not None else x


class DeformConv(nn.Module):
    """Deformable convolution (DCNv1 or, modulated, DCNv2) on torchvision's ``deform_conv2d``.

    The offset layout (``2 * kh * kw`` channels per group, y before x) is the same in torchvision
    and detectron2, so official DCN weights load unchanged. Keys: ``weight`` (no bias), ``norm.*``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        self.norm = norm

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = deform_conv2d(
            x,
            offset,
            self.weight,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )
        return self.norm(x) if self.norm is not None else x


def c2_msra_fill(module: nn.Module) -> None:
    """Caffe2's MSRA fill (kaiming normal, fan_out), detectron2's default for conv heads."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's Xavier fill (kaiming uniform with a=1), detectron2's default for FPN and fc."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
