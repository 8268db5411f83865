"""API key schemas."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from service.db.models import KeyScope
from service.schemas.common import DeviceRef, RequestModel


class ApiKeyCreate(RequestModel):
    """A key to create: its scope, a label and, for agent keys, the device it submits for."""

    scope: KeyScope
    name: str | None = Field(default=None, max_length=128)
    device: DeviceRef | None = Field(default=None, description="Required for agent keys, refused otherwise.")


class ApiKeyRead(BaseModel):
    """An API key as it may be shown: prefix and metadata, never the key or its hash."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    prefix: str
    scope: str
    device_id: int | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    """A key just created; `key` is shown this once."""

    key: str = Field(description="Shown once: only its hash is stored.")
