"""GET / and /demo: the browser demo page; GET /static/<name>: its CSS and JavaScript modules.

The files are served from ``service/static/`` as they are (no build step). Only the files shipped
there are answered, looked up by name in a table made at import, so no part of a request's path
ever reaches the file system. ``TRANSFINER_DEMO=false`` leaves this router out (404).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from transfiner.service.errors import ServiceError

STATIC = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
FILES = {path.name: path for path in STATIC.iterdir() if path.suffix in MEDIA_TYPES}

HEADERS = {
    # Everything the page uses comes from this server; the browser refuses anything else
    # (blob: and data: for the user's own image and the downloads it makes).
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    # Revalidate (ETag / Last-Modified) so an upgraded server never runs with stale modules.
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(tags=["demo"], include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise ServiceError(404, "not_found", f"no static file {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("/")
@router.get("/demo")
async def page() -> FileResponse:
    return _file("index.html")


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    return _file(name)
