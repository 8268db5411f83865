"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import EngineDep
from service.api.errors import error_responses
from service.db.session import check_database
from service.schemas.common import HealthStatus, ReadyStatus

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> HealthStatus:
    """Always 200 while the process runs; it does not touch the database."""
    return HealthStatus()


@router.get(
    "/readyz",
    summary="Readiness: the database answers",
    responses=error_responses(503),
)
def readyz(engine: EngineDep) -> ReadyStatus:
    """200 when ``SELECT 1`` succeeds on the database, else 503 ``database_unavailable``."""
    check_database(engine)
    return ReadyStatus(database=engine.dialect.name)
