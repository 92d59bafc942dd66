"""``OipError``: a request the protocol refuses, with the status each transport answers it with."""

from __future__ import annotations

import grpc

from transfiner.service.errors import PROTOCOL_STATUS, ServiceError


class OipError(Exception):
    """A refusal: ``message``, ``http_status``, ``grpc_code`` and ``retry_after`` (seconds, or None);
    ``reason`` labels the rejection metric, as ``ServiceError.reason`` does."""

    def __init__(
        self,
        message: str,
        http_status: int = 400,
        grpc_code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
        retry_after: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.grpc_code = grpc_code
        self.retry_after = retry_after
        self.reason = reason


def bad_input(message: str) -> OipError:
    return OipError(message, 400, grpc.StatusCode.INVALID_ARGUMENT)


def not_found(message: str) -> OipError:
    return OipError(message, 404, grpc.StatusCode.NOT_FOUND, reason="unknown_model")


_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def from_service_error(error: ServiceError) -> OipError:
    """The protocol's form of a ``ServiceError`` (its message, retry time and metric reason kept)."""
    return OipError(
        error.message,
        PROTOCOL_STATUS.get(error.status, error.status),
        _GRPC.get(error.status, grpc.StatusCode.UNKNOWN),
        error.retry_after,
        error.reason,
    )
