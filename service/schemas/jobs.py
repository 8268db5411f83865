"""Background jobs as clients see them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from service.db.models import JobStatus
from service.schemas.documents import StoredDocument, document_of_kind
from service.schemas.fits import BootstrapJobResult, FitJobResult, RefineJobResult
from service.schemas.plan_results import PlanResultRead


class JobProgress(StoredDocument):
    """Where a running job stands (`service.jobs.context.JobContext.progress`)."""

    phase: str = Field(
        description="What the job does now, e.g. loading, planning, fitting, profiling; waiting_for_agent "
        "while a plan waits for a remote device's agent (no worker is busy with it meanwhile)."
    )
    percent: float | None = Field(default=None, description="Progress of the phase, 0 to 100.")
    eta_seconds: float | None = Field(default=None, description="Estimated seconds left.")
    message: str | None = None


JobResult = FitJobResult | PlanResultRead | BootstrapJobResult | RefineJobResult
# The result model of each job kind (`service.jobs.kinds.JobKind`); another kind's result is matched
# against each of them.
JOB_RESULTS: Mapping[str, type[StoredDocument]] = {
    "fit": FitJobResult,
    "plan": PlanResultRead,
    "bootstrap": BootstrapJobResult,
    "refine": RefineJobResult,
}


class JobRead(BaseModel):
    """A job: what it is, where it stands, and its result or error once finished."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str = Field(description="fit, plan, bootstrap or refine; the result's model follows from it.")
    status: JobStatus
    device_id: int | None
    progress: JobProgress | None = Field(description="While running: the phase, and percent and ETA.")
    result: JobResult | None = Field(
        description="Once succeeded: FitJobResult for a fit, PlanResultRead for a plan, BootstrapJobResult "
        "and RefineJobResult for the first run's jobs."
    )
    error: str | None
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    deadline_at: datetime | None = Field(
        description="The job fails as timed out if it has not finished by then."
    )
    finished_at: datetime | None

    @field_validator("result", mode="before")
    @classmethod
    def _result_of_its_kind(cls, value: Any, info: ValidationInfo) -> Any:
        return document_of_kind(JOB_RESULTS, value, info)


class JobAccepted(BaseModel):
    """A job was queued; poll `status_url`."""

    job_id: int
    kind: str
    status: JobStatus
    status_url: str
