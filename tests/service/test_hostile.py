"""Hostile input against the real server: no request, however malformed, gets a 5xx.

uvicorn on a loopback port (``ThreadServer``) with the tiny real checkpoint and short head and
body timeouts. Each case is its own test: HTTP framing sent over raw sockets (lengths, chunking,
header floods, bad methods and versions, pipelining, incomplete heads and stalled bodies), odd
query values for every parameter, JSON that Python parses into things the service cannot hold,
malformed multipart, and images that are empty, extreme, truncated, bombs, in every mode, with
broken EXIF, or polyglots. Every answer must be below 500, a ``{"error": {"code", "message"}}``
JSON body when it is an error, and free of tracebacks and heap addresses; where the server must
close the connection (framing errors, timeouts), that is asserted too, and timeouts must take
their time but no longer. The last tests check that nothing was logged as an error, that no 500
was counted, and that the server still serves.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import gzip
import io
import json
import logging
import re
import socket
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from tests.service.support import ThreadServer, metric
from tests.support import encode, scene
from transfiner.service.settings import ServiceSettings

pytestmark = pytest.mark.timeout(120)

API_KEY = "hostile-test-key"
HEAD_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0  # the 20 MB JSON case must still arrive and parse within it on a busy machine
MAX_PIXELS = 4_000_000
SEGMENT = "/v1/segment?mask_format=none"  # most cases test the input, not the masks
ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}| object at ")


class _ErrorLog(logging.Handler):
    """Collects ERROR records of the server's loggers: an exception that never became a response
    (a dropped connection) still shows up here."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


SERVER_LOGGERS = ("service", "uvicorn.error", "uvicorn", "asyncio")


@pytest.fixture(scope="module")
def server(checkpoint):
    settings = ServiceSettings(
        model=str(checkpoint),
        device="cpu",
        api_key=API_KEY,
        head_timeout_s=HEAD_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
        max_pixels=MAX_PIXELS,
        max_delay_ms=0,
    )
    errors = _ErrorLog()
    for name in SERVER_LOGGERS:
        logging.getLogger(name).addHandler(errors)
    srv = ThreadServer(settings).start()
    srv.errors = errors
    yield srv
    srv.stop()
    for name in SERVER_LOGGERS:
        logging.getLogger(name).removeHandler(errors)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


# ------------------------------------------------------------------------------------------------
# How a case is sent, and what comes back


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclasses.dataclass(frozen=True)
class Http:
    """A request sent with httpx; ``make`` returns its keyword arguments (built when the test runs)."""

    make: Callable[[], dict[str, Any]]
    method: str = "POST"
    path: str = SEGMENT
    key: bool = True  # send the API key (X-API-Key), so the case reaches the body handling


@dataclasses.dataclass(frozen=True)
class Raw:
    """Bytes written to a fresh socket; a float in ``pieces`` is a pause (seconds) between writes.

    ``replies``: how many responses must come back (0: none, the server just closes);
    ``closes``: the server must close the connection after them;
    ``min_s``: the answer must not come before this (timeouts are not answered early)."""

    pieces: Callable[[], list[bytes | float]]
    replies: int = 1
    closes: bool = False
    min_s: float = 0.0


def _parse_replies(buffer: bytes, closed: bool) -> list[Reply]:
    """The complete HTTP/1.1 responses at the start of ``buffer``."""
    replies = []
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return replies
        lines = buffer[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if 100 <= status < 200:  # interim (100 Continue): no body, not an answer
            buffer = buffer[start:]
            continue
        if "content-length" in headers:
            stop = start + int(headers["content-length"])
            if len(buffer) < stop:
                return replies
        elif closed:
            stop = len(buffer)
        else:
            return replies
        replies.append(Reply(status, headers, buffer[start:stop]))
        buffer = buffer[stop:]


@dataclasses.dataclass
class Exchange:
    replies: list[Reply]
    closed: bool
    seconds: float


def exchange(port: int, pieces: list[bytes | float], replies: int, wait_close: bool, timeout: float = 15.0) -> Exchange:
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    buffer, closed = b"", False
    try:
        for piece in pieces:
            if isinstance(piece, float):
                time.sleep(piece)
                continue
            try:
                sock.sendall(piece)
            except OSError:  # the server answered and closed while we were still writing
                break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(_parse_replies(buffer, False)) >= replies and not wait_close:
                break
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:  # reset: the server closed with our unread bytes in its buffer
                closed = True
                break
            if not data:
                closed = True
                break
            buffer += data
    finally:
        sock.close()
    return Exchange(_parse_replies(buffer, closed), closed, time.monotonic() - started)


def check_reply(reply: Reply, expect: tuple[int, ...], name: str) -> None:
    text = reply.body.decode("utf-8", "replace")
    assert reply.status < 500, f"{name}: {reply.status} {text[:300]}"
    assert reply.status in expect, f"{name}: expected {expect}, got {reply.status} {text[:300]}"
    assert "Traceback" not in text and not ADDRESS.search(text), f"{name}: {text[:300]}"
    if reply.status >= 400:
        assert reply.headers.get("content-type", "").startswith("application/json"), (name, reply.headers, text[:200])
        body = json.loads(reply.body)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str), body
    elif reply.status == 200 and reply.headers.get("content-type", "").startswith("application/json"):
        json.loads(reply.body)


# ------------------------------------------------------------------------------------------------
# Building blocks


@functools.cache
def png() -> bytes:
    return encode(scene(48, 64))


@functools.cache
def image_of(fmt: str) -> bytes:
    return encode(scene(48, 64), fmt)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def raw_request(
    body: bytes = b"",
    *,
    method: bytes = b"POST",
    target: bytes = SEGMENT.encode(),
    version: bytes = b"HTTP/1.1",
    headers: list[bytes] | None = None,
    length: bool = True,
    key: bool = True,
) -> bytes:
    """A request written by hand, so that it can be anything a client could send."""
    lines = [method + b" " + target + b" " + version, b"Host: 127.0.0.1"]
    if key:
        lines.append(b"X-API-Key: " + API_KEY.encode())
    if length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines += headers or []
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def raw(*pieces: bytes | float, replies: int = 1, closes: bool = False, min_s: float = 0.0) -> Raw:
    return Raw(lambda: list(pieces), replies=replies, closes=closes, min_s=min_s)


def lazy_raw(make: Callable[[], list[bytes | float]], **kwargs) -> Raw:
    return Raw(make, **kwargs)


def body(data: bytes | Callable[[], bytes], content_type: str | None = None, **kwargs) -> Http:
    """A POST whose body is ``data`` (or what the callable returns)."""

    def make() -> dict[str, Any]:
        content = data() if callable(data) else data
        headers = {"Content-Type": content_type} if content_type else {}
        return {"content": content, "headers": headers}

    return Http(make, **kwargs)


def image(make: Callable[[], bytes]) -> Http:
    return body(make, "application/octet-stream")


def query(params: list[tuple[str, str]] | str, data: Callable[[], bytes] = png) -> Http:
    """The PNG with ``params`` as the query (a string is sent as the query as it is)."""
    path = "/v1/segment?" + params if isinstance(params, str) else "/v1/segment"
    return Http(
        lambda: {"content": data(), "params": None if isinstance(params, str) else params},
        path=path,
    )


def json_raw(text: bytes | Callable[[], bytes], content_type: str = "application/json") -> Http:
    return body(text, content_type, path="/v1/segment")  # parameters in the JSON only


def json_image(extra: bytes = b"", image_value: bytes | None = None) -> Callable[[], bytes]:
    """JSON text ``{"image": "<the PNG>", <extra>}`` with ``extra`` written verbatim."""

    def make() -> bytes:
        value = image_value if image_value is not None else b'"' + b64(png()).encode() + b'"'
        return b'{"image": ' + value + (b", " + extra if extra else b"") + b"}"

    return make


BOUNDARY = b"h0stile-boundary"


def part(name: bytes | None, content: bytes, filename: bytes | None = b"a.png", extra: bytes = b"") -> bytes:
    disposition = b"Content-Disposition: form-data"
    if name is not None:
        disposition += b'; name="' + name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    return disposition + (b"\r\n" + extra if extra else b"") + b"\r\n\r\n" + content


def multipart(*parts: bytes, boundary: bytes = BOUNDARY, end: bool = True) -> bytes:
    out = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return out + (b"--" + boundary + b"--\r\n" if end else b"")


def form(make: Callable[[], bytes], content_type: str = "multipart/form-data; boundary=" + BOUNDARY.decode()) -> Http:
    return body(make, content_type, path="/v1/segment")  # parameters in the form only


# -- crafted images -------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(
    width: int,
    height: int,
    *,
    idat: bytes | None = None,
    chunks: tuple[bytes, ...] = (),
    depth: int = 8,
    colour: int = 0,
) -> bytes:
    """A PNG with the IHDR it is told to have, whatever the pixel data says."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(bytes((width + 1) * height) if width * height < 10_000 else b"")
    return PNG_MAGIC + png_chunk(b"IHDR", ihdr) + b"".join(chunks) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_in_one_byte_chunks() -> bytes:
    """A 64x64 grey PNG whose compressed pixels come one byte per IDAT chunk."""
    data = zlib.compress(b"".join(b"\0" + bytes(range(64)) for _ in range(64)), 0)
    idats = b"".join(png_chunk(b"IDAT", data[i : i + 1]) for i in range(len(data)))
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0))
    return PNG_MAGIC + ihdr + idats + png_chunk(b"IEND", b"")


def gif_of_500_frames() -> bytes:
    frames = [Image.new("L", (8, 8), i % 256) for i in range(500)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def gif_with_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen and only frame claim ``width`` x ``height``."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + bytes(6)  # 2-colour palette
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame + b"\x3b"


def tiff(
    width: int,
    height: int,
    *,
    extra: list[tuple[int, int, int, int]] = (),
    data: bytes | None = None,
    next_ifd: int = 0,
) -> bytes:
    """A little-endian greyscale TIFF written by hand (one strip), with any tags added or changed."""
    entries = {
        256: (4, 1, width),
        257: (4, 1, height),
        258: (3, 1, 8),
        259: (3, 1, 1),
        262: (3, 1, 1),
        277: (3, 1, 1),
        278: (4, 1, height),
    }
    for tag, kind, count, value in extra:
        entries[tag] = (kind, count, value)
    pixels = data if data is not None else bytes(min(width * height, 4096))
    count = len(entries) + 2
    data_at = 8 + 2 + 12 * count + 4
    entries[273] = (4, 1, data_at)
    entries[279] = (4, 1, len(pixels))
    ifd = struct.pack("<H", len(entries))
    for tag in sorted(entries):
        kind, n, value = entries[tag]
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, n) + packed
    ifd += struct.pack("<I", next_ifd)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + pixels


def webp_vp8l(width: int, height: int) -> bytes:
    """A lossless WEBP header claiming ``width`` x ``height`` (at most 16384 a side), no real data."""
    bits = (width - 1) | ((height - 1) << 14)
    payload = b"\x2f" + struct.pack("<I", bits) + bytes(16)
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 marker is rewritten to claim ``width`` x ``height``."""
    data = bytearray(image_of("JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(image_of("BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def with_exif(orientation: int, fmt: str = "JPEG") -> Callable[[], bytes]:
    return lambda: encode(scene(48, 64), fmt, exif=exif_bytes(orientation))


def jpeg_with_app1(payload: bytes) -> Callable[[], bytes]:
    """The JPEG with an APP1 (EXIF) segment of ``payload`` right after SOI."""

    def make() -> bytes:
        data = image_of("JPEG")
        return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]

    return make


def exif_orientation(kind: int, count: int, value: bytes) -> bytes:
    """An EXIF payload whose only tag is Orientation, of any TIFF type, count and value field."""
    return b"Exif\0\0II*\0" + struct.pack("<IH", 8, 1) + struct.pack("<HHI", 0x0112, kind, count) + value + bytes(4)


def in_mode(mode: str, fmt: str, **save_args) -> Callable[[], bytes]:
    def make() -> bytes:
        rgb = Image.fromarray(scene(48, 64))
        if mode in ("I;16", "I", "F"):
            grey = np.asarray(rgb.convert("L"), dtype=np.float64)
            dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
            values = (grey * 257 if mode != "F" else grey).astype(dtype)
            if mode == "F":  # NaN and infinities survive into the pixels
                values[0, :3] = (np.nan, np.inf, -np.inf)
            if mode == "I":
                values[0, 0] = -(2**31)
            picture = Image.fromarray(values)
        elif mode == "P+transparency":
            picture = rgb.convert("P")
            save_args.setdefault("transparency", 0)
        else:
            picture = rgb.convert(mode)
        return encode(picture, fmt, **save_args)

    return make


def animated(fmt: str) -> Callable[[], bytes]:
    def make() -> bytes:
        frames = [Image.fromarray(scene(48, 64, seed=s)) for s in range(3)]
        buffer = io.BytesIO()
        frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
        return buffer.getvalue()

    return make


def truncated(fmt: str, at: Callable[[bytes], int]) -> Callable[[], bytes]:
    def make() -> bytes:
        data = image_of(fmt)
        return data[: at(data)]

    return make


def after(marker: bytes, extra: int = 0) -> Callable[[bytes], int]:
    """Cut just after the first ``marker`` (plus ``extra`` bytes)."""
    return lambda data: data.index(marker) + len(marker) + extra


def random_with_magic(magic: bytes) -> Callable[[], bytes]:
    return lambda: magic + np.random.default_rng(len(magic)).bytes(4000)


def zeros_compressed(size: int) -> bytes:
    return zlib.compress(bytes(size), 9)


# ------------------------------------------------------------------------------------------------
# The cases: name -> (how it is sent, the statuses it may answer)

OK = (200,)
KEY = b"X-API-Key: " + API_KEY.encode()


def http_cases() -> dict[str, tuple[Any, tuple[int, ...]]]:
    get = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    return {
        # Content-Length
        "cl not a number": (
            raw(raw_request(b"abc", length=False, headers=[b"Content-Length: abc"]), closes=True),
            (400,),
        ),
        "cl negative": (raw(raw_request(b"abc", length=False, headers=[b"Content-Length: -1"]), closes=True), (400,)),
        "cl plus sign": (raw(raw_request(b"abc", length=False, headers=[b"Content-Length: +3"]), closes=True), (400,)),
        "cl two different": (
            raw(raw_request(b"abcde", length=False, headers=[b"Content-Length: 3", b"Content-Length: 5"]), closes=True),
            (400,),
        ),
        "cl list": (raw(raw_request(b"abc", length=False, headers=[b"Content-Length: 3, 3"]), closes=True), (400,)),
        "cl 30 digits": (
            raw(raw_request(b"abc", length=False, headers=[b"Content-Length: " + b"9" * 30]), closes=True),
            (400,),
        ),
        "cl over the body limit": (
            raw(raw_request(b"", length=False, headers=[b"Content-Length: 1000000000"]), closes=True),
            (413,),
        ),
        "cl larger than the body sent": (
            raw(
                raw_request(b"", length=False, headers=[b"Content-Length: 10"]) + b"abc",
                closes=True,
                min_s=BODY_TIMEOUT_S,
            ),
            (408,),
        ),
        "cl and chunked": (
            raw(
                raw_request(
                    b"3\r\nabc\r\n0\r\n\r\n",
                    length=False,
                    headers=[b"Content-Length: 3", b"Transfer-Encoding: chunked"],
                ),
                closes=True,
            ),
            (400,),
        ),
        # Transfer-Encoding
        "chunk size not hex": (
            raw(
                raw_request(b"zz\r\nabc\r\n0\r\n\r\n", length=False, headers=[b"Transfer-Encoding: chunked"]),
                closes=True,
            ),
            (400,),
        ),
        "chunk size overflows": (
            raw(
                raw_request(b"f" * 40 + b"\r\nabc\r\n0\r\n\r\n", length=False, headers=[b"Transfer-Encoding: chunked"]),
                closes=True,
            ),
            (400,),
        ),
        "chunk size negative": (
            raw(
                raw_request(b"-3\r\nabc\r\n0\r\n\r\n", length=False, headers=[b"Transfer-Encoding: chunked"]),
                closes=True,
            ),
            (400,),
        ),
        "chunk longer than its size": (
            raw(
                raw_request(b"2\r\nabcdef\r\n0\r\n\r\n", length=False, headers=[b"Transfer-Encoding: chunked"]),
                closes=True,
            ),
            (400,),
        ),
        "chunk extension 100 KB": (
            raw(
                raw_request(
                    b"3;" + b"x" * 100_000 + b"\r\nabc\r\n0\r\n\r\n",
                    length=False,
                    headers=[b"Transfer-Encoding: chunked"],
                )
            ),
            (415,),
        ),
        "chunked with trailer": (
            lazy_raw(
                lambda: [
                    raw_request(
                        b"%x\r\n" % len(png()) + png() + b"\r\n0\r\nX-Trailer: 1\r\n\r\n",
                        length=False,
                        headers=[b"Transfer-Encoding: chunked"],
                    )
                ]
            ),
            OK,
        ),
        "transfer-encoding gzip": (
            raw(raw_request(b"abc", length=False, headers=[b"Transfer-Encoding: gzip"]), closes=True),
            (400,),
        ),
        "transfer-encoding chunked twice": (
            raw(
                raw_request(b"3\r\nabc\r\n0\r\n\r\n", length=False, headers=[b"Transfer-Encoding: chunked, chunked"]),
                closes=True,
            ),
            (400,),
        ),
        "transfer-encoding xchunked": (
            raw(
                raw_request(b"3\r\nabc\r\n0\r\n\r\n", length=False, headers=[b"Transfer-Encoding: xchunked"]),
                closes=True,
            ),
            (400,),
        ),
        "transfer-encoding after a tab": (
            raw(raw_request(b"3\r\nabc\r\n0\r\n\r\n", length=False, headers=[b"Transfer-Encoding:\tchunked"])),
            (415,),
        ),
        "cl with leading zeros": (raw(raw_request(b"abc", length=False, headers=[b"Content-Length: 0003"])), (415,)),
        "gzip content-encoding is not inflated": (
            lazy_raw(lambda: [raw_request(gzip.compress(png()), headers=[b"Content-Encoding: gzip"])]),
            (415,),
        ),
        "expect 100-continue with an image": (
            lazy_raw(lambda: [raw_request(png(), headers=[b"Expect: 100-continue"])]),
            OK,
        ),
        # Heads
        "header flood 100000 headers": (
            raw(b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 100_000 + b"\r\n", closes=True),
            (431,),
        ),
        "header line of 1 MB": (
            raw(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 1_000_000 + b"\r\n\r\n", closes=True),
            (431,),
        ),
        "request target of 1 MB": (
            raw(b"GET /health/live?" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", closes=True),
            (431,),
        ),
        "header without colon": (raw(b"GET /health/live HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", closes=True), (400,)),
        "header with NUL": (raw(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", closes=True), (400,)),
        "space before colon": (raw(b"GET /health/live HTTP/1.1\r\nHost : x\r\n\r\n", closes=True), (400,)),
        "obsolete line folding": (
            raw(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", closes=True),
            (400,),
        ),  # no smuggling by folding
        "bare LF line ends": (raw(b"GET /health/live HTTP/1.1\nHost: x\n\n", closes=True), (400,)),
        "non-ASCII request target": (raw(b"GET /health/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", closes=True), (400,)),
        "percent-encoded invalid UTF-8 path": (raw(b"GET /health/%ff%fe%00 HTTP/1.1\r\nHost: x\r\n\r\n"), (404,)),
        "path traversal in static": (raw(b"GET /static/..%2f..%2fsettings.py HTTP/1.1\r\nHost: x\r\n\r\n"), (404,)),
        "unknown method": (raw(b"BREW /health/live HTTP/1.1\r\nHost: x\r\n\r\n", closes=True), (400,)),
        "lower-case method": (raw(b"get /health/live HTTP/1.1\r\nHost: x\r\n\r\n", closes=True), (400,)),
        "header name with a parenthesis": (
            raw(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX(A): b\r\n\r\n", closes=True),
            (400,),
        ),
        "method name of 10 KB": (
            raw(b"G" * 10_000 + b" /health/live HTTP/1.1\r\nHost: x\r\n\r\n", closes=True),
            (400,),
        ),
        "CONNECT": (raw(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", closes=True), (400,)),
        "TRACE on segment": (raw(raw_request(b"", method=b"TRACE")), (405,)),
        "10000 slashes": (raw(b"GET " + b"/" * 10_000 + b"health/live HTTP/1.1\r\nHost: x\r\n\r\n"), (404,)),
        "two Host headers": (raw(b"GET /health/live HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), OK),
        "DELETE on segment": (raw(raw_request(b"", method=b"DELETE")), (405,)),
        "OPTIONS on segment": (raw(raw_request(b"", method=b"OPTIONS")), (405,)),
        "GET with a body": (raw(b"GET /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"), OK),
        "absolute-form target": (
            lazy_raw(lambda: [raw_request(png(), target=b"http://evil.example" + SEGMENT.encode())]),
            OK,
        ),
        "asterisk-form target": (raw(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"), (404,)),
        "HTTP/1.0 without Host": (raw(b"GET /health/live HTTP/1.0\r\n\r\n", closes=True), OK),
        "request line without version": (raw(b"GET /health/live\r\n\r\n", closes=True), OK),  # read as HTTP/0.9
        "HTTP/2 preface": (raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", closes=True), (400,)),
        "HTTP/9.9": (raw(b"GET /health/live HTTP/9.9\r\nHost: x\r\n\r\n", closes=True), (400,)),
        "websocket upgrade": (
            raw(
                b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            ),
            OK,
        ),
        "websocket handshake on segment": (
            raw(
                raw_request(
                    b"",
                    method=b"GET",
                    headers=[
                        b"Connection: Upgrade",
                        b"Upgrade: websocket",
                        b"Sec-WebSocket-Version: 13",
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                    ],
                )
            ),
            (405,),
        ),
        "h2c upgrade": (
            raw(
                b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            ),
            OK,
        ),
        "expect 100-continue over the limit": (
            raw(
                raw_request(b"", length=False, headers=[b"Content-Length: 999999999", b"Expect: 100-continue"]),
                closes=True,
            ),
            (413,),
        ),
        "pipelined three": (raw(get * 3, replies=3), OK),
        "pipelined 200 on one connection": (raw(get * 200, replies=200), OK),
        "pipelined good then garbage": (
            raw(get + b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", replies=2, closes=True),
            (200, 400),
        ),
        "pipelined segment then 200 KB of garbage": (
            lazy_raw(lambda: [raw_request(png()) + b"\x00" * 200_000], replies=2, closes=True),
            (200, 400),
        ),
        "pipelined segment then 405": (
            lazy_raw(lambda: [raw_request(png()) + raw_request(b"", method=b"PUT")], replies=2),
            (200, 405),
        ),
        "TLS client hello": (raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), closes=True), (400,)),
        # Time
        "nothing sent": (raw(replies=1, closes=True, min_s=HEAD_TIMEOUT_S), (408,)),
        "incomplete head": (
            raw(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\n", closes=True, min_s=HEAD_TIMEOUT_S),
            (408,),
        ),
        "slowloris head": (
            raw(
                *[p for c in b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: yes" for p in (bytes([c]), 0.03)],
                closes=True,
                min_s=HEAD_TIMEOUT_S,
            ),
            (408,),
        ),
        "stalled body": (
            raw(
                raw_request(b"", length=False, headers=[b"Content-Length: 1000"]) + b"\x89PNG",
                closes=True,
                min_s=BODY_TIMEOUT_S,
            ),
            (408,),
        ),
        "slow body trickle": (
            raw(
                raw_request(b"", length=False, headers=[b"Content-Length: 100"]),
                *[p for _ in range(30) for p in (b"x", 0.1)],
                closes=True,
                min_s=BODY_TIMEOUT_S,
            ),
            (408,),
        ),
        "stalled chunked body": (
            raw(
                raw_request(b"", length=False, headers=[b"Transfer-Encoding: chunked"]) + b"4\r\n\x89PNG\r\n",
                closes=True,
                min_s=BODY_TIMEOUT_S,
            ),
            (408,),
        ),
        # The API key header
        "key of 60 KB": (raw(raw_request(b"x", key=False, headers=[b"X-API-Key: " + b"k" * 60_000])), (401,)),
        "key with latin-1 bytes": (raw(raw_request(b"x", key=False, headers=[b"X-API-Key: \xe9\xff\xfe"])), (401,)),
        "bearer without token": (raw(raw_request(b"x", key=False, headers=[b"Authorization: Bearer    "])), (401,)),
        "basic auth": (
            raw(
                raw_request(
                    b"x", key=False, headers=[b"Authorization: Basic " + base64.b64encode(b"a:" + API_KEY.encode())]
                )
            ),
            (401,),
        ),
        "two keys, first wrong": (
            raw(raw_request(b"x", key=False, headers=[b"X-API-Key: wrong", KEY])),
            (401,),
        ),  # the first one counts
        "timeout header latin-1": (
            lazy_raw(lambda: [raw_request(png(), headers=[b"X-Request-Timeout: \xb9\xb2"])]),
            (422,),
        ),
        "content-type of 50 KB": (
            lazy_raw(lambda: [raw_request(png(), headers=[b"Content-Type: image/" + b"p" * 50_000])]),
            OK,
        ),
        "content-type latin-1": (lazy_raw(lambda: [raw_request(png(), headers=[b"Content-Type: \xff\xfe/json"])]), OK),
    }


def query_cases() -> dict[str, tuple[Any, tuple[int, ...]]]:
    bad = (422,)
    cases: dict[str, tuple[Any, tuple[int, ...]]] = {}
    odd_numbers = {
        "nan": bad,
        "inf": bad,
        "-inf": bad,
        "1e309": bad,
        "-0": OK,
        "": bad,
        "0x1p-2": bad,
        "1" * 5000: bad,
        "\u0661": bad,
        " 0.5 ": OK,
    }
    for name in ("score_threshold", "mask_threshold"):
        for value, expect in odd_numbers.items():
            cases[f"{name}={value[:12]!r}"] = (query([(name, value), ("mask_format", "none")]), expect)
    for value, expect in {
        "1.5": bad,
        "1e2": bad,
        "9" * 5000: bad,
        "-0": bad,
        "nan": bad,
        "\u0665": bad,
        "100.0": OK,
    }.items():
        cases[f"max_detections={value[:12]!r}"] = (query([("max_detections", value), ("mask_format", "none")]), expect)
    for value, expect in {"RLE": bad, "rle\x00": bad, "\u202erle": bad, "n" * 20_000: bad}.items():
        cases[f"mask_format={value[:12]!r}"] = (query([("mask_format", value)]), expect)
    for value, expect in {"yes": OK, "2": bad, "nan": bad, "": bad, "\u0661": bad}.items():
        cases[f"refine={value!r}"] = (query([("refine", value), ("mask_format", "none")]), expect)
    for value, expect in {
        "9" * 5000: bad,
        "0" * 20: OK,
        "\u0661\u0662": OK,
        "x" * 1025: bad,
        "\U0001f600" * 100: OK,
        "\x00": OK,
    }.items():
        cases[f"image_id={value[:12]!r}"] = (query([("image_id", value), ("mask_format", "none")]), expect)
    for value, expect in {
        ",,,": bad,
        "0": bad,
        "-1": bad,
        "3" * 5000: bad,
        "\u0663": bad,  # Arabic-Indic three: a name the model does not have, not the class id 3
        "circle,circle": OK,
        ",".join(str(i) for i in range(2000)): bad,
        "\u00b2": bad,
    }.items():
        cases[f"classes={value[:12]!r}"] = (query([("classes", value), ("mask_format", "none")]), expect)
    cases.update(
        {
            "score_threshold twice": (query([("score_threshold", "0.1"), ("score_threshold", "0.2")]), bad),
            "classes 2000 times": (query([("classes", "3")] * 2000 + [("mask_format", "none")]), bad),
            "php-style array key": (query("classes[]=3&mask_format=none"), bad),
            "unknown key, invalid UTF-8": (query("%ff%fe=1&mask_format=none"), bad),
            "unknown key, emoji": (query("%F0%9F%98%80=1&mask_format=none"), bad),
            "key without value": (query("refine&mask_format=none"), bad),
            "query of only separators": (query("&&&;;;===&mask_format=none"), bad),
        }
    )
    return cases


def json_cases() -> dict[str, tuple[Any, tuple[int, ...]]]:
    bad, invalid = (400,), (422,)
    cases: dict[str, tuple[Any, tuple[int, ...]]] = {}
    for label, value in {
        "null": b"null",
        "number": b"12",
        "true": b"true",
        "list": b"[]",
        "object": b"{}",
        "empty string": b'""',
        "non-ASCII": '"\u00e9\u00e9=="'.encode(),
        "lone surrogate": rb'"\udc80AAAA"',
        "nested 100000": b"[" * 100_000 + b"]" * 100_000,
        "NaN": b"NaN",
        "huge int": b"9" * 5000,
    }.items():
        cases[f"json image {label}"] = (json_raw(json_image(image_value=value)), bad)
    params = {
        "score_threshold": b"0.5",
        "max_detections": b"5",
        "classes": b'["circle"]',
        "mask_threshold": b"0.5",
        "mask_format": b'"none"',
        "refine": b"true",
        "image_id": b"1",
    }
    odd = {
        "null": (b"null", None),
        "object": (b'{"a": 1}', invalid),
        "list": (b"[1, 2]", None),
        "NaN": (b"NaN", invalid),
        "-Infinity": (b"-Infinity", invalid),
        "big int": (b"1" * 4000, invalid),
        "too big int": (b"1" * 5000, bad),
        "nested 2000": (b"[" * 2000 + b"]" * 2000, bad),
        "nested 500": (b"[" * 500 + b"]" * 500, invalid),
        "lone surrogate": (rb'"\ud800"', bad),
        "float 1e309": (b"1e309", invalid),
        "string": (b'"x"', invalid),
    }
    for field in params:
        for label, (value, expect) in odd.items():
            if label == "null":  # only the optional-without-default fields take null
                expect = OK if field in ("classes", "image_id") else invalid
            elif label == "list":  # no scalar takes a list; classes 1 and 2 are unknown ids
                expect = invalid
            elif field == "image_id" and label in ("big int", "string"):  # any int or short string is an id
                expect = OK
            extra = (
                b'"' + field.encode() + b'": ' + value + (b', "mask_format": "none"' if field != "mask_format" else b"")
            )
            cases[f"json {field} {label}"] = (json_raw(json_image(extra)), expect)
    cases.update(
        {
            "json lone surrogate in key": (json_raw(json_image(rb'"\ud800": 1')), bad),
            "json raw UTF-8 surrogate bytes in value": (json_raw(json_image(b'"image_id": "\xed\xa0\x80"')), bad),
            "json invalid UTF-8": (json_raw(json_image(b'"image_id": "\xff\xfe"')), bad),
            "json duplicate keys": (json_raw(json_image(b'"image": "AAAA", "image": "' + b"QUFB" + b'"')), (415,)),
            "json duplicate parameter": (
                json_raw(json_image(b'"refine": true, "refine": false, "mask_format": "none"')),
                OK,
            ),
            "json with BOM": (json_raw(lambda: b"\xef\xbb\xbf" + json_image(b'"mask_format": "none"')()), OK),
            "json as UTF-16": (json_raw(lambda: json_image(b'"mask_format": "none"')().decode().encode("utf-16")), OK),
            "json as UTF-32": (json_raw(lambda: json_image(b'"mask_format": "none"')().decode().encode("utf-32")), OK),
            "json trailing garbage": (json_raw(lambda: json_image()() + b"}}"), bad),
            "json top-level string": (json_raw(lambda: b'"' + b64(png()).encode() + b'"'), bad),
            "json top-level number": (json_raw(b"1" * 5000), bad),
            "json 100000 unknown keys": (
                json_raw(json_image(b", ".join(b'"k%d": 1' % i for i in range(100_000)))),
                invalid,
            ),
            "json image id of 19 MB": (
                json_raw(lambda: json_image(b'"image_id": "' + b"i" * 19_000_000 + b'"')()),
                invalid,
            ),
            "json 20 MB base64": (
                json_raw(
                    lambda: b'{"image": "' + b64(PNG_MAGIC + bytes(14_500_000)).encode() + b'", "mask_format": "none"}'
                ),
                (422,),
            ),
            "json 20 MB of whitespace in base64": (
                json_raw(
                    lambda: (
                        b'{"mask_format": "none", "image": "' + b" \\n\\t\\r" * 2_500_000 + b64(png()).encode() + b'"}'
                    )
                ),
                OK,
            ),
            "json base64 with line breaks": (
                json_raw(
                    lambda: (
                        b'{"mask_format": "none", "image": "'
                        + b"\\n".join(re.findall(rb".{1,76}", b64(png()).encode()))
                        + b'"}'
                    )
                ),
                OK,
            ),
            "json url-safe base64": (
                json_raw(lambda: b'{"image": "' + base64.urlsafe_b64encode(png() + b"\xff\xfe") + b'"}'),
                bad,
            ),
            "json base64 bad padding": (
                json_raw(lambda: b'{"image": "' + b64(png()).encode().rstrip(b"=") + b'="}'),
                bad,
            ),
            "json data url": (
                json_raw(
                    lambda: b'{"mask_format": "none", "image": "data:image/png;base64,' + b64(png()).encode() + b'"}'
                ),
                OK,
            ),
            "json data url upper case": (
                json_raw(
                    lambda: b'{"mask_format": "none", "image": "DATA:image/png;BASE64,' + b64(png()).encode() + b'"}'
                ),
                OK,
            ),
            "json data url no media type": (
                json_raw(lambda: b'{"mask_format": "none", "image": "data:;base64,' + b64(png()).encode() + b'"}'),
                OK,
            ),
            "json data url wrong media type": (
                json_raw(
                    lambda: (
                        b'{"mask_format": "none", "image": "data:text/html;charset=x;base64,'
                        + b64(png()).encode()
                        + b'"}'
                    )
                ),
                OK,
            ),
            "json data url not base64": (json_raw(b'{"image": "data:image/png,%89PNG"}'), bad),
            "json data url without comma": (json_raw(b'{"image": "data:image/png;base64"}'), bad),
            "json data url header of 1 MB": (
                json_raw(
                    lambda: (
                        b'{"mask_format": "none", "image": "data:image/png;'
                        + b"x" * 1_000_000
                        + b";base64,"
                        + b64(png()).encode()
                        + b'"}'
                    )
                ),
                OK,
            ),
            "json +json media type": (
                json_raw(json_image(b'"mask_format": "none"'), "application/vnd.hostile+json; charset=latin-1"),
                OK,
            ),
            "json declared, body is a PNG": (json_raw(png), bad),
            "json key Image, not image": (json_raw(lambda: b'{"Image": "' + b64(png()).encode() + b'"}'), bad),
            "json key with NUL": (json_raw(json_image(b'"\\u0000": 1')), invalid),
            "json 100000 classes": (
                json_raw(json_image(b'"classes": [' + b", ".join([b"3"] * 100_000) + b"]")),
                invalid,
            ),
            "json 1000 class names of 1 KB": (
                json_raw(json_image(b'"classes": [' + b", ".join([b'"' + b"c" * 1000 + b'"'] * 1000) + b"]")),
                invalid,
            ),
            "json score 1e-400 underflows to 0": (
                json_raw(json_image(b'"score_threshold": 1e-400, "mask_format": "none"')),
                OK,
            ),
            "json mask threshold -0.0": (json_raw(json_image(b'"mask_threshold": -0.0, "mask_format": "none"')), OK),
            "json 5 MB of [": (json_raw(b"[" * 5_000_000), bad),
            "json objects nested 100000": (json_raw(b'{"a":' * 100_000 + b"1" + b"}" * 100_000), bad),
            "json declared, empty body": (json_raw(b""), bad),
        }
    )
    return cases


def multipart_cases() -> dict[str, tuple[Any, tuple[int, ...]]]:
    bad = (400,)
    image_part = lambda: part(b"image", png())  # noqa: E731
    none_part = part(b"mask_format", b"none", filename=None)
    return {
        "multipart no boundary": (form(lambda: multipart(image_part()), "multipart/form-data"), bad),
        "multipart empty boundary": (form(lambda: multipart(image_part()), "multipart/form-data; boundary="), bad),
        "multipart boundary of 2000 chars": (
            form(
                lambda: multipart(image_part(), none_part, boundary=b"b" * 2000),
                "multipart/form-data; boundary=" + "b" * 2000,
            ),
            bad,
        ),
        "multipart boundary not in body": (form(lambda: png()), bad),
        "multipart boundary inside the image": (
            form(lambda: multipart(part(b"image", png() + b"--" + BOUNDARY + b"x" + png()), none_part)),
            OK,
        ),
        "multipart without final boundary": (
            form(lambda: multipart(image_part(), none_part, end=False)),
            OK,
        ),  # complete parts
        # Over the field limit (every parameter once, and MAX_CLASSES classes).
        "multipart 2000 fields": (
            form(lambda: multipart(image_part(), *[part(b"f%d" % i, b"1", filename=None) for i in range(2000)])),
            bad,
        ),
        "multipart field name of 500 KB": (
            form(lambda: multipart(image_part(), part(b"n" * 500_000, b"1", filename=None))),
            bad,
        ),
        "multipart field value of 2 MB": (
            form(lambda: multipart(image_part(), part(b"image_id", b"v" * 2_000_000, filename=None))),
            bad,
        ),
        "multipart nested multipart": (
            form(
                lambda: multipart(
                    part(
                        b"image",
                        multipart(image_part(), boundary=b"inner"),
                        extra=b"Content-Type: multipart/mixed; boundary=inner",
                    ),
                    none_part,
                )
            ),
            (415,),
        ),
        "multipart file in the wrong field": (form(lambda: multipart(part(b"picture", png()))), bad),
        "multipart image as a text field": (form(lambda: multipart(part(b"image", b"hello", filename=None))), bad),
        "multipart two images": (form(lambda: multipart(image_part(), image_part())), bad),
        "multipart empty filename": (form(lambda: multipart(part(b"image", png(), filename=b""), none_part)), OK),
        "multipart filename traversal": (
            form(lambda: multipart(part(b"image", png(), filename=b"../../../etc/passwd\x00.png"), none_part)),
            OK,
        ),
        "multipart latin-1 field name": (
            form(lambda: multipart(image_part(), part(b"\xe9\xff", b"1", filename=None))),
            (422,),
        ),
        "multipart latin-1 value": (
            form(lambda: multipart(image_part(), part(b"mask_format", b"\xff\xfe", filename=None))),
            (422,),
        ),
        "multipart no content-disposition": (form(lambda: multipart(b"Content-Type: image/png\r\n\r\n" + png())), bad),
        "multipart part without name": (form(lambda: multipart(part(None, png()))), bad),
        "multipart empty image file": (form(lambda: multipart(part(b"image", b""))), bad),
        "multipart base64 transfer encoding": (
            form(lambda: multipart(part(b"image", b64(png()).encode(), extra=b"Content-Transfer-Encoding: base64"))),
            (415,),
        ),
        "multipart parameter in query and form": (
            Http(
                lambda: {
                    "content": multipart(part(b"image", png()), part(b"refine", b"false", filename=None)),
                    "headers": {"Content-Type": "multipart/form-data; boundary=" + BOUNDARY.decode()},
                },
                path=SEGMENT + "&refine=true",
            ),
            OK,  # the form's value is used
        ),
        "multipart garbage after end": (
            form(lambda: multipart(image_part(), none_part) + b"\x00" * 1000 + b"--" + BOUNDARY + b"\r\n"),
            OK,
        ),
        "multipart lower-case media type": (
            form(lambda: multipart(image_part(), none_part), "MULTIPART/Form-Data; BOUNDARY=" + BOUNDARY.decode()),
            OK,
        ),
        "multipart/mixed is raw bytes": (
            form(lambda: multipart(image_part()), "multipart/mixed; boundary=" + BOUNDARY.decode()),
            (415,),
        ),
        "multipart part with 10000 headers": (
            form(lambda: multipart(part(b"image", png(), extra=b"\r\n".join([b"X-H: v"] * 10_000)), none_part)),
            bad,
        ),
        "multipart unknown charset": (
            form(
                lambda: multipart(image_part(), none_part),
                "multipart/form-data; charset=no-such; boundary=" + BOUNDARY.decode(),
            ),
            OK,
        ),
        "urlencoded image=": (
            body(lambda: b"image=" + b64(png()).encode(), "application/x-www-form-urlencoded"),
            (415,),
        ),
    }


def image_cases() -> dict[str, tuple[Any, tuple[int, ...]]]:
    bad, big = (422,), (413,)
    cases: dict[str, tuple[Any, tuple[int, ...]]] = {
        # Sizes
        "png 0x0": (image(lambda: crafted_png(0, 0)), bad),
        "png 1x1": (image(lambda: encode(np.zeros((1, 1, 3), np.uint8))), OK),
        "png 1x10000": (image(lambda: encode(np.full((1, 10000, 3), 90, np.uint8))), OK),
        "png 10000x1": (image(lambda: encode(np.full((10000, 1, 3), 90, np.uint8))), OK),
        "png 10000x2": (image(lambda: encode(np.full((10000, 2, 3), 90, np.uint8))), OK),
        "gif 1x1": (image(lambda: encode(np.zeros((1, 1, 3), np.uint8), "GIF")), OK),
        "webp 1x1": (image(lambda: encode(np.zeros((1, 1, 3), np.uint8), "WEBP")), OK),
        "bmp 1x1": (image(lambda: encode(np.zeros((1, 1, 3), np.uint8), "BMP")), OK),
        "tiff 1x1": (image(lambda: encode(np.zeros((1, 1, 3), np.uint8), "TIFF")), OK),
        "jpeg 1x1": (image(lambda: encode(np.zeros((1, 1, 3), np.uint8), "JPEG")), OK),
        # Headers that lie
        "png IHDR 2^31-1 square": (image(lambda: crafted_png(2**31 - 1, 2**31 - 1)), big),
        "png IHDR 0xffffffff": (image(lambda: crafted_png(0xFFFFFFFF, 1)), big),
        "png IHDR 1 x 4e9": (image(lambda: crafted_png(1, 4_000_000_000)), big),
        "png IHDR bit depth 3": (image(lambda: crafted_png(8, 8, depth=3)), bad),
        "png IHDR colour type 9": (image(lambda: crafted_png(8, 8, colour=9)), bad),
        "png IHDR bad CRC": (image(lambda: png()[:29] + b"\0\0\0\0" + png()[33:]), bad),
        "png pixels longer than IHDR": (image(lambda: crafted_png(100, 100, idat=zeros_compressed(50_000_000))), OK),
        "jpeg SOF 65500x65500": (image(lambda: jpeg_with_size(65500, 65500)), big),
        "jpeg SOF 0x0": (image(lambda: jpeg_with_size(0, 0)), bad),
        "bmp 100000x100000": (image(lambda: bmp_with_size(100_000, 100_000)), big),
        "bmp negative width": (image(lambda: bmp_with_size(-64, 48)), big),  # read as unsigned
        "bmp top-down": (image(lambda: bmp_with_size(64, -48)), OK),
        # Bombs
        "png bomb 5000x5000": (image(lambda: crafted_png(5000, 5000, idat=zeros_compressed(5001 * 5000))), big),
        "png zTXt bomb": (
            image(lambda: crafted_png(8, 8, chunks=(png_chunk(b"zTXt", b"k\0\0" + zeros_compressed(20_000_000)),))),
            bad,
        ),
        "png iCCP bomb": (
            image(lambda: crafted_png(8, 8, chunks=(png_chunk(b"iCCP", b"icc\0\0" + zeros_compressed(20_000_000)),))),
            bad,
        ),
        "png 100000 tEXt chunks": (
            image(lambda: crafted_png(8, 8, chunks=(png_chunk(b"tEXt", b"k\0v"),) * 100_000)),
            OK,
        ),
        "gif screen 65535x65535": (image(lambda: gif_with_screen(65535, 65535)), big),
        "tiff 100000x100000": (image(lambda: tiff(100_000, 100_000)), big),
        "tiff 65535 samples per pixel": (image(lambda: tiff(8, 8, extra=[(277, 3, 1, 65535)])), bad),
        "tiff IFD loop": (image(lambda: tiff(8, 8, next_ifd=8)), OK),
        "tiff strip past the end": (image(lambda: tiff(64, 64, data=bytes(10))), bad),
        "tiff compression 65000": (image(lambda: tiff(8, 8, extra=[(259, 3, 1, 65000)])), bad),
        "webp 16384x16384": (image(lambda: webp_vp8l(16384, 16384)), big),
        # Modes
        "jpeg CMYK": (image(in_mode("CMYK", "JPEG")), OK),
        "tiff CMYK": (image(in_mode("CMYK", "TIFF")), OK),
        "png 16-bit grey": (image(in_mode("I;16", "PNG")), OK),
        "tiff I;16": (image(in_mode("I;16", "TIFF")), OK),
        "tiff I with INT_MIN": (image(in_mode("I", "TIFF")), OK),
        "tiff F with NaN and inf": (image(in_mode("F", "TIFF")), OK),
        "png palette with transparency": (image(in_mode("P+transparency", "PNG")), OK),
        "png LA": (image(in_mode("LA", "PNG")), OK),
        "png 1-bit": (image(in_mode("1", "PNG")), OK),
        "bmp 1-bit": (image(in_mode("1", "BMP")), OK),
        "webp RGBA": (image(in_mode("RGBA", "WEBP")), OK),
        "tiff LAB": (image(in_mode("LAB", "TIFF")), OK),
        "tiff YCbCr": (image(in_mode("YCbCr", "TIFF")), OK),
        "png 4-bit palette": (image(in_mode("P", "PNG", bits=4)), OK),
        "png 16-bit RGBA": (
            image(lambda: crafted_png(8, 8, depth=16, colour=6, idat=zlib.compress(bytes((8 * 8 + 1) * 8)))),
            OK,
        ),
        "png 4000 one-byte IDAT chunks": (image(png_in_one_byte_chunks), OK),
        "exif rotated 10000x2": (
            image(lambda: encode(np.full((10000, 2, 3), 90, np.uint8), "JPEG", exif=exif_bytes(6))),
            OK,
        ),
        # Animation
        "gif 500 frames": (image(gif_of_500_frames), OK),
        "gif animated": (image(animated("GIF")), OK),
        "webp animated": (image(animated("WEBP")), OK),
        "png animated (APNG)": (image(animated("PNG")), OK),
        "tiff multi-page": (image(animated("TIFF")), OK),
        # EXIF
        **{f"exif orientation {v}": (image(with_exif(v)), OK) for v in (0, 2, 5, 6, 8, 9, 65535)},
        "exif orientation as text": (image(jpeg_with_app1(exif_orientation(2, 2, b"6\0\0\0"))), OK),
        "exif orientation as LONG 6": (image(jpeg_with_app1(exif_orientation(4, 1, struct.pack("<I", 6)))), OK),
        "exif orientation as 2^32-1": (image(jpeg_with_app1(exif_orientation(4, 1, b"\xff" * 4))), OK),
        "exif orientation as RATIONAL": (
            image(jpeg_with_app1(exif_orientation(5, 1, struct.pack("<I", 26)) + struct.pack("<II", 6, 0))),
            OK,
        ),
        "exif orientation count 1000": (
            image(jpeg_with_app1(exif_orientation(3, 1000, struct.pack("<I", 26)) + bytes(10))),
            OK,
        ),
        "exif orientation on a PNG": (image(with_exif(6, "PNG")), OK),
        "exif orientation on a WEBP": (image(with_exif(8, "WEBP")), OK),
        "exif garbage": (
            image(jpeg_with_app1(b"Exif\0\0" + np.random.default_rng(1).bytes(300))),
            OK,
        ),  # broken EXIF: still the image
        "exif IFD offset past the end": (image(jpeg_with_app1(b"Exif\0\0II*\0" + struct.pack("<I", 0x7FFFFFF0))), OK),
        "exif 65535 IFD entries": (image(jpeg_with_app1(b"Exif\0\0II*\0\x08\0\0\0\xff\xff" + bytes(100))), OK),
        "exif self-referencing IFD": (
            image(
                jpeg_with_app1(
                    b"Exif\0\0II*\0\x08\0\0\0\x01\0" + struct.pack("<HHII", 0x8769, 4, 1, 8) + struct.pack("<I", 8)
                )
            ),
            OK,
        ),
        # Polyglots and liars
        "png with zip appended": (image(lambda: png() + b"PK\x03\x04" + bytes(100)), OK),
        "jpeg with html appended": (image(lambda: image_of("JPEG") + b"<script>alert(1)</script>"), OK),
        "gif header javascript": (image(lambda: b"GIF89a=alert(1)//;" + b"\0" * 20), bad),
        "pdf with a png inside": (image(lambda: b"%PDF-1.4\n" + png()), (415,)),
        "png magic then jpeg": (image(lambda: PNG_MAGIC + image_of("JPEG")), bad),
        "BM then text": (image(lambda: b"BM hello, world"), bad),
        "RIFF but WAVE": (image(lambda: b"RIFF\x24\0\0\0WAVEfmt " + bytes(28)), (415,)),
        "svg": (image(lambda: b"<svg xmlns='http://www.w3.org/2000/svg' width='99999' height='99999'/>"), (415,)),
        **{
            f"random bytes with {fmt} magic": (image(random_with_magic(magic)), bad)
            for fmt, magic in {
                "PNG": PNG_MAGIC,
                "JPEG": b"\xff\xd8\xff",
                "GIF": b"GIF89a",
                "WEBP": b"RIFF\0\0\0\0WEBP",
                "BMP": b"BM",
                "TIFF": b"II*\x00",
            }.items()
        },
        **{
            f"{fmt} magic only": (image(lambda magic=magic: magic), bad)
            for fmt, magic in {"PNG": PNG_MAGIC, "JPEG": b"\xff\xd8\xff", "GIF": b"GIF89a", "TIFF": b"MM\x00*"}.items()
        },
    }
    cuts = {
        "PNG": {
            "signature": after(PNG_MAGIC),
            "mid IHDR": after(b"IHDR", 4),
            "after IHDR": after(b"IHDR", 17),
            "mid IDAT": after(b"IDAT", 50),
            "before IEND": lambda d: len(d) - 12,
            "last byte": lambda d: len(d) - 1,
        },
        "JPEG": {
            "SOI": lambda d: 3,
            "mid APP0": after(b"JFIF"),
            "after DQT": after(b"\xff\xdb", 67),
            "after SOF": after(b"\xff\xc0", 17),
            "after SOS": after(b"\xff\xda", 12),
            "half": lambda d: len(d) // 2,
            "no EOI": lambda d: len(d) - 2,
        },
        "GIF": {
            "header": lambda d: 6,
            "screen": lambda d: 13,
            "palette": after(b"\x2c"),
            "half": lambda d: len(d) // 2,
        },
        "WEBP": {"RIFF": lambda d: 12, "chunk head": lambda d: 20, "half": lambda d: len(d) // 2},
        "BMP": {"file header": lambda d: 14, "info header": lambda d: 30, "half": lambda d: len(d) // 2},
        "TIFF": {"header": lambda d: 8, "half": lambda d: len(d) // 2},
    }
    for fmt, points in cuts.items():
        for where, at in points.items():
            # A PNG without (part of) its IEND chunk has all its pixels; a JPEG without EOI is refused.
            expect = OK if where in ("before IEND", "last byte") else bad
            cases[f"{fmt.lower()} truncated at {where}"] = (image(truncated(fmt, at)), expect)
    return cases


def all_cases() -> list:
    groups = {
        "http": http_cases(),
        "query": query_cases(),
        "json": json_cases(),
        "multipart": multipart_cases(),
        "image": image_cases(),
    }
    return [
        pytest.param(spec, expect, id=f"{group}: {name}")
        for group, cases in groups.items()
        for name, (spec, expect) in cases.items()
    ]


CASES = all_cases()


def test_the_suite_is_large_enough():
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize("spec, expect", CASES)
def test_hostile_input_never_gets_a_server_error(server, client, spec, expect, request):
    name = request.node.callspec.id
    if isinstance(spec, Raw):
        pieces = spec.pieces()
        result = exchange(server.port, pieces, spec.replies, wait_close=spec.closes)
        assert len(result.replies) == spec.replies, (name, result)
        for reply in result.replies:
            check_reply(reply, expect, name)
        if spec.replies > 1 and len(expect) == spec.replies:  # pipelined: answered in order
            assert [r.status for r in result.replies] == list(expect), name
        if spec.closes:
            assert result.closed, f"{name}: the server kept the connection open"
            if result.replies:  # the last answer says so
                assert result.replies[-1].headers.get("connection") == "close", (name, result.replies[-1].headers)
        if spec.min_s:  # a timeout: not answered early (left hanging, the exchange gives up unclosed)
            assert spec.min_s * 0.9 <= result.seconds, f"{name}: answered after {result.seconds:.2f} s"
        return
    kwargs = spec.make()
    headers = dict(kwargs.pop("headers", None) or {})
    if spec.key:
        headers["X-API-Key"] = API_KEY
    response = client.request(spec.method, spec.path, headers=headers, **kwargs)
    reply = Reply(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)
    check_reply(reply, expect, name)
    if response.status_code == 200 and spec.path.startswith("/v1/segment"):
        result = response.json()
        assert isinstance(result["instances"], list) and result["image"]["width"] >= 1, result


# ------------------------------------------------------------------------------------------------
# After all of it


def test_nothing_was_logged_as_an_error_and_no_500_was_counted(server):
    messages = [f"{r.name}: {r.getMessage()}" for r in server.errors.records]
    assert not messages, "\n".join(messages)
    assert metric(server.url, "transfiner_requests_total", status="500") == 0


def test_the_server_still_serves_a_normal_request(server, client):
    picture = scene()
    response = client.post(
        "/v1/segment",
        content=encode(picture),
        headers={"X-API-Key": API_KEY},
        params={"score_threshold": 0, "max_detections": 5, "image_id": 7},
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["image"] == {"width": 128, "height": 96, "image_id": 7}
    assert len(result["instances"]) > 0
    masks = mask_util.decode([instance["segmentation"] for instance in result["instances"]])
    assert masks.shape == (96, 128, len(result["instances"]))
    assert [float(a) for a in mask_util.area([i["segmentation"] for i in result["instances"]])] == [
        i["area"] for i in result["instances"]
    ]
    assert client.get("/health/ready").status_code == 200
