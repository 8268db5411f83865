"""The kinds of background job the service runs, and how long each may take.

Every other module names a job kind through `JobKind`; `service.job_handlers` wires each kind to the
code that runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from service.config import WorkerSettings


class JobKind(StrEnum):
    """What a job does; stored as its value in ``job.kind``."""

    FIT = "fit"  # fit a latency predictor on a device's measurements
    PLAN = "plan"  # plan a pruned network within a latency budget
    BOOTSTRAP = "bootstrap"  # profile the server's own machine and fit it a predictor (first run)
    REFINE = "refine"  # one round of profiling it where its predictor is unsure, and refitting


def job_timeout_seconds(kind: str, job_input: Mapping[str, Any], settings: WorkerSettings) -> float:
    """How long a job of `kind` may take from being queued to its end.

    A first-run bootstrap, and a round of its refining, gets its profiling budget (``budget_minutes``
    of its input) on top of ``first_run_timeout_seconds``; kinds without a timeout of their own get the
    fit's.
    """
    if kind == JobKind.PLAN:
        return settings.plan_timeout_seconds
    if kind in (JobKind.BOOTSTRAP, JobKind.REFINE):
        budget_minutes = job_input.get("budget_minutes")
        profiling = float(budget_minutes) * 60 if isinstance(budget_minutes, int | float) else 0.0
        return profiling + settings.first_run_timeout_seconds
    return settings.fit_timeout_seconds
