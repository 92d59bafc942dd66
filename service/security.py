"""Optional API key for ``/v1/*``, ``/v2/*`` and gRPC inference: ``X-API-Key: <key>`` or
``Authorization: Bearer <key>`` (gRPC: the same names in the call's metadata).

- ``guarded(settings)``: what ``include_router`` adds to a router whose routes need the key; with
  no key configured nothing, so /openapi.json then declares no security scheme and no 401.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from transfiner.service.errors import ServiceError
from transfiner.service.schemas import ErrorResponse
from transfiner.service.settings import ServiceSettings

# Declared as security schemes so that /openapi.json (and /docs' "Authorize") shows both ways of
# sending the key; an operation lists them as alternatives (either one is enough). auto_error is
# off: they never answer by themselves (FastAPI's own 403/401 would not be the service's error
# shape).
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", auto_error=False, description="the API key")
BEARER = HTTPBearer(scheme_name="Bearer", auto_error=False, description="the API key as a Bearer token")

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "missing or wrong API key",
        "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    }
}


def key_in(headers: Mapping[str, str]) -> str | None:
    """The key sent in ``x-api-key``, else as ``authorization: Bearer <key>`` (lower-case names:
    HTTP headers as Starlette gives them, gRPC metadata)."""
    key = headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def supplied_key(request: Request) -> str | None:
    return key_in(request.headers)


def key_matches(supplied: str | None, expected: SecretStr) -> bool:
    """In constant time, so response timing does not reveal how much of a guess was right."""
    return hmac.compare_digest((supplied or "").encode(), expected.get_secret_value().encode())


async def require_api_key(
    request: Request,
    _header: str | None = Security(API_KEY_HEADER),
    _bearer: HTTPAuthorizationCredentials | None = Security(BEARER),
) -> None:
    """FastAPI dependency: 401 unless the request carries the configured key.

    The two security parameters document the schemes; the key itself is read by
    ``supplied_key``, the one definition that ``client_key`` shares (a Bearer token is stripped
    of surrounding blanks there, which HTTPBearer does not do)."""
    expected = request.app.state.settings.api_key
    if expected is None:  # an app made without a key never adds this dependency; stay open regardless
        return
    if not key_matches(supplied_key(request), expected):
        raise ServiceError(
            401,
            "unauthorized",
            "missing or wrong API key (X-API-Key or Authorization: Bearer)",
            reason="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )


def guarded(settings: ServiceSettings, unauthorized: dict[int | str, dict[str, Any]] = UNAUTHORIZED) -> dict[str, Any]:
    """``include_router`` arguments for routes behind the key: the check and its 401 (documented
    as ``unauthorized``: the /v2 routes answer in the protocol's error shape), declared only when a
    key is configured (the document then says exactly what the server enforces)."""
    if settings.api_key is None:
        return {}
    return {"dependencies": [Depends(require_api_key)], "responses": unauthorized}


def client_key(request: Request) -> str:
    """Who a request counts against for the per-client limit: its API key when keys are checked
    (an unchecked header would let a client pick a fresh identity per request), else its address."""
    if request.app.state.settings.api_key is not None:
        key = supplied_key(request)
        if key:
            return "key:" + key
    return "addr:" + (request.client.host if request.client else "unknown")
