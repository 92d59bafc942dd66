"""Image decoding: the same pixels as the training/CLI reader, by sniffing, with a pixel guard,
reduced JPEG decoding, and errors that speak of the upload."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import encode, scene, tiny_config
from transfiner.model.inference.images import load_image_rgb
from transfiner.model.inference.preprocess import network_shape
from transfiner.service.engine.pipeline import (
    network_image,
    preprocess,
)
from transfiner.service.errors import ServiceError, error_response
from transfiner.service.imaging import decode_image, sniff_format

pytestmark = pytest.mark.timeout(120)


def _as_file_and_bytes(tmp_path, picture: Image.Image, fmt: str, **save_args) -> tuple[np.ndarray, bytes]:
    data = encode(picture, fmt, **save_args)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    return load_image_rgb(path), data


def _pictures():
    rgb = Image.fromarray(scene(40, 60, seed=7))
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees anticlockwise on display
    grey16 = Image.fromarray((np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16))
    return {
        "grey PNG": (rgb.convert("L"), "PNG", {}),
        "RGBA PNG": (rgb.convert("RGBA"), "PNG", {}),
        "LA PNG": (rgb.convert("LA"), "PNG", {}),
        "palette PNG": (rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", {}),
        "16-bit grey PNG": (grey16, "PNG", {}),
        "CMYK JPEG": (rgb.convert("CMYK"), "JPEG", {}),
        "EXIF-rotated JPEG": (rgb, "JPEG", {"exif": exif.tobytes()}),
        "1-bit BMP": (rgb.convert("1"), "BMP", {}),
        "RGB TIFF": (rgb, "TIFF", {}),
        "lossless WEBP": (rgb, "WEBP", {"lossless": True}),
        "GIF": (rgb, "GIF", {}),
    }


@pytest.mark.parametrize("name", list(_pictures()))
def test_decode_matches_load_image_rgb(tmp_path, name):
    picture, fmt, save_args = _pictures()[name]
    expected, data = _as_file_and_bytes(tmp_path, picture, fmt, **save_args)
    decoded = decode_image(data, max_pixels=10_000)
    assert decoded.format == fmt and sniff_format(data) == fmt
    np.testing.assert_array_equal(decoded.rgb, expected)
    assert decoded.size == expected.shape[:2]
    if name.startswith("EXIF"):
        assert decoded.rgb.shape == (60, 40, 3)
    # Asked for no less than the full size, nothing is reduced (JPEGs included).
    np.testing.assert_array_equal(decode_image(data, 10_000, reduce_to=lambda h, w: (h, w)).rgb, expected)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (30, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    decoded = decode_image(buffer.getvalue(), max_pixels=10_000)
    assert decoded.rgb.shape == (20, 30, 3)
    assert tuple(decoded.rgb[10, 10]) == (255, 0, 0)


def _large_jpeg(height: int, width: int, **save_args) -> bytes:
    """A smooth photo-like JPEG (a scene scaled up, so reduced decoding has detail to keep)."""
    picture = Image.fromarray(scene(96, 128, seed=3)).resize((width, height), Image.Resampling.BILINEAR)
    return encode(picture, "JPEG", quality=92, **save_args)


TINY_INPUT = tiny_config().input  # network inputs of 96..128 pixels a side


def test_large_jpeg_is_decoded_at_reduced_scale_but_never_below_the_network_input():
    data = _large_jpeg(1000, 1250)
    network = network_shape(1000, 1250, TINY_INPUT)  # (96, 120)
    decoded = decode_image(data, 2_000_000, reduce_to=lambda h, w: network_shape(h, w, TINY_INPUT))
    assert decoded.size == (1000, 1250) and (decoded.height, decoded.width) == (1000, 1250)
    assert decoded.rgb.shape == (125, 157, 3)  # 1/8 scale: the largest that keeps >= 96x120
    assert decoded.rgb.shape[0] >= network[0] and decoded.rgb.shape[1] >= network[1]
    # The network input from the reduced decode is close to the one from the full decode.
    full = decode_image(data, 2_000_000)
    assert full.rgb.shape == (1000, 1250, 3)
    reduced_input = preprocess([network_image(decoded.rgb, decoded.size, TINY_INPUT)], TINY_INPUT, "cpu")
    full_input = preprocess([network_image(full.rgb, full.size, TINY_INPUT)], TINY_INPUT, "cpu")
    assert torch.equal(reduced_input.sizes, full_input.sizes)
    assert (reduced_input.images - full_input.images).abs().mean() < 2.0


def test_reduced_jpeg_decoding_respects_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1250 wide x 1000 high, shown 1000 wide x 1250 high
    data = _large_jpeg(1000, 1250, exif=exif.tobytes())
    decoded = decode_image(data, 2_000_000, reduce_to=lambda h, w: network_shape(h, w, TINY_INPUT))
    assert decoded.size == (1250, 1000)
    assert decoded.rgb.shape == (157, 125, 3)
    network = network_shape(1250, 1000, TINY_INPUT)
    assert decoded.rgb.shape[0] >= network[0] and decoded.rgb.shape[1] >= network[1]


def test_other_formats_are_always_decoded_in_full():
    big = np.asarray(Image.fromarray(scene(96, 128, seed=3)).resize((1250, 1000)))
    for fmt in ("PNG", "WEBP", "BMP"):
        save_args = {"lossless": True} if fmt == "WEBP" else {}
        decoded = decode_image(encode(big, fmt, **save_args), 2_000_000, reduce_to=lambda h, w: (96, 120))
        np.testing.assert_array_equal(decoded.rgb, big)


def test_decode_errors():
    png = encode(scene(40, 60))
    cases = [
        (b"", 400, "bad_request"),
        (b"%PDF-1.7 not an image", 415, "unsupported_media_type"),
        (b"\x00\x00\x01\x00" + bytes(100), 415, "unsupported_media_type"),  # ICO: not accepted
        (png[: len(png) // 2], 422, "invalid_image"),
        (b"\x89PNG\r\n\x1a\n" + bytes(50), 422, "invalid_image"),
    ]
    for data, status, code in cases:
        with pytest.raises(ServiceError) as error:
            decode_image(data, max_pixels=10_000)
        assert (error.value.status, error.value.code) == (status, code), data[:12]
    with pytest.raises(ServiceError) as error:
        decode_image(png, max_pixels=40 * 60 - 1)
    assert (error.value.status, error.value.reason) == (413, "too_large")


def test_image_errors_speak_of_the_upload_not_of_pillows_internals():
    """A bomb is refused against the service's limit (not also Pillow's own, which the client
    never set); Pillow's file object is 'the upload', not a heap address."""

    def png_header(width: int, height: int) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")

    with pytest.raises(ServiceError) as bomb:
        decode_image(png_header(100_000, 100_000), 40_000_000)
    assert bomb.value.status == 413
    assert bomb.value.message == "image has 10000000000 pixels, more than the limit 40000000"
    with pytest.raises(ServiceError) as empty:
        decode_image(png_header(0, 0), 40_000_000)
    body = json.loads(error_response(empty.value.status, empty.value.code, empty.value.message).body)
    assert body["error"]["message"].endswith("cannot identify image file (the upload))"), body
