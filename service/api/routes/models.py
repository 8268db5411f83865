"""Uploaded model weights (safetensors only), used by weights-mode plans."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, UploadFile
from pydantic import TypeAdapter, ValidationError

from service.api.deps import AdminKey, LatencyDep, ReaderKey, SessionDep, SettingsDep
from service.api.errors import error_responses
from service.api.uploads import read_upload
from service.errors import InvalidInput
from service.schemas.architectures import Architecture
from service.schemas.common import MAX_ID
from service.schemas.models import ModelUploadRead
from service.uploads import get_model_upload, store_model_upload

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(400, 401, 403, 422))

_architecture = TypeAdapter(Architecture)


@router.post("", status_code=201, summary="Upload model weights", responses=error_responses(413, 422))
def upload_model(
    file: Annotated[UploadFile, File(description="safetensors weights (LPNET_MAX_WEIGHTS_BYTES at most).")],
    name: Annotated[str, Form(min_length=1, max_length=256)],
    session: SessionDep,
    latency: LatencyDep,
    settings: SettingsDep,
    _key: AdminKey,
    architecture: Annotated[
        str | None,
        Form(description='JSON: the IR, or {"torchvision": "resnet50"}; plans then check they match.'),
    ] = None,
) -> ModelUploadRead:
    """Store safetensors weights (never a pickle) under a name; plans refer to them by id."""
    network = None
    if architecture:
        try:
            network = latency.network(_architecture.validate_json(architecture))
        except ValidationError as exc:
            raise InvalidInput(f"invalid architecture form field: {exc.errors()[0]['msg']}") from exc
    data = read_upload(file, settings.max_weights_bytes, "weights file", "LPNET_MAX_WEIGHTS_BYTES")
    upload = store_model_upload(session, name, data, network)
    session.commit()
    return ModelUploadRead.model_validate(upload)


@router.get("/{model_id}", summary="Show an uploaded model", responses=error_responses(404, 422))
def get_model(
    model_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, _key: ReaderKey
) -> ModelUploadRead:
    """An uploaded model's name, checksum, size and architecture (not its weights)."""
    return ModelUploadRead.model_validate(get_model_upload(session, model_id))
