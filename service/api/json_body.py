"""JSON request bodies parsed and validated in the thread pool rather than on the event loop.

FastAPI parses and validates a body parameter on the event loop before the route runs; a body of
megabytes (an architecture of thousands of layers, thousands of width vectors) then stalls every
other request, /healthz included. A route takes such a body as a dependency instead::

    LatencyBody = Annotated[LatencyRequest, json_body(LatencyRequest)]

which reads the bytes on the loop and parses them in the thread pool, with the answers FastAPI
gives: 422 ``validation_error`` with the field paths under ``body``, and 400 for a body that cannot
be decoded. The route documents its body with ``openapi_extra=json_body_openapi(LatencyRequest)``,
and `document_json_bodies` adds the models' schemas to the app's OpenAPI document.
"""

from __future__ import annotations

import email.message
import gc
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.models import OpenAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute

ModelT = TypeVar("ModelT", bound=BaseModel)

SCHEMA_REF_TEMPLATE = "#/components/schemas/{model}"


class _CollectorPause:
    """Pauses the cyclic garbage collector while any parse is under way; the last one to finish ends it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parses = 0
        self._was_enabled = False

    @contextmanager
    def during_parse(self) -> Iterator[None]:
        with self._lock:
            if self._parses == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._parses += 1
        try:
            yield
        finally:
            with self._lock:
                self._parses -= 1
                if self._parses == 0 and self._was_enabled:
                    gc.enable()


# A parse holds the interpreter lock for its whole length, so it stalls the event loop however it is
# scheduled. Parsing megabytes makes hundreds of thousands of objects, and each allocation counts
# towards a collection that walks every object in the process: most of that length. Parsed JSON
# holds no reference cycles; cycles other threads leave meanwhile are collected once the pause ends.
_COLLECTOR_PAUSE = _CollectorPause()


class JsonBodyReader(Generic[ModelT]):
    """A dependency that reads the request body and validates it as `model` in the thread pool."""

    def __init__(self, model: type[ModelT]) -> None:
        self.model = model

    async def __call__(self, request: Request) -> ModelT:
        try:
            data = await request.body()
        except HTTPException:
            # The body size limit answers 413 from inside the read.
            raise
        except Exception as exc:
            raise HTTPException(400, "There was an error parsing the body") from exc
        is_json = _is_json_content_type(request.headers.get("content-type"))
        return await run_in_threadpool(self._parse, data, is_json)

    def _parse(self, data: bytes, is_json: bool) -> ModelT:
        with _COLLECTOR_PAUSE.during_parse():
            return parse_json_body(self.model, data, is_json)


def json_body(model: type[ModelT]) -> Any:
    """``Depends`` on a `JsonBodyReader` of `model`, for ``Annotated[Model, json_body(Model)]``."""
    return Depends(JsonBodyReader(model))


def parse_json_body(model: type[ModelT], data: bytes, is_json: bool) -> ModelT:
    """Validate a request body as `model` the way FastAPI validates a body parameter.

    Args:
        model: The body's model.
        data: The raw body.
        is_json: Whether the content type is JSON; any other body is validated as bytes (and refused).

    Raises:
        RequestValidationError: The body is missing, not JSON, or not a valid `model`; locations
            start with ``body``.
        HTTPException: 400 when JSON content cannot be decoded as text.
    """
    if not data:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    value: Any = data
    if is_json:
        try:
            value = json.loads(data)
        except json.JSONDecodeError as exc:
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body", exc.pos),
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": exc.msg},
                    }
                ],
                body=exc.doc,
            ) from exc
        except ValueError as exc:
            # Bytes in no encoding JSON allows.
            raise HTTPException(400, "There was an error parsing the body") from exc
    try:
        return model.model_validate(value, from_attributes=True)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors, body=value) from exc


def _is_json_content_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json``, as FastAPI decides it; no content type is not JSON."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def json_body_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that takes a `json_body` of `model`: its required JSON request body.

    The body refers to the model in ``components/schemas``, where `document_json_bodies` puts it.
    """
    reference = {"$ref": SCHEMA_REF_TEMPLATE.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": reference}}}}


def document_json_bodies(app: FastAPI, routes: Iterable[BaseRoute]) -> None:
    """Add the schemas of the `json_body` models of `routes` (and those they refer to) to the app's OpenAPI.

    Args:
        app: The app whose generated document gets the schemas.
        routes: The API routes as declared; those with a `JsonBodyReader` dependency are documented.
    """
    schemas: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, APIRoute):
            continue
        for dependency in route.dependant.dependencies:
            if isinstance(dependency.call, JsonBodyReader):
                model = dependency.call.model
                schema = model.model_json_schema(ref_template=SCHEMA_REF_TEMPLATE)
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
    app.openapi = _with_schemas(app.openapi, schemas)  # type: ignore[method-assign]


def _with_schemas(
    generate: Callable[[], dict[str, Any]], schemas: dict[str, dict[str, Any]]
) -> Callable[[], dict[str, Any]]:
    """`generate`, with `schemas` added to the components of the document it returns.

    The result is normalised as FastAPI normalises its own document (no null fields), and kept for
    as long as `generate` returns the same (cached) document.
    """
    # (generated document, merged document): the generated one is held so its identity stays unique.
    cache: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def openapi() -> dict[str, Any]:
        document = generate()
        if not cache or cache[0][0] is not document:
            components = {**document.get("components", {})}
            components["schemas"] = {**schemas, **components.get("schemas", {})}
            merged = OpenAPI.model_validate({**document, "components": components})
            cache[:] = [(document, jsonable_encoder(merged, by_alias=True, exclude_none=True))]
        return cache[0][1]

    return openapi
