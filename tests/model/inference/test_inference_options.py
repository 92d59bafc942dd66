"""Per-image inference options and mask computation in steps (``MaskTransfiner.detect`` /
``segment`` / ``segment_lightest_first``), on the small preset with seeded random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support import scene, tiny_config
from transfiner.model.inference.backend import TorchBackend, infer_lightest_first
from transfiner.model.inference.preprocess import prepare_batch, to_rgb_tensor
from transfiner.model.modeling.rcnn import InferenceOptions, MaskTransfiner, RawOutputs

NUM_IMAGES = 4


@pytest.fixture(scope="module")
def tiny_model() -> MaskTransfiner:
    """Two classes, 96-128 px inputs (``tiny_config``), seeded random weights."""
    torch.manual_seed(0)
    return MaskTransfiner(tiny_config()).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def batch(tiny_model):
    # One canvas for all: same size, different content.
    images = [to_rgb_tensor(scene(96, 128, seed=s)) for s in range(NUM_IMAGES)]
    return prepare_batch(images, tiny_model.cfg.input, "cpu")


def rows_of(raw: RawOutputs, image: int) -> dict[str, torch.Tensor]:
    rows = raw.batch_index == image
    return {
        "boxes": raw.boxes[rows],
        "scores": raw.scores[rows],
        "classes": raw.classes[rows],
        "mask_probs": raw.mask_probs[rows],
        "coarse_probs": raw.coarse_probs[rows],
    }


def assert_same_rows(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert len(got["scores"]) == len(want["scores"])
    torch.testing.assert_close(got["boxes"], want["boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=1e-6)
    assert torch.equal(got["classes"], want["classes"])
    torch.testing.assert_close(got["mask_probs"], want["mask_probs"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["coarse_probs"], want["coarse_probs"], rtol=0, atol=1e-5)


def test_each_image_gets_what_its_own_options_give(tiny_model, batch):
    """One pass with four different per-image options equals, image by image, the pass with
    that image's options for the whole batch; nothing else is computed."""
    images, sizes = batch
    probe = tiny_model(images, sizes, InferenceOptions(score_threshold=0.0))
    middle = float(probe.scores[probe.batch_index == 1].median())
    num_classes = tiny_model.cfg.roi_heads.num_classes
    only_class_1 = torch.zeros(NUM_IMAGES, num_classes, dtype=torch.bool)
    only_class_1[:] = True
    only_class_1[2] = False
    only_class_1[2, 1] = True
    per_image = InferenceOptions(
        score_threshold=torch.tensor([0.0, middle, 0.0, 0.0]),
        max_detections=torch.tensor([7, 10, 3, -1]),
        refine=torch.tensor([True, True, True, False]),
        classes=only_class_1,
    )
    mixed = tiny_model(images, sizes, per_image)

    singles = [
        InferenceOptions(score_threshold=0.0, max_detections=7),
        InferenceOptions(score_threshold=middle, max_detections=10),
        None,  # the class filter: from the config's top-k, class 1 only, then the best 3
        InferenceOptions(score_threshold=0.0, max_detections=-1, refine=False),
    ]
    for image, options in enumerate(singles):
        if options is None:
            full = rows_of(tiny_model(images, sizes, InferenceOptions(score_threshold=0.0)), image)
            keep = torch.nonzero(full["classes"] == 1).squeeze(1)[:3]
            want = {name: value[keep] for name, value in full.items()}
        else:
            want = rows_of(tiny_model(images, sizes, options), image)
        got = rows_of(mixed, image)
        assert len(got["scores"]) > 0
        assert_same_rows(got, want)
    # The unrefined image got its coarse masks only.
    last = rows_of(mixed, 3)
    assert torch.equal(last["mask_probs"], last["coarse_probs"])


def test_segmenting_in_groups_equals_segmenting_at_once(tiny_model, batch):
    images, sizes = batch
    options = InferenceOptions(
        score_threshold=torch.tensor([0.0, 0.3, 0.0, 0.9]), max_detections=torch.tensor([9, 9, 2, 9])
    )
    whole = tiny_model(images, sizes, options)
    detected = tiny_model.detect(images, sizes, options)
    counts = torch.bincount(detected.detections.batch_index[detected.refine_mask], minlength=NUM_IMAGES).tolist()
    seen: list[int] = []
    with torch.inference_mode():
        steps = list(tiny_model.segment_lightest_first(detected, boxes_per_group=1))
    for group, raw in steps:
        assert set(raw.batch_index.tolist()) <= set(group)
        for image in group:
            assert_same_rows(rows_of(raw, image), rows_of(whole, image))
        seen += group
    assert sorted(seen) == list(range(NUM_IMAGES))
    # Lightest first: the refined-detection counts never fall along the steps.
    assert [counts[i] for i in seen] == sorted(counts)
    assert len(steps) > 1


def test_groups_hold_whole_images_up_to_the_box_budget(tiny_model, batch):
    images, sizes = batch
    options = InferenceOptions(score_threshold=0.0, max_detections=5)
    detected = tiny_model.detect(images, sizes, options)
    with torch.inference_mode():
        one_step = list(tiny_model.segment_lightest_first(detected, boxes_per_group=NUM_IMAGES * 5))
        two_steps = list(tiny_model.segment_lightest_first(detected, boxes_per_group=2 * 5))
    assert [sorted(group) for group, _ in one_step] == [list(range(NUM_IMAGES))]
    assert [len(group) for group, _ in two_steps] == [2, 2]


def test_backends_answer_every_image_once_in_steps(tiny_model, batch):
    images, sizes = batch
    options = InferenceOptions(score_threshold=0.0, max_detections=torch.tensor([1, 8, 1, 8]))
    backend = TorchBackend(tiny_model, boxes_per_group=2)
    steps = list(infer_lightest_first(backend, images, sizes, options))
    assert sorted(i for group, _ in steps for i in group) == list(range(NUM_IMAGES))
    assert set(steps[0][0]) == {0, 2}  # the two light images come first, together
    whole = backend.infer(images, sizes, options)
    for group, raw in steps:
        for image in group:
            assert_same_rows(rows_of(raw, image), rows_of(whole, image))


def test_batch_wide_options_cover_every_image():
    options = InferenceOptions(
        score_threshold=torch.tensor([0.5, 0.1, 0.7]),
        max_detections=torch.tensor([3, 50, 7]),
        refine=torch.tensor([False, True, False]),
    )
    wide = options.batch_wide()
    assert wide.score_threshold == pytest.approx(0.1)
    assert wide.max_detections == 50
    assert wide.refine is True
    no_limit = InferenceOptions(max_detections=torch.tensor([3, -1])).batch_wide()
    assert no_limit.max_detections == -1
    filtered = InferenceOptions(max_detections=torch.tensor([3]), classes=torch.ones(1, 2, dtype=torch.bool))
    assert filtered.batch_wide().max_detections is None  # the config's top-k: the filter picks from it
    assert np.isclose(InferenceOptions(score_threshold=0.2).batch_wide().score_threshold, 0.2)
