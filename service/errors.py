"""Errors raised by the service layer. The API maps them to HTTP responses in `service.api.errors`."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of errors the service raises on purpose.

    Attributes:
        code: Stable machine-readable code, sent as ``error.code``.
        status_code: HTTP status the API answers with.
        details: JSON-serialisable context, sent as ``error.details``.
        headers: Extra HTTP response headers (e.g. ``WWW-Authenticate``).
    """

    code = "service_error"
    status_code = 500

    def __init__(
        self,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}


class InvalidInput(ServiceError):
    """A request or command argument that cannot be acted on as given."""

    code = "invalid_input"
    status_code = 422


class NotFound(ServiceError):
    """A named resource (device, key, job, ...) does not exist."""

    code = "not_found"
    status_code = 404


class DatasetUnavailable(NotFound):
    """A dataset's files are not where they were said to be (`lpnet train`; nothing is ever downloaded)."""

    code = "dataset_unavailable"


class Conflict(ServiceError):
    """The resource exists already or the change clashes with the current state."""

    code = "conflict"
    status_code = 409


class IdempotencyKeyReused(Conflict):
    """An idempotency key sent again with a body other than the one first stored under it."""

    code = "idempotency_key_reused"


class Unauthenticated(ServiceError):
    """No API key, or a key that is unknown or revoked."""

    code = "unauthenticated"
    status_code = 401

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details, headers={"WWW-Authenticate": "Bearer"})


class PermissionDenied(ServiceError):
    """A valid API key whose scope does not allow the operation."""

    code = "permission_denied"
    status_code = 403


class DatabaseUnavailable(ServiceError):
    """The database cannot be reached or answered with an error."""

    code = "database_unavailable"
    status_code = 503


class SchemaOutOfDate(ServiceError):
    """The database schema is not at the revision this code expects."""

    code = "schema_out_of_date"
    status_code = 503


class PayloadTooLarge(ServiceError):
    """An upload larger than the server accepts for it."""

    code = "request_too_large"
    status_code = 413


class QuotaExceeded(ServiceError):
    """An API key asked for more work than its quota allows; retry after the ``Retry-After`` seconds."""

    code = "quota_exceeded"
    status_code = 429

    def __init__(self, message: str, details: dict[str, Any], retry_after_seconds: int) -> None:
        super().__init__(
            message,
            {**details, "retry_after_seconds": retry_after_seconds},
            headers={"Retry-After": str(retry_after_seconds)},
        )


class TooManyRequests(ServiceError):
    """The server runs as much of some costly work at once as it allows; retry after ``Retry-After``.

    Raise it with ``headers={"Retry-After": seconds}``.
    """

    code = "busy"
    status_code = 429
