"""Background jobs (fits, plans): status, progress, result."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from service.api.deps import ReaderKey, SessionDep
from service.api.errors import error_responses
from service.api.pagination import PageQuery
from service.db.models import JobStatus
from service.jobs.queue import get_job, list_jobs
from service.schemas.common import MAX_ID, NAME_PATTERN, Page
from service.schemas.jobs import JobRead

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401, 403, 422))


@router.get("", summary="List jobs", responses=error_responses(422))
def get_jobs(
    session: SessionDep,
    _key: ReaderKey,
    page: PageQuery,
    status: JobStatus | None = None,
    kind: Annotated[str | None, Query(max_length=32, pattern=NAME_PATTERN)] = None,
    device_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> Page[JobRead]:
    """The newest jobs first, filtered by status, kind and device, a page at a time."""
    jobs = list_jobs(session, page, status=status, kind=kind, device_id=device_id)
    return Page[JobRead](
        items=[JobRead.model_validate(job) for job in jobs.rows], next_cursor=jobs.next_cursor
    )


@router.get("/{job_id}", summary="Show a job", responses=error_responses(404, 422))
def get_job_route(
    job_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, _key: ReaderKey
) -> JobRead:
    """A job's status and progress; once finished its result or error."""
    return JobRead.model_validate(get_job(session, job_id))
