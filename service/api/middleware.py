"""ASGI middleware: request ids and the request body size limit.

Both are plain ASGI callables rather than Starlette's BaseHTTPMiddleware, which buffers streaming
responses and runs the app in another task (and so loses context variables set inside it).
"""

from __future__ import annotations

import re
import uuid

from fastapi import HTTPException
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class BodySizeLimitMiddleware:
    """Refuse request bodies larger than `max_bytes` with 413 in the error shape.

    A declared ``Content-Length`` over the limit is refused before the app runs; a chunked body is
    counted as it is read and refused once it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | None) -> tuple[str, str, dict[str, int]]:
        message = (
            f"request body exceeds the limit of {self.max_bytes} bytes (the server's LPNET_MAX_REQUEST_BYTES)"
        )
        details = {"max_bytes": self.max_bytes}
        if size is not None:
            details["content_length"] = size
        return "request_too_large", message, details

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if (
            declared is not None
            and declared.isascii()
            and declared.isdigit()
            and int(declared) > self.max_bytes
        ):
            code, message, details = self._too_large(int(declared))
            response = error_response(413, code, message, details, headers={"Connection": "close"})
            await response(scope, receive, send)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    code, text, details = self._too_large(None)
                    # An HTTPException passes through FastAPI's body parsing to the error handlers;
                    # any other exception type would be reported as a 400 parse error.
                    raise HTTPException(413, detail={"code": code, "message": text, "details": details})
            return message

        await self.app(scope, limited_receive, send)
