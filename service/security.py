"""Optional API key for ``/v1/*`` (and gRPC inference): ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from transfiner.service.errors import ServiceError

# Declared as security schemes so that /openapi.json (and /docs' "Authorize") shows both ways of
# sending the key; an operation lists them as alternatives (either one is enough). auto_error is
# off: they never answer by themselves (FastAPI's own 403/401 would not be the service's error
# shape), and with no key configured every request passes.
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKey",
    auto_error=False,
    description="the service's API key (needed only when the service is configured with one)",
)
BEARER = HTTPBearer(
    scheme_name="Bearer",
    auto_error=False,
    description="the service's API key as a Bearer token (needed only when the service is configured with one)",
)


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
    """FastAPI dependency: 401 unless the settings hold no key or the request carries it.

    The two security parameters document the schemes; the key itself is read by
    ``supplied_key``, the one definition that ``client_key`` shares (a Bearer token is stripped
    of surrounding blanks there, which HTTPBearer does not do)."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    if not key_matches(supplied_key(request), expected):
        raise ServiceError(
            401,
            "unauthorized",
            "missing or wrong API key (X-API-Key or Authorization: Bearer)",
            reason="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )


def client_key(request: Request) -> str:
    """Who a request counts against for the per-client limit: its API key when keys are checked
    (an unchecked header would let a client pick a fresh identity per request), else its address."""
    if request.app.state.settings.api_key is not None:
        key = supplied_key(request)
        if key:
            return "key:" + key
    return "addr:" + (request.client.host if request.client else "unknown")
