"""The base of JSON documents the service stores and answers as they are: job progress and results,
predictor metrics, agent task payloads.

A document is typed for the OpenAPI schema, but answered with the keys it was stored with: a key a
document lacks (one written before the key existed) stays absent rather than appearing with its
default, and a key the model does not name is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    GetJsonSchemaHandler,
    ModelWrapValidatorHandler,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

logger = logging.getLogger(__name__)


class StoredDocument(BaseModel):
    """A stored JSON document: its typed keys, and any other keys it has, answered as stored."""

    model_config = ConfigDict(extra="allow")

    # Left without a return annotation on purpose: pydantic would take an annotated return type as
    # the serialised schema (a free-form object), where the model's own fields describe it exactly.
    @model_serializer(mode="wrap")
    def _as_stored(self, handler: SerializerFunctionWrapHandler):
        """The keys the document was stored with: fields it had, and keys the model does not name."""
        data = handler(self)
        if not isinstance(data, dict):
            return data
        kept = self.model_fields_set | set(self.model_extra or ())
        return {key: value for key, value in data.items() if key in kept}


class LenientDocument(StoredDocument):
    """A document that may come from outside the service (an imported predictor's metrics, what an
    agent reported), or that is read with the checks of a request model, which may have tightened
    since it was stored: a key whose value does not fit is left out of the answer, and logged, rather
    than making every answer that shows the document fail. A required key that does not fit still fails.
    """

    @model_validator(mode="wrap")
    @classmethod
    def _without_misfits(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            if not isinstance(data, dict):
                raise
            misfits = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
            if not misfits:
                raise
            logger.warning("%s: left out keys whose values do not fit: %s", cls.__name__, sorted(misfits))
            return handler({key: value for key, value in data.items() if key not in misfits})


def document_of_kind(models: Mapping[str, type[StoredDocument]], value: Any, info: ValidationInfo) -> Any:
    """`value` validated as the document model of the `kind` field validated before it, when that kind
    has one: the body of a field validator (``mode="before"``) of a field typed as a union of the kinds'
    models, so that a document is read as its own kind's rather than the first model it fits."""
    model = models.get(str(info.data.get("kind")))
    if model is None or not isinstance(value, dict):
        return value
    return model.model_validate(value)


class SchemaOf:
    """Documents a JSON field with a model's schema while keeping the stored value as it is.

    For stored documents of a model that validates more than their shape (a network's graph and its
    IR version): re-validating them on every read would cost time, and a document stored by an older
    version would make its answers fail. ``Annotated[dict[str, Any], SchemaOf(Network)]``.
    """

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model

    def __get_pydantic_json_schema__(
        self, _schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(self.model.__pydantic_core_schema__)
