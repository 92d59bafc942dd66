"""The COCO training data path on tiny data sets written into tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from transfiner.model.config import InputConfig
from transfiner.model.datasets.coco import (
    CocoDataset,
    DatasetError,
    DatasetWarning,
    TrainingSample,
    decode_segmentation,
    make_loader,
)
from transfiner.model.inference.images import load_image_rgb
from transfiner.model.inference.preprocess import resized_shape

H, W = 30, 40
# Exact sizes so test-mode samples are not resized and masks compare pixel for pixel.
NO_RESIZE = InputConfig(min_size_test=H, max_size_test=W)
RECT = np.zeros((H, W), dtype=bool)
RECT[10:20, 5:15] = True
RECT_POLYGON = [[5, 10, 15, 10, 15, 20, 5, 20]]  # pixel corners: covers columns 5..14, rows 10..19
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}]


def compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def uncompressed(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
    if flat[0]:
        runs = [0] + runs  # runs start with background
    return {"size": [mask.shape[0], mask.shape[1]], "counts": runs}


def asymmetric_image(height: int = H, width: int = W) -> np.ndarray:
    """Left-right asymmetric content, so a flip is visible."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=2).astype(np.uint8)


def ann(aid: int, segmentation, bbox=(5, 10, 10, 10), image_id: int = 1, category_id: int = 1, **extra) -> dict:
    return {
        "id": aid,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": list(bbox),
        "segmentation": segmentation,
        "area": 100,
        "iscrowd": 0,
        **extra,
    }


def write(
    tmp_path: Path, annotations: list[dict], images: list[dict] | None = None, pixels: np.ndarray | None = None
) -> Path:
    """ann.json plus images/<id>.png for every image entry (written with ``pixels``)."""
    images = images or [{"id": 1, "file_name": "1.png", "width": W, "height": H}]
    (tmp_path / "images").mkdir(exist_ok=True)
    for img in images:
        data = pixels if pixels is not None else asymmetric_image(img["height"], img["width"])
        Image.fromarray(data).save(tmp_path / "images" / img["file_name"])
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


# -- encodings -------------------------------------------------------------------------------


def test_every_segmentation_encoding_decodes_to_the_drawn_rectangle(tmp_path):
    latin1 = compressed(RECT)
    latin1["counts"] = mask_utils.encode(np.asfortranarray(RECT.astype(np.uint8)))["counts"].decode("latin-1")
    encodings = [RECT_POLYGON, compressed(RECT), latin1, uncompressed(RECT)]
    path = write(tmp_path, [ann(i + 1, s) for i, s in enumerate(encodings)])
    sample = CocoDataset(path, train=False, input_cfg=NO_RESIZE)[0]
    assert sample.masks.shape == (4, H, W) and sample.masks.dtype == torch.bool
    for mask in sample.masks:
        assert torch.equal(mask, torch.from_numpy(RECT))
    torch.testing.assert_close(sample.boxes, torch.tensor([[5.0, 10.0, 15.0, 20.0]] * 4))
    # In-memory annotations may carry the bytes pycocotools returns.
    as_bytes = dict(compressed(RECT), counts=compressed(RECT)["counts"].encode())
    assert np.array_equal(decode_segmentation(as_bytes, H, W), RECT)


def test_polygon_and_rle_paths_agree_after_resizing(tmp_path):
    # Polygons are rasterised at the output size, RLE resized bilinearly; x2 keeps edges on pixels.
    path = write(tmp_path, [ann(1, RECT_POLYGON), ann(2, compressed(RECT)), ann(3, uncompressed(RECT))])
    masks = CocoDataset(path, train=False, input_cfg=InputConfig(min_size_test=2 * H, max_size_test=2 * W))[0].masks
    expected = torch.zeros((2 * H, 2 * W), dtype=torch.bool)
    expected[20:40, 10:30] = True
    for mask in masks:
        assert torch.equal(mask, expected)


def test_hole_needs_rle_and_polygons_are_unioned(tmp_path):
    ring = RECT.copy()
    ring[13:17, 8:12] = False
    assert np.array_equal(decode_segmentation(compressed(ring), H, W), ring)
    inner = [[8, 13, 12, 13, 12, 17, 8, 17]]
    assert np.array_equal(decode_segmentation(RECT_POLYGON + inner, H, W), RECT)  # no hole


def test_empty_polygons_are_skipped_with_a_warning(tmp_path):
    path = write(tmp_path, [ann(1, []), ann(2, [[1, 2, 3, 4]]), ann(3, RECT_POLYGON)])
    with pytest.warns(DatasetWarning, match=r"ids \[1, 2\]"):
        dataset = CocoDataset(path, train=False, input_cfg=NO_RESIZE)
    assert len(dataset[0].masks) == 1


def test_zero_area_mask_is_skipped_with_a_warning(tmp_path):
    flat = [[5, 10, 15, 10, 25, 10]]  # three collinear points
    path = write(tmp_path, [ann(7, flat), ann(8, RECT_POLYGON)])
    dataset = CocoDataset(path, train=False, input_cfg=NO_RESIZE)
    with pytest.warns(DatasetWarning, match=r"\[7\].*zero area"):
        assert len(dataset[0].classes) == 1


def test_a_zero_width_box_is_not_trained_on_and_says_so(tmp_path):
    """detectron2 drops instances whose box is empty, whatever the mask: kept, but no longer silent."""
    path = write(tmp_path, [ann(4, RECT_POLYGON, bbox=(5, 10, 0, 10)), ann(5, RECT_POLYGON)])
    with pytest.warns(DatasetWarning, match=r"1 annotation\(s\) have a box of zero width.*\[4\]"):
        dataset = CocoDataset(path, train=True, input_cfg=NO_RESIZE)
    assert len(dataset[0].classes) == 1


# -- targets ---------------------------------------------------------------------------------


def test_crowd_is_excluded_and_categories_are_contiguous(tmp_path):
    path = write(
        tmp_path,
        [ann(1, RECT_POLYGON, category_id=3), ann(2, compressed(RECT), iscrowd=1), ann(3, RECT_POLYGON, category_id=1)],
    )
    dataset = CocoDataset(path, train=False, input_cfg=NO_RESIZE)
    assert dataset.category_ids == (1, 3) and dataset.class_names == ("dog", "cat")
    sample = dataset[0]
    assert sample.classes.tolist() == [1, 0]
    torch.testing.assert_close(sample.crowd_boxes, torch.tensor([[5.0, 10.0, 15.0, 20.0]]))
    reordered = CocoDataset(path, class_ids=(3, 1), train=False, input_cfg=NO_RESIZE)
    assert reordered[0].classes.tolist() == [0, 1] and reordered.class_names == ("cat", "dog")


def test_images_without_instances_are_filtered_unless_asked(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in (1, 2, 3)]
    path = write(tmp_path, [ann(1, RECT_POLYGON), ann(2, compressed(RECT), image_id=3, iscrowd=1)], images)
    assert CocoDataset(path, input_cfg=NO_RESIZE).image_ids == (1,)
    kept = CocoDataset(path, input_cfg=NO_RESIZE, filter_empty=False)
    assert kept.image_ids == (1, 2, 3)
    empty = kept[1]
    assert empty.boxes.shape == (0, 4) and empty.boxes.dtype == torch.float32
    assert empty.classes.shape == (0,) and empty.classes.dtype == torch.int64
    assert empty.masks.shape == (0, *empty.image.shape[1:]) and empty.masks.dtype == torch.bool
    assert CocoDataset(path, train=False).image_ids == (1, 2, 3)  # test mode keeps everything


# -- augmentation ----------------------------------------------------------------------------


def test_flip_mirrors_image_masks_and_boxes_consistently(tmp_path):
    path = write(tmp_path, [ann(1, [[2, 3, 20, 3, 8, 25]], bbox=(2, 3, 18, 22)), ann(2, RECT_POLYGON)])
    cfg = InputConfig(min_size_train=(45,), max_size_train=100, min_size_test=45, max_size_test=100)
    reference = CocoDataset(path, train=False, input_cfg=cfg)[0]
    width = reference.image.shape[-1]
    mirrored = TrainingSample(
        reference.image.flip(-1),
        torch.stack(
            (
                width - reference.boxes[:, 2],
                reference.boxes[:, 1],
                width - reference.boxes[:, 0],
                reference.boxes[:, 3],
            ),
            1,
        ),
        reference.classes,
        reference.masks.flip(-1),
        1,
        (H, W),
    )
    dataset = CocoDataset(path, train=True, input_cfg=cfg)
    seen = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        flipped = not torch.equal(sample.image, reference.image)
        expected = mirrored if flipped else reference
        assert torch.equal(sample.image, expected.image)
        assert torch.equal(sample.masks, expected.masks)
        torch.testing.assert_close(sample.boxes, expected.boxes)
        seen.add(flipped)
    assert seen == {True, False}


def test_resize_follows_shortest_edge_choices_and_is_seeded(tmp_path):
    images = [{"id": 1, "file_name": "1.png", "width": 100, "height": 40}]
    path = write(tmp_path, [ann(1, [[10, 10, 90, 10, 90, 30, 10, 30]], bbox=(10, 10, 80, 20))], images)
    cfg = InputConfig(min_size_train=(20, 24, 30), max_size_train=60)
    dataset = CocoDataset(path, input_cfg=cfg, seed=3)
    twin = CocoDataset(path, input_cfg=cfg, seed=3)
    shapes = set()
    for epoch in range(10):
        dataset.set_epoch(epoch)
        twin.set_epoch(epoch)
        sample, again = dataset[0], twin[0]
        assert torch.equal(sample.image, again.image) and torch.equal(sample.boxes, again.boxes)
        h, w = sample.image.shape[1:]
        assert (h, w) in {resized_shape(40, 100, s, 60) for s in cfg.min_size_train}
        assert max(h, w) <= 60 and (min(h, w) in cfg.min_size_train or max(h, w) == 60)
        assert sample.masks.shape[1:] == (h, w)
        torch.testing.assert_close(sample.boxes[0, [1, 3]], torch.tensor([10.0, 30.0]) * h / 40)
        shapes.add((h, w))
    assert shapes == {(20, 50), (24, 60)}  # 30 would make the long side 75 > 60


def test_bgr_order_and_value_range(tmp_path):
    red = np.zeros((H, W, 3), dtype=np.uint8)
    red[..., 0] = 255
    path = write(tmp_path, [ann(1, RECT_POLYGON)], pixels=red)
    image = CocoDataset(path, train=False, input_cfg=NO_RESIZE)[0].image
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert (image[2] == 255).all() and (image[:2] == 0).all()


def test_loader_yields_lists_of_samples(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in (1, 2, 3)]
    path = write(tmp_path, [ann(i, RECT_POLYGON, image_id=i) for i in (1, 2, 3)], images)
    loader = make_loader(CocoDataset(path, input_cfg=NO_RESIZE), batch_size=2, shuffle=True, seed=1)
    orders = [[s.image_id for batch in loader for s in batch] for _ in range(2)]
    again = make_loader(CocoDataset(path, input_cfg=NO_RESIZE), batch_size=2, shuffle=True, seed=1)
    assert orders == [[s.image_id for batch in again for s in batch] for _ in range(2)]
    assert all(isinstance(b, list) and isinstance(b[0], TrainingSample) for b in loader)


def test_shuffled_batches_hold_one_canvas_and_cover_the_epoch(tmp_path):
    # Two aspect ratios and three jitter sizes: six canvases, drawn per (seed, epoch, index).
    images = [
        {"id": i, "file_name": f"{i}.png", "width": 40 if i % 2 else 30, "height": 30 if i % 2 else 40}
        for i in range(1, 25)
    ]
    path = write(tmp_path, [ann(i, RECT_POLYGON, image_id=i) for i in range(1, 25)], images)
    cfg = InputConfig(min_size_train=(24, 30, 36), max_size_train=64, size_divisibility=8)
    dataset = CocoDataset(path, input_cfg=cfg, seed=5)
    loader = make_loader(dataset, batch_size=3, shuffle=True, seed=2)
    canvases = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader.batch_sampler)
        assert sorted(s.image_id for batch in batches for s in batch) == list(range(1, 25))
        for batch in batches:
            shapes = {tuple(s.image.shape[1:]) for s in batch}
            padded = {tuple(-(-side // 8) * 8 for side in shape) for shape in shapes}
            assert len(padded) == 1, shapes  # pad_batch gives each sample its own canvas
            canvases |= padded
        assert sum(len(b) == 3 for b in batches) >= len(batches) - 6  # at most one partial batch per canvas
    assert len(canvases) >= 4


# -- image reading ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_load_image_rgb_converts_modes(tmp_path, mode):
    if mode == "I;16":
        image = Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16))
        expected = 255
    else:
        image = Image.new("RGB", (6, 4), (200, 200, 200)).convert(mode)
        expected = np.array(Image.new("RGB", (6, 4), (200, 200, 200)).convert(mode).convert("RGB"))
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    image.save(path)
    rgb = load_image_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 6, 3)
    assert np.all(rgb == expected)


def test_load_image_rgb_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(asymmetric_image()).save(tmp_path / "x.jpg", exif=exif)
    assert load_image_rgb(tmp_path / "x.jpg").shape == (W, H, 3)


# -- bad data sets ---------------------------------------------------------------------------


def test_missing_image_file(tmp_path):
    path = write(tmp_path, [ann(1, RECT_POLYGON)])
    (tmp_path / "images" / "1.png").unlink()
    with pytest.raises(DatasetError, match=r"1\.png.*image id 1"):
        CocoDataset(path)


def test_corrupt_image_file(tmp_path):
    path = write(tmp_path, [ann(1, RECT_POLYGON)])
    (tmp_path / "images" / "1.png").write_bytes(b"not a png at all")
    dataset = CocoDataset(path)
    with pytest.raises(DatasetError, match=r"1\.png.*cannot read image.*image id 1"):
        dataset[0]


def test_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"broken\.json.*invalid JSON"):
        CocoDataset(path)


def test_rle_size_mismatch(tmp_path):
    rle = compressed(np.zeros((H + 1, W), dtype=bool))
    path = write(tmp_path, [ann(5, rle)])
    with pytest.raises(DatasetError, match=r"ann\.json: image id 1, annotation id 5: RLE size"):
        CocoDataset(path)


def test_unknown_category_id(tmp_path):
    path = write(tmp_path, [ann(6, RECT_POLYGON, category_id=99)])
    with pytest.raises(DatasetError, match=r"annotation id 6: unknown category id 99"):
        CocoDataset(path)


def test_image_size_mismatch(tmp_path):
    images = [{"id": 4, "file_name": "4.png", "width": W, "height": H}]
    path = write(tmp_path, [ann(1, RECT_POLYGON, image_id=4)], images)
    Image.fromarray(asymmetric_image(H, W + 2)).save(tmp_path / "images" / "4.png")
    with pytest.raises(DatasetError, match=r"4\.png: image is 42x30.*image id 4.*says 40x30"):
        CocoDataset(path)[0]


def test_malformed_bbox_and_segmentation(tmp_path):
    with pytest.raises(DatasetError, match=r"annotation id 1: 'bbox'"):
        CocoDataset(write(tmp_path, [ann(1, RECT_POLYGON, bbox=("a", 0, 1, 1))]))
    with pytest.raises(DatasetError, match=r"annotation id 2: segmentation is a flat list"):
        CocoDataset(write(tmp_path, [ann(2, RECT_POLYGON[0])]))
    with pytest.raises(DatasetError, match=r"annotation id 3: uncompressed RLE counts sum"):
        CocoDataset(write(tmp_path, [ann(3, {"size": [H, W], "counts": [5, 5]})]))
    bad_total = {"size": [H, W], "counts": compressed(np.zeros((5, 5), dtype=bool))["counts"]}
    dataset = CocoDataset(write(tmp_path, [ann(4, bad_total)]))
    with pytest.raises(DatasetError, match=r"annotation id 4: compressed RLE counts do not add up"):
        dataset[0]
