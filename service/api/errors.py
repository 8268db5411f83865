"""The one JSON error shape, and the handlers that turn every error into it.

Every 4xx/5xx answer looks like ``{"error": {"code": ..., "message": ..., "details": {...}}}``: HTTP
errors, request validation errors, `lpnet.errors.LpnetError`, `service.errors.ServiceError` and
unexpected exceptions alike. Status codes for domain errors are decided here and nowhere else.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from lpnet.errors import (
    ExternalDataRefused,
    InvalidArchitecture,
    InvalidWidthVector,
    LpnetError,
    OnnxLimitExceeded,
    UnknownModel,
    UnsupportedOperator,
    UnsupportedOpset,
)
from lpnet.predictor.artifact import ArtifactError
from service.db.session import describe_database_error
from service.errors import ServiceError
from service.log import request_id_var

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"

# lpnet errors are all about what the client sent (an architecture, a model name, a width vector):
# well-formed JSON that cannot be acted on, hence 422. Looked up along the class hierarchy, so a new
# subclass inherits its parent's status until it is listed here.
LPNET_ERROR_STATUS: dict[type[LpnetError], int] = {
    InvalidArchitecture: 422,
    UnsupportedOperator: 422,
    UnknownModel: 422,
    InvalidWidthVector: 422,
    ExternalDataRefused: 422,
    OnnxLimitExceeded: 422,
    UnsupportedOpset: 422,
    # A stored predictor this build cannot read: the state of the server, fixed by refitting.
    ArtifactError: 409,
    LpnetError: 422,
}


class ErrorBody(BaseModel):
    """What went wrong."""

    code: str = Field(description="Stable machine-readable code, e.g. not_found, validation_error.")
    message: str = Field(description="One sentence for people: what was wrong and what to do.")
    details: dict[str, Any] = Field(default_factory=dict, description="Structured context.")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx response."""

    error: ErrorBody


_RESPONSE_DESCRIPTIONS = {
    400: "A request body that cannot be parsed at all.",
    401: "Missing, unknown or revoked API key.",
    403: "The API key's scope does not allow this.",
    404: "Not found.",
    409: "Conflicts with the current state.",
    413: "Request body too large.",
    422: "Invalid input.",
    429: "Too many requests, or the server is busy: retry after the Retry-After seconds.",
    503: "A dependency (the database, or the process that traces models) is unavailable.",
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` documenting the error shape, for ``APIRouter(responses=...)`` or a route.

    Example: ``APIRouter(prefix="/v1/devices", responses=error_responses(401, 403, 404, 422))``.
    """
    return {
        code: {"model": ErrorResponse, "description": _RESPONSE_DESCRIPTIONS.get(code, "Error.")}
        for code in status_codes
    }


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Build a response in the error shape."""
    body = ErrorResponse(error=ErrorBody(code=code, message=message, details=details or {}))
    return JSONResponse(status_code=status_code, content=jsonable_encoder(body.model_dump()), headers=headers)


def status_code_name(status_code: int) -> str:
    """Error code for a bare HTTP status: 404 -> ``not_found``, 405 -> ``method_not_allowed``."""
    try:
        phrase = HTTPStatus(status_code).phrase
    except ValueError:
        return "http_error"
    return re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")


def status_for_lpnet_error(exc: LpnetError) -> int:
    """HTTP status for an lpnet domain error."""
    for cls in type(exc).__mro__:
        if cls in LPNET_ERROR_STATUS:
            return LPNET_ERROR_STATUS[cls]
    return 422


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    if isinstance(detail, dict) and "message" in detail:
        # Raised by our own code (e.g. the body size limit) with a code of its own.
        code = str(detail.get("code") or status_code_name(exc.status_code))
        message = str(detail["message"])
        details = dict(detail.get("details") or {})
    else:
        code = status_code_name(exc.status_code)
        message = str(detail) if detail else HTTPStatus(exc.status_code).phrase
        details = {}
        if exc.status_code in (404, 405) and message == HTTPStatus(exc.status_code).phrase:
            message = f"{message}: {request.method} {request.url.path}"
            details = {"method": request.method, "path": request.url.path}
    return error_response(exc.status_code, code, message, details, headers=exc.headers)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    errors = []
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ())]
        errors.append(
            {
                "field": ".".join(location) or "(request)",
                "message": str(error.get("msg", "invalid value")),
                "type": str(error.get("type", "value_error")),
            }
        )
    return errors


async def _validation_exception_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _validation_errors(exc)
    summary = "; ".join(f"{error['field']}: {error['message']}" for error in errors[:5])
    if len(errors) > 5:
        summary += f"; and {len(errors) - 5} more"
    return error_response(422, "validation_error", f"invalid request: {summary}", {"errors": errors})


async def _lpnet_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LpnetError)
    return error_response(status_for_lpnet_error(exc), exc.code, exc.message, exc.details)


async def _service_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status_code, exc.code, exc.message, exc.details, headers=exc.headers)


async def _unhandled_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    # Runs outside the request-id middleware (Starlette's outermost layer), so restore the id for the log.
    request_id = getattr(request.state, "request_id", None)
    token = request_id_var.set(request_id)
    try:
        logger.error(
            "unhandled error in %s %s",
            request.method,
            request.url.path,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
    finally:
        request_id_var.reset(token)
    message = "internal server error"
    if request_id:
        message += f"; quote request id {request_id} when reporting it"
    return error_response(
        500,
        "internal_error",
        message,
        {"request_id": request_id} if request_id else {},
        headers={REQUEST_ID_HEADER: request_id} if request_id else None,
    )


# The database is down, restarting or out of connections: the client should retry, not report a bug.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)


async def _database_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    reason = describe_database_error(exc)
    logger.warning("database unavailable during %s %s: %s", request.method, request.url.path, reason)
    return error_response(
        503,
        "database_unavailable",
        f"the database is unreachable ({reason}); retry shortly",
        {},
        headers={"Retry-After": "1"},
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error response the one JSON shape."""
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(RequestValidationError, _validation_exception_handler)
    app.add_exception_handler(LpnetError, _lpnet_error_handler)
    app.add_exception_handler(ServiceError, _service_error_handler)
    for database_error in DATABASE_UNAVAILABLE:
        app.add_exception_handler(database_error, _database_unavailable_handler)
    app.add_exception_handler(Exception, _unhandled_exception_handler)
