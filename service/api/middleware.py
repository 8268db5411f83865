"""ASGI middleware: request ids, and the guard that checks a request before its body is read.

Both are plain ASGI callables rather than Starlette's BaseHTTPMiddleware, which buffers streaming
responses and runs the app in another task (and so loses context variables set inside it).
"""

from __future__ import annotations

import functools
import inspect
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from fastapi import HTTPException
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, HTTPExceptionHandler, Message, Receive, Scope, Send

from service.api.deps import API_KEY_STATE, check_api_key, get_current_key, sent_api_key
from service.api.errors import REQUEST_ID_HEADER, error_response
from service.log import request_id_var

# A client-sent id is echoed only if it is short and plain, so it is safe in headers and log lines.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIdMiddleware:
    """Give each request an id: the client's ``X-Request-ID`` if usable, else a new one.

    The id is echoed in the response header, stored in ``request.state.request_id`` and set in
    `service.log.request_id_var` so every log record of the request carries it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = incoming if incoming and _VALID_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        token = request_id_var.set(request_id)
        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            request_id_var.reset(token)


@dataclass(frozen=True)
class BodyLimit:
    """The largest request body a route accepts, and the setting it comes from.

    Attributes:
        max_bytes: The limit.
        setting: The environment variable that sets it, e.g. ``LPNET_MAX_JSON_BYTES``.
        form_allowance: Bytes of `max_bytes` on top of the setting, for a multipart form's other
            fields next to the file the setting limits.
    """

    max_bytes: int
    setting: str
    form_allowance: int = 0

    def source(self) -> str:
        """Where the limit comes from, for error messages."""
        if self.form_allowance:
            return f"the server's {self.setting} plus {self.form_allowance} bytes for the form's other fields"
        return f"the server's {self.setting}"


@dataclass(frozen=True)
class RouteRule:
    """What a route asks of a request before its body is read."""

    needs_key: bool
    body_limit: BodyLimit


def needs_api_key(dependant: Dependant) -> bool:
    """Whether `get_current_key` is among the dependencies of a route (at any depth)."""
    return dependant.call is get_current_key or any(needs_api_key(dep) for dep in dependant.dependencies)


class RouteRules:
    """The `RouteRule` of each API route, found by matching a request as the router will.

    Matches are remembered by method and path (the most recent `CACHED_PATHS` paths of at most
    `CACHED_PATH_CHARS` characters, so odd paths cannot fill memory): a busy route is looked up in a
    dict rather than by trying each route's pattern on every request.

    Args:
        routes: The app's API routes, in the order the router tries them; other routes are skipped.
        body_limits: Body limits of the routes that need one of their own, by endpoint function.
        default_limit: The body limit of every other route, and of requests no route matches.
    """

    CACHED_PATHS = 1024
    CACHED_PATH_CHARS = 256

    def __init__(
        self,
        routes: Iterable[BaseRoute],
        body_limits: Mapping[Any, BodyLimit],
        default_limit: BodyLimit,
    ) -> None:
        self._rules = [
            (route, RouteRule(needs_api_key(route.dependant), body_limits.get(route.endpoint, default_limit)))
            for route in routes
            if isinstance(route, APIRoute)
        ]
        self._unmatched = RouteRule(needs_key=False, body_limit=default_limit)
        self._cached_match = functools.lru_cache(maxsize=self.CACHED_PATHS)(self._match)

    def match(self, scope: Scope) -> RouteRule:
        """The rule of the route that will answer `scope`; the default rule if none matches fully."""
        key = (scope["method"], scope["path"], scope.get("root_path", ""))
        return self._cached_match(*key) if len(key[1]) <= self.CACHED_PATH_CHARS else self._match(*key)

    def _match(self, method: str, path: str, root_path: str) -> RouteRule:
        # A route's `matches` reads only these keys of a scope.
        scope = {"type": "http", "method": method, "path": path, "root_path": root_path}
        for route, rule in self._rules:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return rule
        return self._unmatched


class RequestGuardMiddleware:
    """Check each request against its route's `RouteRule` before the app reads a byte of the body.

    In order: a route that needs a key gets it checked (`service.api.deps.check_api_key`: the key
    cache, else the database in the thread pool) and answers 401 without one; the checked key is left
    in ``request.state`` for `get_current_key`. Then a declared ``Content-Length`` over the route's
    body limit is refused with 413; a chunked body is counted as the app reads it and refused once it
    passes the limit. Scope checks (403) stay in the routes' dependencies.

    A failed key check is answered by the app's own exception handlers (`service.api.errors`): 401,
    or 503 while the database is unreachable. Every refusal has the one error shape, and one of a
    request with a body closes the connection rather than leaving the server to read the body.
    """

    def __init__(self, app: ASGIApp, rules: RouteRules) -> None:
        self.app = app
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = self.rules.match(scope)
        headers = Headers(scope=scope)
        if rule.needs_key:
            refusal = await _authenticate(scope)
            if refusal is not None:
                if _has_body(headers):
                    refusal.headers["Connection"] = "close"
                await refusal(scope, receive, send)
                return

        limit = rule.body_limit
        declared = _content_length(headers)
        if declared is not None and declared > limit.max_bytes:
            message, details = _too_large(scope, limit)
            response = error_response(
                413,
                "request_too_large",
                message,
                {**details, "content_length": declared},
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    text, details = _too_large(scope, limit)
                    # An HTTPException passes through FastAPI's body parsing to the error handlers;
                    # any other exception type would be reported as a 400 parse error.
                    raise HTTPException(
                        413,
                        detail={"code": "request_too_large", "message": text, "details": details},
                        headers={"Connection": "close"},
                    )
            return message

        await self.app(scope, limited_receive, send)


async def _authenticate(scope: Scope) -> Response | None:
    """Check the request's key and leave it in the request state; the error response if it fails."""
    request = Request(scope)
    try:
        key = await check_api_key(request.app, await sent_api_key(request))
    except Exception as exc:
        handler = _exception_handler(request.app.exception_handlers, exc)
        if handler is None:
            raise
        response = handler(request, exc)
        return await response if inspect.isawaitable(response) else response
    scope.setdefault("state", {})[API_KEY_STATE] = key
    return None


def _exception_handler(handlers: Mapping[Any, Any], exc: Exception) -> HTTPExceptionHandler | None:
    """The app's handler for `exc`'s class or nearest base; None for one only `Exception` catches."""
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return cast(HTTPExceptionHandler, handlers[cls])
    return None


def _too_large(scope: Scope, limit: BodyLimit) -> tuple[str, dict[str, int]]:
    message = (
        f"request body exceeds the limit of {limit.max_bytes} bytes for {scope['method']} {scope['path']} "
        f"({limit.source()})"
    )
    return message, {"max_bytes": limit.max_bytes}


def _content_length(headers: Headers) -> int | None:
    declared = headers.get("content-length")
    if declared is None or not (declared.isascii() and declared.isdigit()):
        return None
    return int(declared)


def _has_body(headers: Headers) -> bool:
    return bool(_content_length(headers)) or "transfer-encoding" in headers
