"""Reading a request's parameters."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transfiner.service.errors import ServiceError
from transfiner.service.schemas import BASE64_IMAGE_PATTERN


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


# Characters that matter to the pattern: the base64 alphabet's edges, padding, blanks (ASCII and
# not), and what a data: URL head is made of.
_NEAR_BASE64 = "AZaz09+/=  \t\n\r\f\u2003,;:dDaAtTbBsSeE64-_\u00b3"


def _encoded(head: str, data: bytes, blank: str, every: int, cut: int) -> str:
    """base64 of ``data`` with ``blank`` every ``every`` characters, less its last ``cut``."""
    text = base64.b64encode(data).decode()
    text = blank.join(text[i : i + every] for i in range(0, len(text), every))
    return head + text[: len(text) - cut]


_HEADS = st.sampled_from(["", "data:image/png;base64,", "DaTa:;bAsE64,", "data:,", "data:;base64", " data:;base64,"])
_ENCODED = st.builds(
    _encoded,
    _HEADS,
    st.binary(max_size=9),
    st.sampled_from(["", " ", "\n", "\r\n\t", "\f", "\u2003"]),
    st.integers(1, 6),
    st.sampled_from([0, 0, 1, 2]),
)


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(
    st.one_of(
        st.text(_NEAR_BASE64, max_size=24),
        _ENCODED,
        st.tuples(_ENCODED, st.text(_NEAR_BASE64, max_size=3)).map("".join),
    )
)
def test_the_json_image_check_is_the_documented_pattern(text):
    """The server's linear-time check takes exactly the strings the document's pattern matches."""
    from transfiner.service.uploads import base64_payload

    assert (base64_payload(text) is not None) == bool(re.fullmatch(BASE64_IMAGE_PATTERN, text)), repr(text)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.binary(min_size=1, max_size=200), st.sampled_from(["", "data:image/png;base64,", "DATA:;Base64,"]))
def test_every_wrapped_or_data_url_base64_decodes_to_its_bytes(data, head):
    from transfiner.service.uploads import _decode_base64

    for encoded in (base64.b64encode(data).decode(), base64.encodebytes(data).decode()):  # one line, wrapped
        assert re.fullmatch(BASE64_IMAGE_PATTERN, head + encoded)
        assert _decode_base64(head + encoded) == data


@pytest.mark.parametrize("text", ["", "   ", "\n", "data:image/png;base64,", "QQ", "QQ=", "data:image/png,QUFB"])
def test_an_image_of_no_bytes_or_not_base64_is_refused(text):
    from transfiner.service.uploads import _decode_base64

    with pytest.raises(ServiceError) as caught:
        _decode_base64(text)
    assert (caught.value.status, caught.value.code) == (400, "bad_request")
