"""Uploaded model weights."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelUploadRead(BaseModel):
    """Uploaded safetensors weights (the bytes themselves are not returned)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    sha256: str
    size_bytes: int
    architecture: dict[str, Any] | None = Field(description="The IR the weights belong to, when given.")
    created_at: datetime
