"""What each kind of job does: a registry from job kind to task.

The default registry is the one place job kinds are wired to the service functions that run them
(fit -> `service.predictors`, plan -> `service.plans`). A later kind (e.g. profile) adds one `Task`
here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from service.jobs.queue import ClaimedJob, TaskOutcome

if TYPE_CHECKING:
    from service.config import WorkerSettings
    from service.jobs.worker import JobContext

logger = logging.getLogger(__name__)

FIT = "fit"
PLAN = "plan"
BOOTSTRAP = "bootstrap"

TaskHandler = Callable[[ClaimedJob, "JobContext"], TaskOutcome]
"""Runs a job; raises an lpnet or service error for a permanent failure, anything else to retry."""
FailureHook = Callable[[sessionmaker[Session], ClaimedJob, str], None]
"""Called once a job has failed for good, e.g. to show the failure in its device's status."""


@dataclass(frozen=True)
class Task:
    """A job kind and the code that runs it."""

    kind: str
    run: TaskHandler
    on_failure: FailureHook | None = None


class UnknownJobKind(Exception):
    """A job whose kind no task is registered for."""


class TaskRegistry:
    """Tasks by job kind."""

    def __init__(self, tasks: Collection[Task] = ()) -> None:
        self._tasks: dict[str, Task] = {}
        for task in tasks:
            self.register(task)

    def register(self, task: Task) -> None:
        if task.kind in self._tasks:
            raise ValueError(f"a task for job kind {task.kind!r} is registered already")
        self._tasks[task.kind] = task

    def kinds(self) -> list[str]:
        return sorted(self._tasks)

    def get(self, kind: str) -> TaskHandler:
        try:
            return self._tasks[kind].run
        except KeyError:
            raise UnknownJobKind(f"no task is registered for job kind {kind!r}") from None

    def report_failure(self, factory: sessionmaker[Session], job: ClaimedJob, error: str) -> None:
        task = self._tasks.get(job.kind)
        if task is None or task.on_failure is None:
            return
        try:
            task.on_failure(factory, job, error)
        except Exception:
            logger.exception("job %d: the failure hook of %s raised", job.id, job.kind)


def job_timeout_seconds(kind: str, job_input: Mapping[str, Any], settings: WorkerSettings) -> float:
    """How long a job of `kind` may take from being queued to its end.

    A first-run bootstrap gets its profiling budget (``budget_minutes`` of its input) on top of
    ``first_run_timeout_seconds``; kinds without a timeout of their own get the fit's.
    """
    if kind == PLAN:
        return settings.plan_timeout_seconds
    if kind == BOOTSTRAP:
        budget_minutes = job_input.get("budget_minutes")
        profiling = float(budget_minutes) * 60 if isinstance(budget_minutes, int | float) else 0.0
        return profiling + settings.first_run_timeout_seconds
    return settings.fit_timeout_seconds


def default_registry() -> TaskRegistry:
    """Every job kind the service runs."""
    # Imported here: the handlers pull in torch and the planner, which the queue itself does not need.
    from service.plans import plan_failed, run_plan_job
    from service.predictors import fit_failed, run_fit_job

    return TaskRegistry(
        [
            Task(FIT, run_fit_job, on_failure=fit_failed),
            Task(PLAN, run_plan_job, on_failure=plan_failed),
        ]
    )


def serving_registry() -> TaskRegistry:
    """The default tasks plus those that must run on the server's own machine (its embedded workers).

    The first-run bootstrap profiles the machine it runs on, so an `lpnet worker` elsewhere never
    claims it.
    """
    from service.first_run.bootstrap import bootstrap_failed, run_bootstrap_job

    registry = default_registry()
    registry.register(Task(BOOTSTRAP, run_bootstrap_job, on_failure=bootstrap_failed))
    return registry
