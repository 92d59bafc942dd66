"""Reading a request's parameters."""

from __future__ import annotations

import pytest

from transfiner.service.errors import ServiceError


@pytest.mark.parametrize(
    "items, message",
    [
        ([("score_threshold", "nan")], "score_threshold: Input should be a finite number"),
        ([("score_threshold", "0.5"), ("score_threshold", "0.6")], "score_threshold: given more than once"),
        (
            [("image_id", "x" * 2000)],
            "image_id: Input should be a valid integer, unable to parse string as an "
            "integer or String should have at most",
        ),
        ([("classes", "")], "classes: name at least one class (ids or names), or leave classes out for all of them"),
        ([("score_threshold", True)], "score_threshold: a number, not true or false"),  # JSON true
        ([("image_id", False)], "image_id: a number, not true or false"),
    ],
)
def test_parameter_errors_name_the_parameter_as_the_client_sent_it(items, message):
    """Each problem once, under the parameter's own name: not pydantic's names for the members of
    a union (``image_id.int``, ``image_id.constrained-str``), nor 'should be <= 1' for a NaN."""
    from transfiner.service.uploads import _multi, validate_params

    with pytest.raises(ServiceError) as caught:
        validate_params(_multi(items))
    assert (caught.value.status, caught.value.code) == (422, "invalid_parameter")
    assert caught.value.message.startswith(message), caught.value.message
    assert _multi([("classes", "1"), ("classes", "3")]) == {"classes": ["1", "3"]}
