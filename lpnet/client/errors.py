"""Errors of the REST client: the server's error answers as typed exceptions carrying its code.

Every error answer of the server has one shape, ``{"error": {"code", "message", "details"}}``;
`api_error` turns it into the `ApiError` subclass for its status.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from lpnet.client.answers import Job, Plan


class ClientError(Exception):
    """Base of every error the client raises."""


class ServerUnreachable(ClientError):
    """No answer from the server: connection refused, DNS failure, timeout."""


class ApiError(ClientError):
    """An error answer of the server.

    Attributes:
        status: The HTTP status.
        code: The server's machine-readable error code (``not_found``, ``quota_exceeded``, ...).
        message: The server's sentence for people.
        details: The server's structured context.
        headers: The answer's headers (``Retry-After``, ``X-Request-ID``).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = dict(headers or {})

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked to wait before retrying, if it said."""
        return retry_after_seconds(self.headers.get("retry-after"))


class BadRequest(ApiError):
    """400: a body the server cannot parse at all."""


class Unauthorized(ApiError):
    """401: missing, unknown or revoked API key."""


class Forbidden(ApiError):
    """403: the key's scope does not allow this."""


class NotFound(ApiError):
    """404: no such device, plan, predictor, model or path."""


class Conflict(ApiError):
    """409: conflicts with the current state (e.g. a device without predictor yet)."""


class PayloadTooLarge(ApiError):
    """413: the request body is over one of the server's size limits."""


class InvalidRequest(ApiError):
    """422: well-formed input that cannot be acted on; ``details`` names the fields."""


class RateLimited(ApiError):
    """429: over a quota, or the server is busy; ``retry_after`` says when to try again."""


class ServerError(ApiError):
    """5xx."""


class ServiceUnavailable(ServerError):
    """503: a dependency of the server (its database, its tracer) is unavailable for now."""


_ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
    503: ServiceUnavailable,
}


class JobFailed(ClientError):
    """A plan or job finished as failed; ``job`` is its last state, ``job.error`` why."""

    def __init__(self, job: Plan | Job) -> None:
        super().__init__(f"{type(job).__name__.lower()} {job.id} failed: {job.error}")
        self.job = job


class WaitTimeout(ClientError, TimeoutError):
    """A plan or job did not finish within the time waited; ``job`` is its last state."""

    def __init__(self, job: Plan | Job, seconds: float) -> None:
        super().__init__(
            f"{type(job).__name__.lower()} {job.id} is still {job.status} after {seconds:g} s of waiting"
        )
        self.job = job


def api_error(response: httpx.Response) -> ApiError:
    """The typed error of an error answer; a body not in the server's error shape keeps its text."""
    status = response.status_code
    code, message = f"http_{status}", response.text[:500] or response.reason_phrase
    details: dict[str, Any] = {}
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = str(error.get("code", code))
        message = str(error.get("message", message))
        details = error.get("details") if isinstance(error.get("details"), dict) else {}
    cls = _ERRORS_BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return cls(status, code, message, details, response.headers)


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number of seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
