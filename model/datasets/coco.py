"""COCO-format instance segmentation data for training (images are read by ``model.inference.images``).

- The json is parsed and validated when a :class:`CocoDataset` is built (structure, ids, boxes,
  segmentation encodings, that every image file exists); images and masks are decoded lazily, one
  sample at a time, so a worker only holds the images of its batch. Problems are reported as
  :class:`DatasetError` naming the file and the image / annotation id; unusable but well-formed
  annotations (no polygon of 3 or more points, zero area) are skipped with a
  :class:`DatasetWarning`.
- Segmentations may be polygons (a list of ``[x0, y0, x1, y1, ...]``; their union is the mask),
  compressed RLE (``counts`` a string, or bytes) or uncompressed RLE (``counts`` a list of run
  lengths). COCO polygons cannot express holes ("polygons in polygons" are unioned, not subtracted);
  an object with a hole must be written as RLE.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, Sampler

from transfiner.model.config import InputConfig
from transfiner.model.inference.images import DatasetError, load_image_rgb
from transfiner.model.inference.preprocess import padded_shape, resized_shape

PathLike = str | Path
Polygons = list[list[float]]


class DatasetWarning(UserWarning):
    """An annotation skipped because it carries no usable mask (empty polygons, zero area)."""


@dataclass
class TrainingSample:
    """One augmented image and its instances, all in resized (and possibly flipped) pixels."""

    image: torch.Tensor  # float32 [3, H, W], BGR, 0..255
    boxes: torch.Tensor  # float32 [N, 4], xyxy
    classes: torch.Tensor  # int64 [N], contiguous 0..K-1
    masks: torch.Tensor  # bool [N, H, W]
    image_id: int
    original_size: tuple[int, int]  # (h, w) of the file, after EXIF orientation
    # iscrowd=1 regions (xyxy): excluded from the targets, as detectron2; kept for samplers that
    # want to ignore proposals there.
    crowd_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 4)))


# --------------------------------------------------------------------------------------------
# Segmentations


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _clean_segmentation(segm: Any, height: int, width: int) -> Polygons | dict | None:
    """Checks one segmentation; returns polygons (those with >= 3 points), a normalised RLE dict
    (compressed counts as bytes), or None when no polygon is left. Raises ValueError if malformed."""
    if isinstance(segm, list):
        if segm and all(_is_number(v) for v in segm):
            raise ValueError("segmentation is a flat list of numbers; expected a list of polygons")
        polygons = []
        for polygon in segm:
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                raise ValueError("each polygon must be a list of numbers [x0, y0, x1, y1, ...]")
            # As detectron2: fewer than 3 points (and odd lengths) cannot be rasterised; dropping
            # them also keeps 4-number polygons from being read as boxes by frPyObjects.
            if len(polygon) >= 6 and len(polygon) % 2 == 0:
                polygons.append([float(v) for v in polygon])
        return polygons or None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) for v in size)):
            raise ValueError(f"RLE 'size' must be [height, width], got {size!r}")
        if list(size) != [height, width]:
            raise ValueError(f"RLE size {list(size)} does not match the image size [{height}, {width}] (h, w)")
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts):
                raise ValueError("uncompressed RLE 'counts' must be non-negative integers")
            if sum(counts) != height * width:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected h*w = {height * width}")
            return {"size": [height, width], "counts": list(counts)}
        if isinstance(counts, (str, bytes, bytearray)):
            # Compressed counts only use characters '0'..'o' (48..111), so latin-1 (which some
            # older tools used to turn the bytes into a json string) and ascii agree.
            try:
                raw = counts.encode("latin-1") if isinstance(counts, str) else bytes(counts)
            except UnicodeEncodeError:
                raw = b"\0"
            if not raw or not all(48 <= c < 112 for c in raw):
                raise ValueError("compressed RLE 'counts' must be a non-empty string of characters '0'..'o'")
            return {"size": [height, width], "counts": raw}
        raise ValueError("RLE 'counts' must be a string (compressed) or a list of integers (uncompressed)")
    raise ValueError(f"segmentation must be a list of polygons or an RLE dict, got {type(segm).__name__}")


def _compressed_rle_total(counts: bytes) -> int:
    """The sum of the runs of a compressed RLE string (pycocotools' rleFrString), -1 if malformed.

    pycocotools' decoder writes runs without bounds checks, so a string whose runs overflow the
    image would corrupt memory; it is checked here first."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value = shift = 0
        more = True
        while more:
            if pos >= len(counts):
                return -1
            char = counts[pos] - 48
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            pos += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return -1
        runs.append(value)
    return sum(runs)


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, compressed or uncompressed RLE) -> bool mask [height, width].

    Polygons with fewer than 3 points are ignored (none left gives an empty mask); raises
    ValueError for malformed input, including an RLE whose size or run total mismatches the image.
    """
    segm = _clean_segmentation(segmentation, height, width)
    if segm is None:
        return np.zeros((height, width), dtype=bool)
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        if _compressed_rle_total(segm["counts"]) != height * width:
            raise ValueError(f"compressed RLE counts do not add up to h*w = {height * width}")
        rle = segm
    return mask_utils.decode(rle).astype(bool)


# --------------------------------------------------------------------------------------------
# Data set


@dataclass(frozen=True)
class _Instance:
    ann_id: int
    bbox: tuple[float, float, float, float]  # xywh, as in the json
    class_index: int
    segmentation: Any  # cleaned by _clean_segmentation


@dataclass(frozen=True)
class _ImageRecord:
    image_id: int
    path: Path
    height: int
    width: int
    instances: tuple[_Instance, ...]
    crowd_boxes: tuple[tuple[float, float, float, float], ...]  # xywh


class CocoDataset(Dataset):
    """Instance segmentation samples from a COCO json, augmented as detectron2 trains Mask R-CNN.

    - ``image_root``: where the images' ``file_name`` are relative to. By default the first of
      ``<json dir>/images`` and ``<json dir>`` that holds the first image; if neither does,
      ``<json dir>/images`` if that folder exists, else ``<json dir>`` (the missing file is then
      reported). Absolute file names are used as they are.
    - ``class_ids``: the COCO category ids to learn, in the order of the model's classes (e.g. a
      config's ``category_ids``); annotations of other categories are ignored. By default every
      category, in sorted id order. Class index ``k`` is ``category_ids[k]``.
    - ``train``: shortest-edge jitter (short side drawn from ``input_cfg.min_size_train``, long side
      at most ``max_size_train``) and horizontal flip with p=0.5; otherwise a plain resize to
      ``min_size_test`` / ``max_size_test``. The draws depend only on ``(seed, epoch, index)`` (see
      :meth:`set_epoch`), so they do not depend on workers or iteration order.
    - ``filter_empty`` (default: ``train``): drop images with no non-crowd instance, as detectron2's
      DATASETS.FILTER_EMPTY_ANNOTATIONS. Kept images may still yield N=0 samples (tensors of shape
      [0, 4], [0], [0, H, W]) when every mask is empty at the drawn size.
    - Masks: polygons are scaled and rasterised directly at the output size (exact geometry, and
      several times cheaper than resizing a full-resolution bitmask). RLE masks are decoded at the
      file's resolution, resized with antialiased bilinear filtering and thresholded at 0.5
      (foreground where more than half covered): the same filter as the image, so mask edges stay
      aligned with image edges, whereas nearest-neighbour sampling shifts edges by up to half a
      source pixel and aliases thin parts when shrinking. Both agree on pixel-aligned shapes. Boxes
      are the json boxes scaled, flipped and clipped to the image, as detectron2; instances whose
      box or mask is empty after resizing are dropped, as detectron2's filter_empty_instances.
    """

    def __init__(
        self,
        annotations_json: PathLike,
        image_root: PathLike | None = None,
        class_ids: Sequence[int] | None = None,
        train: bool = True,
        input_cfg: InputConfig | None = None,
        seed: int = 0,
        filter_empty: bool | None = None,
    ) -> None:
        self.annotations_path = Path(annotations_json)
        self.train = train
        self.input_cfg = input_cfg or InputConfig()
        if train and not self.input_cfg.min_size_train:
            raise ValueError("input_cfg.min_size_train needs at least one size")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")  # numpy seed sequences need it
        self.seed = seed
        self.epoch = 0
        coco = self._load_coco()
        data = coco.dataset
        categories = self._check_categories(data)
        if class_ids is None:
            class_ids = sorted(categories)
        for cid in class_ids:
            if cid not in categories:
                raise DatasetError(f"{self.annotations_path}: class id {cid} is not among its categories")
        if len(set(class_ids)) != len(class_ids):
            raise DatasetError(f"duplicate class ids {list(class_ids)}")
        self.category_ids: tuple[int, ...] = tuple(int(c) for c in class_ids)
        self.class_names: tuple[str, ...] = tuple(categories[c] for c in self.category_ids)
        self.image_root = Path(image_root) if image_root is not None else self._default_root(data["images"])
        records = self._parse(coco, categories)
        self.filter_empty = train if filter_empty is None else filter_empty
        if self.filter_empty:
            records = [r for r in records if r.instances]
        for record in records:
            if not record.path.is_file():
                raise DatasetError(
                    f"{record.path}: image file not found (image id {record.image_id} in "
                    f"{self.annotations_path}, image root {self.image_root})"
                )
        self._records = records
        self.image_ids: tuple[int, ...] = tuple(r.image_id for r in records)

    # -- parsing -------------------------------------------------------------------------------

    def _load_coco(self) -> COCO:
        path = self.annotations_path
        if not path.is_file():
            raise DatasetError(f"{path}: annotation file not found")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco = COCO(str(path))
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}: invalid JSON ({error})") from None
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(f"{path}: cannot read ({error})") from None
        except KeyError as error:
            raise DatasetError(f"{path}: not a COCO annotation file (an entry lacks the field {error})") from None
        except (TypeError, AssertionError, AttributeError) as error:
            raise DatasetError(f"{path}: not a COCO annotation file ({type(error).__name__}: {error})") from None
        for key in ("images", "categories"):
            if not isinstance(coco.dataset.get(key), list):
                raise DatasetError(f"{path}: not a COCO annotation file (no '{key}' list)")
        if not isinstance(coco.dataset.get("annotations", []), list):
            raise DatasetError(f"{path}: 'annotations' must be a list")
        return coco

    def _check_categories(self, data: dict) -> dict[int, str]:
        categories: dict[int, str] = {}
        for cat in data["categories"]:
            cid = cat.get("id") if isinstance(cat, dict) else None
            if not _is_int(cid) or cid in categories:
                raise DatasetError(f"{self.annotations_path}: bad or duplicate category id {cid!r}")
            categories[cid] = str(cat.get("name", cid))
        return categories

    def _default_root(self, images: list) -> Path:
        json_dir = self.annotations_path.parent
        first = next((img.get("file_name") for img in images if isinstance(img, dict)), None)
        if isinstance(first, str) and not Path(first).is_absolute():
            for candidate in (json_dir / "images", json_dir):
                if (candidate / first).is_file():
                    return candidate
            if (json_dir / "images").is_dir():
                return json_dir / "images"
        return json_dir

    def _parse(self, coco: COCO, categories: dict[int, str]) -> list[_ImageRecord]:
        path = self.annotations_path
        class_index = {cid: k for k, cid in enumerate(self.category_ids)}
        seen_images: set[int] = set()
        seen_annotations: set[int] = set()
        images = {}
        for img in coco.dataset["images"]:
            iid = img.get("id")
            where = f"{path}: image id {iid!r}"
            if not _is_int(iid) or iid in seen_images:
                raise DatasetError(f"{where}: image ids must be unique integers")
            seen_images.add(iid)
            if not isinstance(img.get("file_name"), str) or not img["file_name"]:
                raise DatasetError(f"{where}: missing 'file_name'")
            if not all(_is_int(img.get(k)) and img[k] > 0 for k in ("width", "height")):
                raise DatasetError(f"{where}: 'width' and 'height' must be positive integers")
            images[iid] = img
        orphans = [a.get("id") for a in coco.dataset.get("annotations", []) if a.get("image_id") not in images]
        if orphans:
            raise DatasetError(f"{path}: annotation ids {orphans[:5]} refer to image ids not in 'images'")
        records = []
        skipped: list[int] = []
        flat: list[int] = []  # boxes of zero width or height
        for iid, img in images.items():
            height, width = img["height"], img["width"]
            instances, crowd = [], []
            for ann in coco.imgToAnns.get(iid, []):
                aid = ann.get("id")
                where = f"{path}: image id {iid}, annotation id {aid!r}"
                if not _is_int(aid) or aid in seen_annotations:
                    raise DatasetError(f"{where}: annotation ids must be unique integers")
                seen_annotations.add(aid)
                cid = ann.get("category_id")
                if cid not in categories:
                    raise DatasetError(f"{where}: unknown category id {cid!r}")
                bbox = ann.get("bbox")
                if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                    raise DatasetError(f"{where}: 'bbox' must be [x, y, width, height] numbers, got {bbox!r:.80}")
                if bbox[2] < 0 or bbox[3] < 0:
                    raise DatasetError(f"{where}: negative bbox size {bbox}")
                if cid not in class_index:
                    continue
                if ann.get("iscrowd", 0):
                    crowd.append(tuple(float(v) for v in bbox))
                    continue
                try:
                    segm = _clean_segmentation(ann.get("segmentation"), height, width)
                except ValueError as error:
                    raise DatasetError(f"{where}: {error}") from None
                if segm is None:
                    skipped.append(aid)
                    continue
                if bbox[2] == 0 or bbox[3] == 0:
                    flat.append(aid)  # dropped with the empty boxes after resizing, as detectron2
                instances.append(_Instance(aid, tuple(float(v) for v in bbox), class_index[cid], segm))
            records.append(
                _ImageRecord(iid, self.image_root / img["file_name"], height, width, tuple(instances), tuple(crowd))
            )
        if skipped:
            warnings.warn(
                f"{path}: skipped {len(skipped)} annotation(s) with no polygon of 3 or more points "
                f"(ids {skipped[:10]}{' ...' if len(skipped) > 10 else ''})",
                DatasetWarning,
                stacklevel=3,
            )
        if flat and self.train:
            warnings.warn(
                f"{path}: {len(flat)} annotation(s) have a box of zero width or height and are not trained on, "
                f"whatever their mask (ids {flat[:10]}{' ...' if len(flat) > 10 else ''})",
                DatasetWarning,
                stacklevel=3,
            )
        return records

    # -- samples -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def set_epoch(self, epoch: int) -> None:
        """Selects the augmentation draws of an epoch; call before iterating a loader (workers
        copy the data set when an iteration starts)."""
        self.epoch = epoch

    def _draw(self, index: int) -> tuple[tuple[int, int], bool]:
        """Sample ``index``'s augmentation in this epoch: ((h, w) it is resized to, flipped?)."""
        record, cfg = self._records[index], self.input_cfg
        if not self.train:
            return resized_shape(record.height, record.width, cfg.min_size_test, cfg.max_size_test), False
        rng = np.random.default_rng([self.seed, self.epoch, index])
        short = cfg.min_size_train[int(rng.integers(len(cfg.min_size_train)))]
        flip = bool(rng.random() < 0.5)
        return resized_shape(record.height, record.width, short, cfg.max_size_train), flip

    def canvas(self, index: int) -> tuple[int, int]:
        """(H, W) the sample ``index`` of this epoch is padded to alone (``padded_shape``), known
        without reading the image: what ``CanvasBatchSampler`` groups by."""
        return padded_shape(*self._draw(index)[0], self.input_cfg)

    def __getitem__(self, index: int) -> TrainingSample:
        record = self._records[index]
        where = f"image id {record.image_id} in {self.annotations_path}"
        try:
            rgb = load_image_rgb(record.path)
        except DatasetError as error:
            raise DatasetError(f"{error} ({where})") from None
        if rgb.shape[:2] != (record.height, record.width):
            raise DatasetError(
                f"{record.path}: image is {rgb.shape[1]}x{rgb.shape[0]} (w x h, after EXIF orientation) "
                f"but {where} says {record.width}x{record.height}"
            )
        (new_h, new_w), flip = self._draw(index)
        height, width = record.height, record.width

        image = torch.from_numpy(rgb).permute(2, 0, 1).flip(0).float()  # RGB -> BGR
        if (new_h, new_w) != (height, width):
            image = F.interpolate(
                image[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
            )[0].clamp_(0, 255)
        instances, masks = self._instance_masks(record, (new_h, new_w))
        scale = torch.tensor([new_w / width, new_h / height] * 2)
        boxes = _xywh_to_xyxy([i.bbox for i in instances]) * scale
        crowd_boxes = _xywh_to_xyxy(list(record.crowd_boxes)) * scale
        limits = torch.tensor([new_w, new_h] * 2, dtype=torch.float32)
        boxes, crowd_boxes = boxes.clamp(min=0).minimum(limits), crowd_boxes.clamp(min=0).minimum(limits)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & masks.flatten(1).any(1)
        boxes, masks = boxes[keep], masks[keep]
        classes = torch.tensor([i.class_index for i in instances], dtype=torch.int64)[keep]
        if flip:  # after resizing, so a flipped sample is exactly the mirror of an unflipped one
            image, masks = image.flip(-1), masks.flip(-1)
            boxes, crowd_boxes = _flip_boxes(boxes, new_w), _flip_boxes(crowd_boxes, new_w)
        return TrainingSample(
            image.contiguous(), boxes, classes, masks.contiguous(), record.image_id, (height, width), crowd_boxes
        )

    def _instance_masks(self, record: _ImageRecord, size: tuple[int, int]) -> tuple[list[_Instance], torch.Tensor]:
        """The instances with a non-empty mask in the file, and their masks [N, *size]."""
        kept, masks, empty = [], [], []
        for inst in record.instances:
            try:
                mask = _rasterize(inst.segmentation, record.height, record.width, size)
            except ValueError as error:
                raise DatasetError(
                    f"{self.annotations_path}: image id {record.image_id}, annotation id {inst.ann_id}: {error}"
                ) from None
            if mask is None:
                empty.append(inst.ann_id)
                continue
            kept.append(inst)
            masks.append(mask)
        if empty:
            warnings.warn(
                f"{self.annotations_path}: image id {record.image_id}: skipped annotation(s) {empty} "
                "whose mask has zero area",
                DatasetWarning,
                stacklevel=3,
            )
        stacked = torch.stack(masks) if masks else torch.zeros((0, *size), dtype=torch.bool)
        return kept, stacked


def _rasterize(segm: Polygons | dict, height: int, width: int, size: tuple[int, int]) -> torch.Tensor | None:
    """A cleaned segmentation of a height x width image -> bool mask of ``size`` (h, w), or None
    when it has zero area at the original size."""
    if isinstance(segm, list):
        if mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(segm, height, width))) == 0:
            return None
        # Polygon coordinates are pixel corners (x in [0, width]), so the image's scale maps them.
        scale_x, scale_y = size[1] / width, size[0] / height
        scaled = [[v * (scale_x if k % 2 == 0 else scale_y) for k, v in enumerate(p)] for p in segm]
        return torch.from_numpy(decode_segmentation(scaled, *size))
    mask = torch.from_numpy(decode_segmentation(segm, height, width))
    if not mask.any():
        return None
    if tuple(mask.shape) == size:
        return mask
    resized = F.interpolate(mask[None, None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[0, 0] > 0.5


def _xywh_to_xyxy(boxes: list[tuple[float, float, float, float]]) -> torch.Tensor:
    xywh = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), dim=1)


def _flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)


# --------------------------------------------------------------------------------------------
# Loading


def collate(samples: list[TrainingSample]) -> list[TrainingSample]:
    """Keeps the samples as a list: the model resizes nothing and pads the batch itself."""
    return list(samples)


class CanvasBatchSampler(Sampler[list[int]]):
    """Shuffled batches whose samples all have one canvas (``CocoDataset.canvas``), as the
    Predictor and the service batch at inference: a sample is then padded exactly as it would be
    alone, so the padding a model is trained with (which GroupNorm's statistics and every
    convolution near the border see) is the padding it meets when served.

    - Each epoch walks a fresh permutation (from ``generator``) and fills one bucket per canvas, as
      detectron2's aspect-ratio grouping; a full bucket is a batch, and the buckets left at the end
      of the epoch are yielded as smaller batches, so every sample is seen once per epoch.
    - Call the data set's ``set_epoch`` before iterating, as for its augmentation draws.
    """

    def __init__(self, dataset: CocoDataset, batch_size: int, generator: torch.Generator) -> None:
        self.dataset, self.batch_size, self.generator = dataset, batch_size, generator

    def __iter__(self):
        buckets: dict[tuple[int, int], list[int]] = {}
        for index in torch.randperm(len(self.dataset), generator=self.generator).tolist():
            bucket = buckets.setdefault(self.dataset.canvas(index), [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket.copy()
                bucket.clear()
        yield from (bucket for bucket in buckets.values() if bucket)

    def __len__(self) -> int:
        counts: dict[tuple[int, int], int] = {}
        for index in range(len(self.dataset)):
            canvas = self.dataset.canvas(index)
            counts[canvas] = counts.get(canvas, 0) + 1
        return sum(math.ceil(n / self.batch_size) for n in counts.values())


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader of ``list[TrainingSample]`` batches whose shuffling is seeded by ``seed``.

    The shuffle order follows a generator created here, so a run that iterates the same number
    of epochs from a fresh loader sees the same orders; augmentation draws come from the data
    set's own ``(seed, epoch, index)`` rule, independent of workers. Shuffled batches of a
    :class:`CocoDataset` hold one canvas each (:class:`CanvasBatchSampler`).
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    if shuffle and isinstance(dataset, CocoDataset):
        return DataLoader(
            dataset,
            batch_sampler=CanvasBatchSampler(dataset, batch_size, generator),
            num_workers=num_workers,
            collate_fn=collate,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        generator=generator,
    )
