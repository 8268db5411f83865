"""API and command schemas (pydantic), kept apart from the ORM models in `service.db.models`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Names end up in URLs and on command lines, so keep them to characters that need no quoting.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class HealthStatus(BaseModel):
    """Answer of ``/healthz``: the process is up."""

    status: Literal["ok"] = "ok"


class ReadyStatus(BaseModel):
    """Answer of ``/readyz``: the process is up and its database answers."""

    status: Literal["ok"] = "ok"
    database: str = Field(description="Backend of the database that answered (sqlite or postgresql).")


class DeviceCreate(BaseModel):
    """What it takes to register a device.

    Hardware, backend, threads, batch size and dtype are checked by the profiler's `DeviceSpec`, the
    one place that knows which backends and dtypes exist.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    hardware: str = Field(min_length=1, max_length=256, description="e.g. the CPU model")
    backend: str = Field(default="torch-cpu", max_length=64)
    threads: int = 1
    batch_size: int = 1
    dtype: str = Field(default="float32", max_length=16)
    environment: dict[str, Any] = Field(default_factory=dict)
    is_local: bool = False

    @model_validator(mode="after")
    def _valid_device_spec(self) -> DeviceCreate:
        # Imported here: the profiler package pulls in torch, which the rest of the CLI does not need.
        from profiler.device import DeviceSpec

        # InvalidDeviceSpec is a ValueError, so pydantic reports it as a validation error.
        DeviceSpec(
            hardware=self.hardware,
            backend=self.backend,
            threads=self.threads,
            batch_size=self.batch_size,
            dtype=self.dtype,
        )
        return self


class DeviceRead(BaseModel):
    """A registered device."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    hardware: str
    backend: str
    threads: int
    batch_size: int
    dtype: str
    environment: dict[str, Any]
    is_local: bool
    status: dict[str, Any] | None
    created_at: datetime


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
