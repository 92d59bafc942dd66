"""``model.inference.images``: uploads opened for one decoder call give Pillow's own pixels, every mode.

The reference each time is Pillow by itself (``Image.open`` on the bytes, ``exif_transpose``,
``convert("RGB")``), not our conversion."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.support import encode, scene
from transfiner.model.inference.images import _with_one_idat, image_to_rgb, open_image


def pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def ours(data: bytes) -> np.ndarray:
    with open_image(data) as image:
        return image_to_rgb(image)


def chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """A PNG's (type, body, stored CRC) in file order."""
    out, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        body = data[offset + 8 : offset + 8 + length]
        out.append((kind, body, struct.unpack_from(">I", data, offset + 8 + length)[0]))
        offset += 12 + length
    return out


def png_of(parts: list[tuple[bytes, bytes]]) -> bytes:
    """(type, body) chunks -> a PNG, each chunk with its CRC."""
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))
        for kind, body in parts
    )


def rechunked(data: bytes, size: int) -> bytes:
    """The same PNG with its pixel stream split into IDAT chunks of ``size`` bytes."""
    parts = [(kind, body) for kind, body, _ in chunks(data)]
    stream = b"".join(body for kind, body in parts if kind == b"IDAT")
    first = next(i for i, (kind, _) in enumerate(parts) if kind == b"IDAT")
    idats = [(b"IDAT", stream[i : i + size]) for i in range(0, len(stream), size)]
    rest = [part for part in parts[first:] if part[0] != b"IDAT"]
    return png_of(parts[:first] + idats + rest)


def with_chunk_after_pixels(data: bytes, kind: bytes, body: bytes) -> bytes:
    parts = [(k, b) for k, b, _ in chunks(data)]
    return png_of(parts[:-1] + [(kind, body), parts[-1]])


PICTURE = Image.fromarray(scene(60, 90, seed=5))


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _pngs() -> dict[str, bytes]:
    small_chunks = rechunked(encode(PICTURE), 500)
    return {
        "RGB": encode(PICTURE),
        "RGBA": encode(PICTURE.convert("RGBA")),
        "grey": encode(PICTURE.convert("L")),
        "grey with alpha": encode(PICTURE.convert("LA")),
        "1-bit": encode(PICTURE.convert("1")),
        "palette": encode(PICTURE.convert("P", palette=Image.Palette.ADAPTIVE)),
        "4-bit palette with transparency": encode(
            PICTURE.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), bits=4, transparency=3
        ),
        "RGB in 500-byte IDAT chunks": small_chunks,
        "text after the pixels": with_chunk_after_pixels(small_chunks, b"tEXt", b"Comment\x00after"),
        "orientation in an eXIf chunk after the pixels": with_chunk_after_pixels(
            small_chunks, b"eXIf", _exif(6)[6:]
        ),  # the chunk holds the TIFF data, no "Exif\0\0"
        "orientation in XMP before the pixels": encode(
            PICTURE, pnginfo=_xmp('<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>')
        ),
        "animated (APNG)": _apng(),
    }


def _xmp(text: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", text)
    return info


def _apng() -> bytes:
    frames = [PICTURE, PICTURE.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(_pngs()))
def test_png_gives_pillows_pixels(name):
    data = _pngs()[name]
    expected = pillow_rgb(data)
    np.testing.assert_array_equal(ours(data), expected)
    if name.startswith("orientation"):
        assert expected.shape == (90, 60, 3)  # turned on its side: the orientation was found


def test_joined_idat_chunks_are_one_valid_chunk_holding_the_same_stream():
    data = rechunked(encode(PICTURE), 500)
    joined = _with_one_idat(data)
    before, after = chunks(data), chunks(joined)
    assert sum(kind == b"IDAT" for kind, _, _ in before) > 10
    assert [kind for kind, _, _ in after] == [b"IHDR", b"IDAT", b"IEND"]
    assert all(crc == zlib.crc32(body, zlib.crc32(kind)) for kind, body, crc in after)
    assert after[1][1] == b"".join(body for kind, body, _ in before if kind == b"IDAT")


def test_pngs_that_are_not_simple_are_left_as_they_are():
    data = rechunked(encode(PICTURE), 500)
    parts = [(kind, body) for kind, body, _ in chunks(data)]
    apart = png_of(parts[:3] + [(b"tEXt", b"a\x00b")] + parts[3:])  # IDATs not consecutive
    assert _with_one_idat(apart) == apart
    assert _with_one_idat(data[: len(data) // 2]) == data[: len(data) // 2]  # cut short
    assert _with_one_idat(encode(PICTURE)) == encode(PICTURE)  # one IDAT already


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_truncated_png_still_fails_to_decode(cut):
    data = rechunked(encode(PICTURE), 500)
    data = data[: int(len(data) * cut)]
    with pytest.raises(OSError):
        pillow_rgb(data)
    with pytest.raises(OSError):
        ours(data)


class _CountingDecoder:
    """Pillow's real decoder, counting the calls that hand it data."""

    calls = 0

    def __init__(self, decoder) -> None:
        self._decoder = decoder

    def decode(self, data):
        type(self).calls += 1
        return self._decoder.decode(data)

    def __getattr__(self, name):
        return getattr(self._decoder, name)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_the_whole_upload_goes_to_the_decoder_in_one_call(monkeypatch, fmt):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8))
    data = rechunked(encode(big), 8192) if fmt == "PNG" else encode(big, "JPEG", quality=95)
    assert len(data) > 4 * 65536
    real = Image._getdecoder
    monkeypatch.setattr(Image, "_getdecoder", lambda *args: _CountingDecoder(real(*args)))

    _CountingDecoder.calls = 0
    pillow = pillow_rgb(data)
    assert _CountingDecoder.calls > 3  # Pillow by itself: a call per piece
    _CountingDecoder.calls = 0
    np.testing.assert_array_equal(ours(data), pillow)
    assert _CountingDecoder.calls == 1


def test_an_upload_of_many_tiny_chunks_costs_memory_in_its_size_not_its_chunk_count():
    import tracemalloc

    data = rechunked(encode(PICTURE), 1)  # one byte an IDAT chunk: 13 bytes a chunk
    parts = [(kind, body) for kind, body, _ in chunks(data)]
    data = png_of(parts[:-1] + [(b"IDAT", b"")] * 100_000 + parts[-1:])  # and 100,000 empty ones
    tracemalloc.start()
    try:
        joined = _with_one_idat(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [kind for kind, _, _ in chunks(joined)] == [b"IHDR", b"IDAT", b"IEND"]
    assert peak < 2 * len(data)  # the stream and the new file, nothing for each chunk
    np.testing.assert_array_equal(ours(data), pillow_rgb(data))


def _jpegs() -> dict[str, bytes]:
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    jpeg = encode(noisy, "JPEG", quality=95)
    mpo = io.BytesIO()
    noisy.save(mpo, "MPO", save_all=True, append_images=[noisy.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    return {
        "plain": jpeg,
        "with bytes after its end (as some cameras append)": jpeg + bytes(range(256)) * 400,
        "two pictures (MPO)": mpo.getvalue(),
        "progressive, EXIF-rotated": encode(noisy, "JPEG", quality=90, progressive=True, exif=_exif(6)),
    }


@pytest.mark.parametrize("name", list(_jpegs()))
def test_jpeg_gives_pillows_pixels(name):
    """Given the whole file at once, the decoder still stops at the picture's end."""
    data = _jpegs()[name]
    np.testing.assert_array_equal(ours(data), pillow_rgb(data))
