"""Optional API key for ``/v1/*``: ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import ServiceError


def supplied_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless the settings hold no key or the request carries it."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    supplied = supplied_key(request) or ""
    # Constant time, so response timing does not reveal how much of a guess was right.
    if not hmac.compare_digest(supplied.encode(), expected.get_secret_value().encode()):
        raise ServiceError(
            401, "unauthorized", "missing or wrong API key (X-API-Key or Authorization: Bearer)",
            reason="unauthorized", headers={"WWW-Authenticate": "Bearer"},
        )


def client_key(request: Request) -> str:
    """Who a request counts against for the per-client limit: its API key when keys are checked
    (an unchecked header would let a client pick a fresh identity per request), else its address."""
    if request.app.state.settings.api_key is not None:
        key = supplied_key(request)
        if key:
            return "key:" + key
    return "addr:" + (request.client.host if request.client else "unknown")
