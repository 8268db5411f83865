"""Background jobs as clients see them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.db.models import JobStatus


class JobRead(BaseModel):
    """A job: what it is, where it stands, and its result or error once finished."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    status: JobStatus
    device_id: int | None
    progress: dict[str, Any] | None = Field(
        description="phase, percent, eta_seconds while running; phase waiting_for_agent while a plan waits "
        "for a remote device's agent (no worker is busy with it meanwhile)."
    )
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    deadline_at: datetime | None = Field(
        description="The job fails as timed out if it has not finished by then."
    )
    finished_at: datetime | None


class JobAccepted(BaseModel):
    """A job was queued; poll `status_url`."""

    job_id: int
    kind: str
    status: JobStatus
    status_url: str
