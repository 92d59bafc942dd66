"""The request parameters' schema."""

from __future__ import annotations

import pytest

from transfiner.service.schemas import SegmentParams


def test_segment_params_parsing():
    params = SegmentParams.model_validate({"classes": ["1,square", "7"], "image_id": "42", "refine": "false"})
    assert params.classes == [1, "square", 7] and params.image_id == 42 and params.refine is False
    assert SegmentParams.model_validate({"image_id": "0042"}).image_id == "0042"
    assert SegmentParams.model_validate({"classes": 3}).classes == [3]
    assert SegmentParams().model_dump() == {
        "score_threshold": 0.5,
        "max_detections": 100,
        "classes": None,
        "mask_threshold": 0.5,
        "mask_format": "rle",
        "refine": True,
        "image_id": None,
    }
    for bad in ({"score_threshold": -0.1}, {"max_detections": 101}, {"mask_format": "png"}, {"nope": 1}):
        with pytest.raises(ValueError):
            SegmentParams.model_validate(bad)
