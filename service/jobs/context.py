"""What a running task may do besides computing: report progress, notice a lost lease or deadline."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.db.base import utcnow
from service.devices import set_device_status
from service.errors import Conflict
from service.jobs.queue import ClaimedJob, record_progress, timeout_message

logger = logging.getLogger(__name__)

# Progress is written at most this often; a task may report on every step.
PROGRESS_INTERVAL_S = 1.0


class LeaseLost(Conflict):
    """The lease of a job or agent task is no longer held by whoever acts on it: stop, the work is
    someone else's now (or went back to the queue)."""

    code = "lease_lost"


class JobTimedOut(Exception):
    """The job ran past its deadline: stop; it fails without a retry."""


class JobContext:
    """What a running task may do besides computing: report progress, notice a lost lease."""

    def __init__(self, job: ClaimedJob, factory: sessionmaker[Session]) -> None:
        self.job = job
        self.factory = factory
        self._lost = threading.Event()
        self._last_progress = 0.0

    @property
    def lease_lost(self) -> bool:
        """Whether the lease was lost (the result would be discarded)."""
        return self._lost.is_set()

    def mark_lease_lost(self) -> None:
        self._lost.set()

    def seconds_past_deadline(self) -> float:
        """How long ago the job's deadline passed (negative before it, -inf without a deadline)."""
        if self.job.deadline_at is None:
            return float("-inf")
        return (utcnow() - self.job.deadline_at).total_seconds()

    def check(self) -> None:
        """Stop the task if it should not go on; call between steps of long work.

        Raises:
            LeaseLost: The job is no longer this worker's.
            JobTimedOut: The job is past its deadline.
        """
        if self._lost.is_set():
            raise LeaseLost(f"job {self.job.id} was reclaimed by another worker", {"job_id": self.job.id})
        if self.seconds_past_deadline() >= 0:
            raise JobTimedOut(timeout_message(self.job.timeout_seconds))

    def progress(
        self,
        phase: str,
        percent: float | None = None,
        eta_seconds: float | None = None,
        message: str | None = None,
        *,
        device_phase: str | None = None,
        force: bool = False,
    ) -> None:
        """Record progress on the job (and as the device's status when `device_phase` is given).

        Writes are rate-limited unless `force`; failures to write are logged, not raised.
        """
        self.check()
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        progress: dict[str, object] = {"phase": phase}
        if percent is not None:
            progress["percent"] = round(min(100.0, max(0.0, percent)), 1)
        if eta_seconds is not None:
            progress["eta_seconds"] = round(max(0.0, eta_seconds), 1)
        if message:
            progress["message"] = message
        try:
            if not record_progress(self.factory, self.job.id, self.job.owner, progress):
                self.mark_lease_lost()
        except SQLAlchemyError as exc:
            logger.warning("job %d: could not record progress: %s", self.job.id, exc)
        if device_phase is not None and self.job.device_id is not None:
            set_device_status(
                self.factory,
                self.job.device_id,
                device_phase,
                percent=percent,
                eta_seconds=eta_seconds,
                message=message,
                job_id=self.job.id,
            )
