"""Typed model configuration and the named presets.

Defaults follow detectron2's ``Base-RCNN-FPN.yaml`` and the official SysCV/transfiner code, which
hard-codes the Transfiner constants in its mask head and pooler (``detectron2/modeling/roi_heads/
mask_head.py``, ``detectron2/modeling/poolers.py``) rather than in its configs.
A config round-trips through ``to_dict`` / ``from_dict`` so it can be stored inside checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

COCO_CLASSES: tuple[str, ...] = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
# The COCO category ids of the 80 contiguous classes above (the json ids skip some numbers).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    27,
    28,
    31,
    32,
    33,
    34,
    35,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    63,
    64,
    65,
    67,
    70,
    72,
    73,
    74,
    75,
    76,
    77,
    78,
    79,
    80,
    81,
    82,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
)


@dataclass
class InputConfig:
    """Pre-processing, as detectron2: BGR pixels in 0..255, mean subtracted, padded to /32."""

    min_size_test: int = 800
    max_size_test: int = 1333
    min_size_train: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size_train: int = 1333
    pixel_mean: tuple[float, float, float] = (103.530, 116.280, 123.675)  # BGR
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size_divisibility: int = 32


@dataclass
class ResNetConfig:
    depth: int = 50  # 18, 34, 50 or 101
    stem_out_channels: int = 64
    res2_out_channels: int = 256  # must be 64 for depth 18/34
    width_per_group: int = 64
    num_groups: int = 1
    stride_in_1x1: bool = True  # MSRA weights put the stride-2 in the first 1x1 conv
    deform_on_per_stage: tuple[bool, bool, bool, bool] = (False, False, False, False)
    deform_modulated: bool = False
    freeze_at: int = 2  # stem and res2 are frozen when training from ImageNet weights
    # FrozenBN for (official, ImageNet-initialised) weights; GN to train from scratch.
    norm: str = "FrozenBN"


@dataclass
class FPNConfig:
    out_channels: int = 256


@dataclass
class RPNConfig:
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one size per level p2..p6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    pre_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 1000
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    iou_thresholds: tuple[float, float] = (0.3, 0.7)
    box_reg_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)


@dataclass
class ROIHeadsConfig:
    num_classes: int = 80
    box_pooler_resolution: int = 7
    fc_dim: int = 1024
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    iou_threshold: float = 0.5
    box_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    score_thresh_test: float = 0.05
    nms_thresh_test: float = 0.5
    detections_per_image: int = 100
    # Per image, only the best-scoring (proposal, class) candidates above the score threshold go
    # into NMS (mmdetection's ``nms_pre``), so NMS work is bounded at any threshold. Why 3000:
    # at the usual 0.05 an image has far fewer (a proposal gives at most 19, and most proposals
    # lean to the background or one class; the synthetic R50-sized outputs of
    # scripts/bench_box_inference.py give 1,100), so results are those without a bound; at
    # threshold 0 (80,000 per image) NMS time grows with the bound, and 3000 keeps box inference
    # at 3 ms per image on an H200 (3500: 4.3 ms); and it must stay below 3840, TensorRT's
    # largest TopK.
    pre_nms_topk_test: int = 3000


@dataclass
class MaskHeadConfig:
    pooler_resolution: int = 14
    conv_dim: int = 256
    num_conv: int = 4
    # The incoherence detector's last conv halves the width (official: 256 -> 128).
    incoherence_dim: int = 128


# Caps that cover every 28-cell at every level: node selection is then exactly the official
# thresholding (up to 196 + 784 + 3136 + 12544 = 16,660 tokens a box; compute follows the real
# nodes, see model.modeling.refiner).
COVERING_MAX_CELLS: tuple[int, int, int] = (784, 784, 784)


@dataclass
class TransfinerConfig:
    """The refinement head. Node selection is per level of the point quadtree (28, 56, 112).

    ``thresholds`` are the official inference thresholds on the predicted incoherence;
    ``max_cells`` bounds how many 28x28 cells each level may take (a fixed-size top-k), so a
    box contributes at most ``196 + max_cells[0] + 4 * max_cells[1] + 16 * max_cells[2]`` tokens.
    The default covers every cell (the official selection); smaller caps are a speed knob that
    changes results wherever a box has more above-threshold cells than its cap.
    """

    enabled: bool = True
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 3
    dim_feedforward: int = 2048
    dropout: float = 0.1
    thresholds: tuple[float, float, float] = (1e-6, 0.125, 0.8)
    max_cells: tuple[int, int, int] = COVERING_MAX_CELLS
    # How many detections per image are refined (the official code: 10 for the whole batch).
    max_refined_per_image: int = 100
    # Tokens (boxes x padded sequence length) refined together in one pass: peak memory grows
    # with this, not with the detection count or the caps (each box is independent, so the
    # chunking never changes a result). Exported graphs take all boxes in one pass. On a CPU
    # shorter passes are faster (about 8 boxes at the shipped model's caps); a GPU needs long ones
    # to fill the card (docs/gpu-performance.md: the token sweep). These three are this code's choice for the
    # machine it runs on, not part of a model: a checkpoint's stored values give way to them
    # (``with_current_chunking``).
    tokens_per_chunk: int = 24_576
    gpu_tokens_per_chunk: int = 393_216
    # And at most this many boxes per pass.
    boxes_per_chunk: int = 128
    # Training: nodes sampled per level and box, as the official code (issue 3 uses these).
    train_thresholds: tuple[float, float, float] = (0.125, 0.5, 0.5)
    train_nodes_per_level: int = 150
    train_max_boxes: int = 30


@dataclass
class ModelConfig:
    name: str = "R50-FPN"
    input: InputConfig = field(default_factory=InputConfig)
    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    transfiner: TransfinerConfig = field(default_factory=TransfinerConfig)
    class_names: tuple[str, ...] = COCO_CLASSES
    # The category id written to COCO results for each contiguous class index.
    category_ids: tuple[int, ...] = COCO_CATEGORY_IDS

    def __post_init__(self) -> None:
        if len(self.class_names) != self.roi_heads.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.roi_heads.num_classes} classes")
        if len(self.category_ids) != self.roi_heads.num_classes:
            raise ValueError(f"{len(self.category_ids)} category ids for {self.roi_heads.num_classes} classes")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuilds nested dataclasses; lists become tuples because JSON has no tuples."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in hints:
            raise ValueError(f"unknown config field {cls.__name__}.{key}")
        default = hints[key].default_factory if hints[key].default_factory is not dataclasses.MISSING else None
        if default is not None and dataclasses.is_dataclass(default):
            value = _from_dict(default, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def parse_max_cells(text: str) -> tuple[int, int, int]:
    """``"A,B,C"`` (the ``--max-cells`` / ``TRANSFINER_MAX_CELLS`` form) -> caps per level, each 1..784."""
    try:
        caps = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        caps = ()
    if len(caps) != 3 or not all(1 <= k <= 784 for k in caps):
        raise ValueError(f"max cells must be three integers in 1..784 as A,B,C (e.g. 784,196,64), got {text!r}")
    return caps  # type: ignore[return-value]


def with_max_cells(cfg: ModelConfig, max_cells: tuple[int, int, int] | None) -> ModelConfig:
    """``cfg`` with other node caps (``None``: unchanged). Caps change no weight, only inference."""
    if max_cells is None:
        return cfg
    return dataclasses.replace(cfg, transfiner=dataclasses.replace(cfg.transfiner, max_cells=tuple(max_cells)))


def with_current_chunking(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with this code's refiner chunk budgets (``TransfinerConfig.tokens_per_chunk``,
    ``gpu_tokens_per_chunk``, ``boxes_per_chunk``) instead of those stored with it: they change
    no result, only speed and memory, and are tuned to the code and the hardware, not the weights."""
    current = TransfinerConfig()
    chunking = {
        name: getattr(current, name) for name in ("tokens_per_chunk", "gpu_tokens_per_chunk", "boxes_per_chunk")
    }
    return dataclasses.replace(cfg, transfiner=dataclasses.replace(cfg.transfiner, **chunking))


PRESET_NAMES = ("R50-FPN", "R101-FPN", "R50-FPN-DCN", "R101-FPN-DCN", "small")


def preset(name: str) -> ModelConfig:
    """The named configurations: the four official COCO models and a small CPU model."""
    dcn = (False, True, True, True)
    if name == "R50-FPN":
        return ModelConfig(name=name)
    if name == "R101-FPN":
        return ModelConfig(name=name, resnet=ResNetConfig(depth=101))
    if name == "R50-FPN-DCN":
        return ModelConfig(name=name, resnet=ResNetConfig(depth=50, deform_on_per_stage=dcn))
    if name == "R101-FPN-DCN":
        return ModelConfig(name=name, resnet=ResNetConfig(depth=101, deform_on_per_stage=dcn))
    if name == "small":
        return small_config()
    raise ValueError(f"unknown config {name!r}; choose one of {', '.join(PRESET_NAMES)}")


def small_config(
    class_names: tuple[str, ...] = ("object",), category_ids: tuple[int, ...] | None = None
) -> ModelConfig:
    """A ResNet-18 model narrow enough to train and test on two CPU cores.

    Every part of the architecture is kept (semantic P2 convs, incoherence detector, 3-layer
    sequence encoder, quadtree to 112x112); only widths, depths and image sizes shrink.
    """
    num_classes = len(class_names)
    return ModelConfig(
        name="small",
        # Native make-shapes resolution: downscaling would erase the detail the refiner is for.
        input=InputConfig(
            min_size_test=384,
            max_size_test=640,
            min_size_train=(320, 352, 384, 416),
            max_size_train=640,
        ),
        resnet=ResNetConfig(depth=18, res2_out_channels=64, freeze_at=0, norm="GN"),
        fpn=FPNConfig(out_channels=64),
        rpn=RPNConfig(
            anchor_sizes=(16, 32, 64, 128, 256),
            pre_nms_topk_train=1000,
            pre_nms_topk_test=500,
            post_nms_topk_train=500,
            post_nms_topk_test=200,
        ),
        roi_heads=ROIHeadsConfig(num_classes=num_classes, fc_dim=256, batch_size_per_image=128),
        mask_head=MaskHeadConfig(conv_dim=64, incoherence_dim=32),
        # No dropout: it costs a quarter of a CPU training step and a short schedule needs none.
        # Caps as the default model was trained and evaluated with (covering caps: README table).
        transfiner=TransfinerConfig(
            d_model=64,
            num_heads=4,
            num_layers=3,
            dim_feedforward=256,
            dropout=0.0,
            max_cells=(784, 196, 64),
        ),
        class_names=class_names,
        category_ids=category_ids or tuple(range(1, num_classes + 1)),
    )
