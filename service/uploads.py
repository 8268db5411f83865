"""Uploaded model weights: safetensors only, parsed by `safetensors` (a user's file is never unpickled)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from lpnet.arch.ir import Network
from service.db.models import ModelUpload
from service.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    import torch

MAX_NAME_LENGTH = 256


def parse_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file.

    Raises:
        InvalidInput: The bytes are not a safetensors file, or hold no tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise InvalidInput(
            f"not a readable safetensors file: {exc}; save weights with safetensors.torch.save_file "
            "(pickled .pt/.pth files are not accepted)"
        ) from exc
    if not tensors:
        raise InvalidInput("the safetensors file holds no tensors")
    return tensors


def store_model_upload(
    session: Session, name: str, data: bytes, architecture: Network | None = None
) -> ModelUpload:
    """Check and store uploaded weights (the caller commits).

    Raises:
        InvalidInput: A bad name, or bytes that are not safetensors.
    """
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(f"a model name needs 1 to {MAX_NAME_LENGTH} characters, got {len(name)}")
    parse_safetensors(data)
    upload = ModelUpload(
        name=name,
        architecture=architecture.model_dump(mode="json") if architecture is not None else None,
        weights=data,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )
    session.add(upload)
    session.flush()
    return upload


def get_model_upload(session: Session, model_id: int) -> ModelUpload:
    """Return uploaded model `model_id` (its weights are loaded on access).

    Raises:
        NotFound: No such upload.
    """
    upload = session.get(ModelUpload, model_id)
    if upload is None:
        raise NotFound(f"no uploaded model with id {model_id}; upload weights with POST /v1/models")
    return upload


def load_weights(session: Session, model_id: int) -> dict[str, torch.Tensor]:
    """The tensors of uploaded model `model_id`."""
    data = session.scalar(select(ModelUpload.weights).where(ModelUpload.id == model_id))
    if data is None:
        raise NotFound(f"no uploaded model with id {model_id}; upload weights with POST /v1/models")
    return parse_safetensors(data)
