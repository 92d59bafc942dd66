"""ResNet / FPN / FrozenBN / DCN semantics, checked against detectron2 v0.5 and torchvision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from transfiner.model.config import FPNConfig, ResNetConfig
from transfiner.model.modeling.backbone import FPN, BottleneckBlock, ResNet, build_backbone
from transfiner.model.modeling.layers import DeformConv, FrozenBatchNorm2d


def _randomize_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Non-identity frozen statistics, so a wrongly wired norm changes the output."""
    for child in module.modules():
        if isinstance(child, FrozenBatchNorm2d):
            n = child.weight.numel()
            child.weight.copy_(torch.rand(n, generator=generator) + 0.5)
            child.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            child.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            child.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def _narrow_r50(**overrides) -> ResNetConfig:
    base = dict(depth=50, stem_out_channels=8, res2_out_channels=32, width_per_group=8, freeze_at=0)
    base.update(overrides)
    return ResNetConfig(**base)


# ----------------------------------------------------------------------------- shapes / names


@pytest.mark.parametrize("height,width", [(64, 96), (96, 160)])
def test_resnet18_fpn_names_strides_channels(height, width):
    torch.manual_seed(0)
    backbone = build_backbone(ResNetConfig(depth=18, res2_out_channels=64), FPNConfig(out_channels=16)).eval()
    assert backbone.strides == (4, 8, 16, 32, 64)
    assert backbone.size_divisibility == 32
    assert backbone.bottom_up.out_channels == {"res2": 64, "res3": 128, "res4": 256, "res5": 512}
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        stages = backbone.bottom_up(x)
        pyramid = backbone(x)
    assert list(stages) == ["res2", "res3", "res4", "res5"]
    for (name, out), stride in zip(stages.items(), (4, 8, 16, 32)):
        assert out.shape == (2, backbone.bottom_up.out_channels[name], height // stride, width // stride)
    assert len(pyramid) == 5
    for level, stride in zip(pyramid[:4], (4, 8, 16, 32)):
        assert level.shape == (2, 16, height // stride, width // stride)
    # P6: max-pool k=1 s=2 of P5, i.e. every other P5 pixel (ceil of odd sizes: 3x5 -> 2x3).
    p5 = pyramid[3]
    assert pyramid[4].shape == (2, 16, math.ceil(p5.shape[2] / 2), math.ceil(p5.shape[3] / 2))
    torch.testing.assert_close(pyramid[4], p5[:, :, ::2, ::2], rtol=0, atol=0)


def test_resnet50_default_channels_and_key_names():
    torch.manual_seed(0)
    backbone = build_backbone(ResNetConfig(depth=50), FPNConfig()).eval()
    assert backbone.bottom_up.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    with torch.no_grad():
        pyramid = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(p.shape) for p in pyramid] == [
        (1, 256, 16, 24),
        (1, 256, 8, 12),
        (1, 256, 4, 6),
        (1, 256, 2, 3),
        (1, 256, 1, 2),
    ]
    state = backbone.state_dict()
    assert not any("num_batches_tracked" in key for key in state)
    expected_shapes = {
        "bottom_up.stem.conv1.weight": (64, 3, 7, 7),
        "bottom_up.stem.conv1.norm.weight": (64,),
        "bottom_up.stem.conv1.norm.running_mean": (64,),
        "bottom_up.res2.0.shortcut.weight": (256, 64, 1, 1),
        "bottom_up.res2.0.conv1.weight": (64, 64, 1, 1),
        "bottom_up.res2.0.conv2.weight": (64, 64, 3, 3),
        "bottom_up.res2.0.conv3.weight": (256, 64, 1, 1),
        "bottom_up.res3.0.shortcut.weight": (512, 256, 1, 1),
        "bottom_up.res3.0.shortcut.norm.running_var": (512,),
        "bottom_up.res4.5.conv3.norm.bias": (1024,),
        "bottom_up.res5.2.conv3.weight": (2048, 512, 1, 1),
        "fpn_lateral2.weight": (256, 256, 1, 1),
        "fpn_lateral2.bias": (256,),
        "fpn_lateral5.weight": (256, 2048, 1, 1),
        "fpn_output2.weight": (256, 256, 3, 3),
        "fpn_output5.bias": (256,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    # Detectron2 has no bias on the backbone convs, no shortcut in non-first blocks, no fpn P6 conv.
    for absent in (
        "bottom_up.stem.conv1.bias",
        "bottom_up.res2.0.conv1.bias",
        "bottom_up.res2.1.shortcut.weight",
        "bottom_up.res4.6.conv1.weight",
        "fpn_lateral6.weight",
        "fpn_output6.weight",
    ):
        assert absent not in state, absent
    # The frozen norms are buffers, never parameters (so nothing trains them).
    names = {name for name, _ in backbone.named_parameters()}
    assert "bottom_up.stem.conv1.weight" in names
    assert not any(".norm." in name for name in names)


def test_block_counts_per_depth():
    for depth, counts in {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 101: (3, 4, 23, 3)}.items():
        if depth == 101:
            cfg = _narrow_r50(depth=101)
        else:
            cfg = ResNetConfig(depth=depth, res2_out_channels=64)
        resnet = ResNet(cfg)
        assert tuple(len(getattr(resnet, name)) for name in resnet.stage_names) == counts
    with pytest.raises(ValueError):
        ResNet(ResNetConfig(depth=26))
    with pytest.raises(ValueError):
        ResNet(ResNetConfig(depth=18, res2_out_channels=256))


def test_dcn_key_names_and_shapes():
    resnet = ResNet(_narrow_r50(deform_on_per_stage=(False, True, True, True)))
    fpn = FPN(resnet, FPNConfig(out_channels=8))
    state = fpn.state_dict()
    assert "bottom_up.res2.0.conv2_offset.weight" not in state
    assert tuple(state["bottom_up.res3.0.conv2_offset.weight"].shape) == (18, 16, 3, 3)
    assert tuple(state["bottom_up.res3.0.conv2_offset.bias"].shape) == (18,)
    assert tuple(state["bottom_up.res3.0.conv2.weight"].shape) == (16, 16, 3, 3)
    assert "bottom_up.res3.0.conv2.bias" not in state
    assert "bottom_up.res3.0.conv2.norm.running_var" in state
    assert "bottom_up.res5.2.conv2_offset.weight" in state
    # Offsets start at zero, as detectron2 initialises them.
    assert state["bottom_up.res4.1.conv2_offset.weight"].abs().sum() == 0
    modulated = ResNet(_narrow_r50(deform_on_per_stage=(False, False, False, True), deform_modulated=True))
    assert tuple(modulated.res5[0].conv2_offset.weight.shape) == (27, 64, 3, 3)
    assert modulated.res4[0].conv2_offset is None


# ----------------------------------------------------------------------------- equivalences


def test_frozen_batchnorm_equals_batchnorm_eval():
    g = torch.Generator().manual_seed(1)
    frozen = FrozenBatchNorm2d(6)
    reference = nn.BatchNorm2d(6).eval()
    weight, bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    mean, var = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.1
    for module in (frozen, reference):
        module.weight.data.copy_(weight)
        module.bias.data.copy_(bias)
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
    x = torch.randn(3, 6, 5, 7, generator=g) * 10
    with torch.no_grad():
        # Bit for bit: inference is detectron2's F.batch_norm (nn.BatchNorm2d in eval calls it
        # too). The folded x * scale + shift rounds differently, so this fails for it.
        assert torch.equal(frozen(x), reference(x))
        scale = weight * (var + frozen.eps).rsqrt()
        folded = x * scale.view(1, -1, 1, 1) + (bias - mean * scale).view(1, -1, 1, 1)
        assert not torch.equal(folded, reference(x))
    # With gradients (training) the folded form: the same values to rounding, gradients flow to x.
    x_grad = x.clone().requires_grad_()
    out = frozen(x_grad)
    torch.testing.assert_close(out, reference(x).detach())
    out.sum().backward()
    torch.testing.assert_close(x_grad.grad, (weight * (var + frozen.eps).rsqrt()).view(1, -1, 1, 1).expand_as(x))
    # Defaults are the identity (running_var = 1 - eps, as detectron2).
    torch.testing.assert_close(FrozenBatchNorm2d(6)(x), x)
    assert set(dict(frozen.named_buffers())) == {"weight", "bias", "running_mean", "running_var"}
    assert list(frozen.parameters()) == []


def _copy_torchvision_resnet(ours: ResNet, theirs: torchvision.models.ResNet) -> None:
    """Loads torchvision's weights into our names (the detectron2 names)."""
    mapping = {"conv1.weight": "stem.conv1.weight"}
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        mapping[f"bn1.{suffix}"] = f"stem.conv1.norm.{suffix}"
    for key in theirs.state_dict():
        if not key.startswith("layer") or key.endswith("num_batches_tracked"):
            continue
        layer, block, rest = key.split(".", 2)
        stage = f"res{int(layer[5:]) + 1}"
        rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
        for j in (1, 2, 3):
            rest = rest.replace(f"bn{j}.", f"conv{j}.norm.")
        mapping[key] = f"{stage}.{block}.{rest}"
    source = theirs.state_dict()
    state = {ours_key: source[their_key] for their_key, ours_key in mapping.items()}
    ours.load_state_dict(state, strict=True)


def _randomize_bn(model: nn.Module, generator: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def test_resnet18_equals_torchvision_resnet18():
    """Same architecture (stem, BasicBlock, 1x1 stride-2 shortcut): same features."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    theirs = torchvision.models.resnet18().eval()
    _randomize_bn(theirs, g)
    ours = ResNet(ResNetConfig(depth=18, res2_out_channels=64)).eval()
    _copy_torchvision_resnet(ours, theirs)
    x = torch.randn(1, 3, 64, 96, generator=g)
    with torch.no_grad():
        out = ours(x)
        y = theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(x))))
        for name, layer in zip(
            ("res2", "res3", "res4", "res5"), (theirs.layer1, theirs.layer2, theirs.layer3, theirs.layer4)
        ):
            y = layer(y)
            assert (out[name] - y).norm() <= 1e-5 * y.norm(), name


def test_resnet50_stride_in_3x3_equals_torchvision_resnet50():
    """torchvision's ResNet-50 is 'v1.5' (stride on the 3x3): ours with stride_in_1x1=False."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    theirs = torchvision.models.resnet50().eval()
    _randomize_bn(theirs, g)
    ours = ResNet(ResNetConfig(depth=50, stride_in_1x1=False)).eval()
    _copy_torchvision_resnet(ours, theirs)
    x = torch.randn(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        res5 = ours(x)["res5"]
        y = theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(x))))
        y = theirs.layer4(theirs.layer3(theirs.layer2(theirs.layer1(y))))
    assert (res5 - y).norm() <= 1e-5 * y.norm()


def test_stride_in_1x1_places_stride():
    for stride_in_1x1, (s1, s2) in ((True, (2, 1)), (False, (1, 2))):
        resnet = ResNet(_narrow_r50(stride_in_1x1=stride_in_1x1, deform_on_per_stage=(False, False, True, False)))
        for stage in (resnet.res3, resnet.res4, resnet.res5):
            block = stage[0]
            assert block.conv1.stride == (s1, s1)
            assert block.shortcut.stride == (2, 2)
            if block.conv2_offset is None:
                assert block.conv2.stride == (s2, s2)
            else:  # the offsets are predicted at the output resolution of conv2
                assert block.conv2.stride == s2
                assert block.conv2_offset.stride == (s2, s2)
            assert stage[1].conv1.stride == (1, 1)
        assert resnet.res2[0].conv1.stride == (1, 1)
        with torch.no_grad():
            out = resnet(torch.randn(1, 3, 64, 96))
        assert out["res4"].shape[-2:] == (4, 6) and out["res5"].shape[-2:] == (2, 3)


def test_freeze_at():
    def trainable(resnet: ResNet) -> dict[str, bool]:
        modules = {"stem": resnet.stem, **{n: getattr(resnet, n) for n in resnet.stage_names}}
        result = {}
        for name, module in modules.items():
            flags = {p.requires_grad for p in module.parameters()}
            assert len(flags) == 1, name  # a stage is frozen as a whole
            result[name] = flags.pop()
        return result

    order = ["stem", "res2", "res3", "res4", "res5"]
    for freeze_at in range(6):
        flags = trainable(ResNet(ResNetConfig(depth=18, res2_out_channels=64, freeze_at=freeze_at)))
        assert flags == {name: i >= freeze_at for i, name in enumerate(order)}, freeze_at
    # The FPN's own convs stay trainable whatever the bottom-up freezing.
    fpn = build_backbone(ResNetConfig(depth=18, res2_out_channels=64, freeze_at=5), FPNConfig(out_channels=8))
    assert all(p.requires_grad for n, p in fpn.named_parameters() if n.startswith("fpn_"))
    assert not any(p.requires_grad for p in fpn.bottom_up.parameters())


def test_fpn_top_down_is_sum_of_lateral_and_nearest_upsampled():
    torch.manual_seed(0)
    fpn = build_backbone(ResNetConfig(depth=18, res2_out_channels=64), FPNConfig(out_channels=8)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        c = fpn.bottom_up(x)
        pyramid = fpn(x)
        inner = fpn.fpn_lateral5(c["res5"])
        expected = {5: fpn.fpn_output5(inner)}
        for level in (4, 3, 2):
            up = inner.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            inner = getattr(fpn, f"fpn_lateral{level}")(c[f"res{level}"]) + up
            expected[level] = getattr(fpn, f"fpn_output{level}")(inner)
    for i, level in enumerate((2, 3, 4, 5)):
        torch.testing.assert_close(pyramid[i], expected[level], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pyramid[4], F.max_pool2d(expected[5], kernel_size=1, stride=2))


# ----------------------------------------------------------------------------- deformable convs


def test_deform_conv_matches_detectron2_reference_values():
    """detectron2's tests/layers/test_deformable.py numbers (5x5 ramp, offsets 0.5, ones kernel)."""
    x = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    conv = DeformConv(1, 1, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    offset = torch.full((1, 18, 5, 5), 0.5)
    expected = torch.tensor(
        [
            [30, 41.25, 48.75, 45, 28.75],
            [62.25, 81, 90, 80.25, 50.25],
            [99.75, 126, 135, 117.75, 72.75],
            [105, 131.25, 138.75, 120, 73.75],
            [71.75, 89.25, 93.75, 80.75, 49.5],
        ]
    ).reshape(1, 1, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(conv(x, offset), expected)
        torch.testing.assert_close(conv(x, offset, torch.full((1, 9, 5, 5), 0.5)), expected * 0.5)


def _shifted_conv(x: torch.Tensor, weight: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """3x3 conv (padding 1) whose every tap reads x at (y + dy, x + dx), zero outside the image."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (3, 3, 3, 3))
    window = padded[:, :, 2 + dy : 2 + dy + height + 2, 2 + dx : 2 + dx + width + 2]
    return F.conv2d(window, weight)


def test_deform_conv_offset_layout_is_y_then_x_per_tap():
    """detectron2's kernel reads tap k's (dy, dx) from channels (2k, 2k+1)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 6, 7, generator=g)
    conv = DeformConv(2, 3, 3, padding=1)
    for dy, dx in ((1.0, 0.0), (0.0, 1.0), (-1.0, 2.0)):
        offset = torch.zeros(1, 18, 6, 7)
        offset[:, 0::2] = dy
        offset[:, 1::2] = dx
        # Sampling x at (y + dy, x + dx) == a plain conv on the zero-padded input, shifted.
        with torch.no_grad():
            torch.testing.assert_close(
                conv(x, offset), _shifted_conv(x, conv.weight, int(dy), int(dx)), rtol=1e-5, atol=1e-5
            )


def _plain_and_deform_blocks(stride_in_1x1: bool, modulated: bool, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    plain = BottleneckBlock(8, 16, 4, stride=2, stride_in_1x1=stride_in_1x1).eval()
    _randomize_norms(plain, g)
    deform = BottleneckBlock(
        8, 16, 4, stride=2, stride_in_1x1=stride_in_1x1, deform=True, deform_modulated=modulated
    ).eval()
    missing, unexpected = deform.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["conv2_offset.bias", "conv2_offset.weight"] and not unexpected
    return plain, deform, torch.randn(2, 8, 9, 11, generator=g)


@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_dcn_bottleneck_with_zero_offsets_equals_plain_bottleneck(stride_in_1x1):
    plain, deform, x = _plain_and_deform_blocks(stride_in_1x1, modulated=False, seed=5)
    with torch.no_grad():
        expected = plain(x)
        torch.testing.assert_close(deform(x), expected, rtol=1e-5, atol=1e-5)
        # Non-zero offsets really reach the deformable conv.
        deform.conv2_offset.bias.fill_(0.7)
        assert not torch.allclose(deform(x), expected, atol=1e-3)


def test_modulated_dcn_chunk_order_offset_then_mask():
    """detectron2: offset_x, offset_y, mask = chunk(3); offset = cat(offset_x, offset_y)."""
    plain, deform, x = _plain_and_deform_blocks(True, modulated=True, seed=6)
    with torch.no_grad():
        bias = torch.zeros(27)
        bias[18:] = math.log(3.0)  # sigmoid -> 0.75 on every tap; offsets stay 0
        deform.conv2_offset.bias.copy_(bias)
        plain.conv2.weight.mul_(0.75)  # conv is linear: mask 0.75 == weights * 0.75
        torch.testing.assert_close(deform(x), plain(x), rtol=1e-5, atol=1e-5)

        # A y-shift of +1 on every tap (first 18 channels, even = y) with mask 1 (logit large).
        bias = torch.zeros(27)
        bias[0:18:2] = 1.0
        bias[18:] = 30.0
        deform.conv2_offset.bias.copy_(bias)
        plain.conv2.weight.div_(0.75)
        mid = F.relu(deform.conv1(x))
        out = deform.conv2.norm(_shifted_conv(mid, deform.conv2.weight, 1, 0))
        out = F.relu(deform.conv3(F.relu(out)) + deform.shortcut(x))
        torch.testing.assert_close(deform(x), out, rtol=1e-4, atol=1e-4)
