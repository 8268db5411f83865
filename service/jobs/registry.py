"""Which code runs a job: a registry from job kind to task, which a worker is given.

The kinds themselves are `service.jobs.kinds.JobKind`; the service's registries, with the handlers of
each kind, are built in `service.job_handlers`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from service.jobs.context import JobContext
from service.jobs.queue import ClaimedJob, TaskOutcome

logger = logging.getLogger(__name__)

TaskHandler = Callable[[ClaimedJob, JobContext], TaskOutcome]
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
            raise ValueError(f"a task for job kind {str(task.kind)!r} is registered already")
        self._tasks[str(task.kind)] = task

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
