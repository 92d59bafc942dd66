#!/usr/bin/env python3
"""Generate the key/shape lists of the official Mask Transfiner COCO checkpoints.

Writes ``R50-FPN.tsv``, ``R50-FPN-DCN.tsv``, ``R101-FPN.tsv`` and ``R101-FPN-DCN.tsv``
next to this script: one ``<key>\\t<comma-separated shape>`` line per entry of the
checkpoint's ``model`` state dict, in detectron2's state-dict (registration) order.

This deliberately does not import the project's ``model`` package: the lists are
test data that our model and loader are checked against, so they must be derived
independently, from detectron2's naming rules as read in the official code
(SysCV/transfiner, a detectron2 v0.5 fork, HEAD 5b61fb5).

Where each fact comes from (paths inside SysCV/transfiner):
- meta_arch/rcnn.py: GeneralizedRCNN registers backbone, proposal_generator,
  roi_heads; pixel_mean/pixel_std are non-persistent buffers (no keys).
- backbone/fpn.py: FPN registers fpn_lateral{s}/fpn_output{s} (s = log2 stride,
  2..5, interleaved per level) before ``bottom_up``; bias=True because norm "";
  LastLevelMaxPool has no parameters.
- backbone/resnet.py: BasicStem.conv1 [64,3,7,7]; stages res2..res5 with
  3/4/6/3 (R50) or 3/4/23/3 (R101) BottleneckBlocks; bottleneck width 64*2^i,
  out 256*2^i; block 0 of each stage has ``shortcut`` (registered first); convs
  have no bias and a ``.norm``. STRIDE_IN_1X1 only moves the stride, not any
  shape. DeformBottleneckBlock registers ``conv2_offset`` (a plain Conv2d *with*
  bias, no norm, 18 = 2*3*3 channels when not modulated) between conv1 and conv2;
  its conv2 is a DeformConv with weight [C,C,3,3] and no bias
  (layers/deform_conv.py). Configs *_deform.yaml: DEFORM_ON_PER_STAGE
  [False,True,True,True], DEFORM_MODULATED False.
- layers/batch_norm.py: FrozenBatchNorm2d has buffers weight, bias,
  running_mean, running_var and no num_batches_tracked.
- proposal_generator/rpn.py: StandardRPNHead.conv (3x3, bias),
  objectness_logits [A,256,1,1], anchor_deltas [4A,256,1,1], A = 3 aspect
  ratios; the anchor generator's cell_anchors are non-persistent (no keys).
- roi_heads/box_head.py + fast_rcnn.py: FastRCNNConvFCHead fc1 [1024,256*7*7],
  fc2 [1024,1024]; FastRCNNOutputLayers cls_score [K+1,1024], bbox_pred [4K,1024].
- poolers.py: the mask pooler (output 14 > 7, ROIAlignV2) owns
  conv_norm_relus_semantic = Sequential(Conv,ReLU,Conv,ReLU,Conv,ReLU,Conv),
  hence indices 0,2,4,6; ROIAlign modules have no parameters.
- roi_heads/mask_head.py: MaskRCNNConvUpsampleHead and TransformerEncoder, as
  listed in MASK_HEAD below (nn.MultiheadAttention with q=k=v dims stores a
  packed in_proj_weight/in_proj_bias; ConvTranspose2d weight is [in,out,kH,kW]).
- Expected totals (counted from the module definitions above):
  R50 53.28 M elements (203.3 MiB fp32), Transfiner extras 8.83 M,
  R50-DCN 205.5 MiB, R101 275.9 MiB, R101-DCN 280.8 MiB.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

Entry = tuple[str, tuple[int, ...]]

NUM_CLASSES = 80  # COCO
NUM_ANCHORS = 3  # one size per level x aspect ratios (0.5, 1, 2)
FPN_DIM = 256
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
VARIANTS = {
    "R50-FPN": (50, False),
    "R50-FPN-DCN": (50, True),
    "R101-FPN": (101, False),
    "R101-FPN-DCN": (101, True),
}


def conv(prefix: str, out_c: int, in_c: int, k: int, *, bias: bool, frozen_bn: bool) -> list[Entry]:
    """A detectron2 ``Conv2d`` (optionally with bias and a FrozenBatchNorm2d ``.norm``)."""
    out: list[Entry] = [(f"{prefix}.weight", (out_c, in_c, k, k))]
    if bias:
        out.append((f"{prefix}.bias", (out_c,)))
    if frozen_bn:
        out += [(f"{prefix}.norm.{b}", (out_c,)) for b in ("weight", "bias", "running_mean", "running_var")]
    return out


def resnet(depth: int, deform: bool) -> list[Entry]:
    """``backbone.bottom_up.*`` of a detectron2 ResNet with FrozenBN."""
    p = "backbone.bottom_up"
    out = conv(f"{p}.stem.conv1", 64, 3, 7, bias=False, frozen_bn=True)
    in_c, width = 64, 64
    for stage, n_blocks in enumerate(BLOCKS[depth]):
        out_c = width * 4
        dcn_stage = deform and stage > 0  # res3..res5
        for i in range(n_blocks):
            b = f"{p}.res{stage + 2}.{i}"
            if in_c != out_c:
                out += conv(f"{b}.shortcut", out_c, in_c, 1, bias=False, frozen_bn=True)
            out += conv(f"{b}.conv1", width, in_c, 1, bias=False, frozen_bn=True)
            if dcn_stage:
                out += conv(f"{b}.conv2_offset", 18, width, 3, bias=True, frozen_bn=False)
            out += conv(f"{b}.conv2", width, width, 3, bias=False, frozen_bn=True)
            out += conv(f"{b}.conv3", out_c, width, 1, bias=False, frozen_bn=True)
            in_c = out_c
        width *= 2
    return out


def fpn() -> list[Entry]:
    """``backbone.fpn_*``: registered before bottom_up, lateral/output interleaved."""
    out: list[Entry] = []
    for level, in_c in zip(range(2, 6), (256, 512, 1024, 2048)):
        out += conv(f"backbone.fpn_lateral{level}", FPN_DIM, in_c, 1, bias=True, frozen_bn=False)
        out += conv(f"backbone.fpn_output{level}", FPN_DIM, FPN_DIM, 3, bias=True, frozen_bn=False)
    return out


def rpn() -> list[Entry]:
    p = "proposal_generator.rpn_head"
    return (
        conv(f"{p}.conv", FPN_DIM, FPN_DIM, 3, bias=True, frozen_bn=False)
        + conv(f"{p}.objectness_logits", NUM_ANCHORS, FPN_DIM, 1, bias=True, frozen_bn=False)
        + conv(f"{p}.anchor_deltas", NUM_ANCHORS * 4, FPN_DIM, 1, bias=True, frozen_bn=False)
    )


def linear(prefix: str, out_f: int, in_f: int) -> list[Entry]:
    return [(f"{prefix}.weight", (out_f, in_f)), (f"{prefix}.bias", (out_f,))]


def box_branch() -> list[Entry]:
    return (
        linear("roi_heads.box_head.fc1", 1024, FPN_DIM * 7 * 7)
        + linear("roi_heads.box_head.fc2", 1024, 1024)
        + linear("roi_heads.box_predictor.cls_score", NUM_CLASSES + 1, 1024)
        + linear("roi_heads.box_predictor.bbox_pred", NUM_CLASSES * 4, 1024)
    )


def mask_pooler() -> list[Entry]:
    out: list[Entry] = []
    for i in (0, 2, 4, 6):
        out += conv(f"roi_heads.mask_pooler.conv_norm_relus_semantic.{i}", 256, 256, 3, bias=True, frozen_bn=False)
    return out


def mask_head() -> list[Entry]:
    """``roi_heads.mask_head.*`` in MaskRCNNConvUpsampleHead registration order."""
    p = "roi_heads.mask_head"

    def c(name: str, out_c: int, in_c: int, k: int) -> list[Entry]:
        return conv(f"{p}.{name}", out_c, in_c, k, bias=True, frozen_bn=False)

    def deconv(name: str, in_c: int, out_c: int) -> list[Entry]:
        return [(f"{p}.{name}.weight", (in_c, out_c, 2, 2)), (f"{p}.{name}.bias", (out_c,))]

    out: list[Entry] = []
    for i in range(1, 5):
        out += c(f"mask_fcn{i}", 256, 256, 3)
    out += deconv("deconv", 256, 256) + deconv("deconv_bo", 256, 256)
    out += c("predictor", NUM_CLASSES, 256, 1) + c("predictor_bo", 1, 256, 1)
    for i in range(3):
        lp = f"{p}.encoder.layers.{i}"
        out += [(f"{lp}.self_attn.in_proj_weight", (768, 256)), (f"{lp}.self_attn.in_proj_bias", (768,))]
        out += linear(f"{lp}.self_attn.out_proj", 256, 256)
        out += linear(f"{lp}.linear1", 2048, 256) + linear(f"{lp}.linear2", 256, 2048)
        out += [(f"{lp}.{norm}.{b}", (256,)) for norm in ("norm1", "norm2") for b in ("weight", "bias")]
    out += c("encoder.conv_fuse", 256, 257, 1) + c("encoder.conv_r1.0", 256, 256, 1) + c("encoder.conv_r1.2", 1, 256, 1)
    for i in range(1, 4):
        out += c(f"mask_fcn_uncertain{i}", 256, 256, 3)
    out += c("mask_fcn_uncertain4", 128, 256, 3)
    out += deconv("deconv_uncertain", 128, 128)
    out += c("predictor_uncertain", 1, 128, 1) + c("predictor_semantic_s", 1, 256, 1)
    return out


def state_dict_keys(depth: int, deform: bool) -> list[Entry]:
    """Every key of the checkpoint's ``model`` dict, in state-dict order."""
    return fpn() + resnet(depth, deform) + rpn() + box_branch() + mask_pooler() + mask_head()


def numel(entries: list[Entry]) -> int:
    return sum(math.prod(shape) for _, shape in entries)


# Keys that a vanilla detectron2 Mask R-CNN head also has (same names, same shapes).
_VANILLA_MASK_HEAD = {f"mask_fcn{i}" for i in range(1, 5)} | {"deconv", "predictor"}


def transfiner_extras(entries: list[Entry]) -> int:
    """Elements that Transfiner adds on top of a vanilla Mask R-CNN."""
    extra = 0
    for key, shape in entries:
        if key.startswith("roi_heads.mask_pooler."):
            extra += math.prod(shape)
        elif key.startswith("roi_heads.mask_head."):
            if key.split(".")[2] not in _VANILLA_MASK_HEAD:
                extra += math.prod(shape)
    return extra


def render(entries: list[Entry]) -> str:
    return "".join(f"{k}\t{','.join(map(str, s))}\n" for k, s in entries)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--check", action="store_true", help="only verify that the .tsv files are up to date")
    args = parser.parse_args()
    stale = []
    for name, (depth, deform) in VARIANTS.items():
        entries = state_dict_keys(depth, deform)
        keys = [k for k, _ in entries]
        assert len(keys) == len(set(keys)), f"duplicate keys in {name}"
        n = numel(entries)
        print(
            f"{name:14s} keys={len(entries):4d} elements={n:,} ({n / 1e6:.2f} M, {n * 4 / 2**20:.1f} MiB fp32)"
            f" transfiner_extras={transfiner_extras(entries) / 1e6:.2f} M"
        )
        path = args.out_dir / f"{name}.tsv"
        text = render(entries)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print("out of date:", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
