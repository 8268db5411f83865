"""Workers: claim a job, keep its lease alive while its task runs, store the outcome.

`lpnet serve` runs `WorkerPool` threads inside the server (the embedded default, fine with SQLite);
for more machines, `lpnet worker` processes claim from a shared PostgreSQL database.

A job past its deadline is stopped cooperatively: `JobContext.check` (called by every progress report)
raises `JobTimedOut` and the job fails without a retry. A task that never checks keeps its thread, but
its lease keeper stops renewing the lease a lease length after the deadline, so the job is failed by
the next sweep and whatever the task returns late is discarded. A crash (an error that is not a domain
error) is stored as a generic message with an error id; the log line with the traceback has that id.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Collection

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lpnet.errors import LpnetError
from service.db.models import JobStatus
from service.errors import ServiceError
from service.jobs.context import JobContext, JobTimedOut, LeaseLost
from service.jobs.queue import (
    ClaimedJob,
    Deferred,
    claim_job,
    complete_job,
    defer_job,
    fail_job,
    renew_lease,
    sweep_expired,
)
from service.jobs.registry import TaskRegistry

logger = logging.getLogger(__name__)


def crash_message(error_id: str) -> str:
    """What a job that crashed shows its users; the server log has the traceback under `error_id`."""
    return f"internal error (id {error_id}); the server log has the details"


def worker_id() -> str:
    """A name unique to this worker: host, process and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _LeaseKeeper(threading.Thread):
    """Renews a job's lease every third of its length until stopped, until the lease is lost, or until
    the job ignored its deadline for a lease length (then the lease lapses and a sweep fails the job)."""

    def __init__(self, context: JobContext, lease_seconds: float) -> None:
        super().__init__(name=f"lease-{context.job.id}", daemon=True)
        self.context = context
        self.lease_seconds = lease_seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        job = self.context.job
        while not self.stopped.wait(self.lease_seconds / 3):
            overdue = self.context.seconds_past_deadline()
            if overdue > self.lease_seconds:
                logger.error(
                    "job %d (%s) is %.1f s past its deadline and still running; its lease is left to lapse",
                    job.id,
                    job.kind,
                    overdue,
                )
                return
            try:
                held = renew_lease(self.context.factory, job.id, job.owner, self.lease_seconds)
            except SQLAlchemyError as exc:
                # The database may be back before the lease runs out; keep trying.
                logger.warning("job %d: lease renewal failed: %s", job.id, exc)
                continue
            if not held:
                logger.warning("job %d: lease lost to another worker; stopping it", job.id)
                self.context.mark_lease_lost()
                return


class Worker:
    """Claims and runs jobs one at a time.

    Args:
        factory: Session factory of the job database.
        registry: Task handlers by job kind (`service.job_handlers` builds the service's).
        owner: This worker's name in leases; defaults to host:pid:random.
        lease_seconds: Lease length; renewed every third of it while a job runs.
        poll_seconds: Sleep between polls when there is nothing to do.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        registry: TaskRegistry,
        *,
        owner: str | None = None,
        lease_seconds: float = 60.0,
        poll_seconds: float = 1.0,
    ) -> None:
        self.factory = factory
        self.registry = registry
        self.owner = owner or worker_id()
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds

    @property
    def kinds(self) -> Collection[str]:
        return self.registry.kinds()

    def run_once(self) -> ClaimedJob | None:
        """Fail the jobs past their deadline, then claim and run one job; return it, or None when
        nothing was claimable."""
        for expired, message in sweep_expired(self.factory):
            self.registry.report_failure(self.factory, expired, message)
        job = claim_job(self.factory, self.owner, self.lease_seconds, self.kinds)
        if job is None:
            return None
        self.execute(job)
        return job

    def execute(self, job: ClaimedJob) -> None:
        """Run a claimed job's task and store its outcome (or its failure)."""
        context = JobContext(job, self.factory)
        keeper = _LeaseKeeper(context, self.lease_seconds)
        keeper.start()
        started = time.perf_counter()
        try:
            handler = self.registry.get(job.kind)
            outcome = handler(job, context)
            context.check()
        except LeaseLost:
            logger.warning("job %d abandoned: its lease was lost", job.id)
            return
        except JobTimedOut as exc:
            logger.warning("job %d (%s) stopped: %s", job.id, job.kind, exc)
            self._failed(job, str(exc), retry=False)
            return
        except Deferred as deferral:
            keeper.stopped.set()  # the job gives its lease up: a renewal now would report it lost
            if defer_job(self.factory, job, deferral):
                logger.info(
                    "job %d (%s) deferred for %.1f s: %s",
                    job.id,
                    job.kind,
                    deferral.retry_after_seconds,
                    deferral.message,
                )
            else:
                logger.warning("job %d: its lease was lost before it could be deferred", job.id)
            return
        except (LpnetError, ServiceError) as exc:
            # Domain errors say what is wrong with the request or the data: retrying changes nothing.
            logger.info("job %d (%s) failed: %s", job.id, job.kind, exc.message)
            self._failed(job, exc.message, retry=False)
            return
        except Exception:
            # The exception's text may hold paths, SQL or data: it goes to the log, an id to the job.
            error_id = secrets.token_hex(4)
            logger.exception(
                "job %d (%s) attempt %d crashed (error id %s)", job.id, job.kind, job.attempt, error_id
            )
            self._failed(job, crash_message(error_id), retry=True)
            return
        finally:
            keeper.stopped.set()
        if complete_job(self.factory, job, outcome):
            logger.info("job %d (%s) succeeded in %.1f s", job.id, job.kind, time.perf_counter() - started)

    def _failed(self, job: ClaimedJob, message: str, *, retry: bool) -> None:
        status = fail_job(self.factory, job, message, retry=retry)
        if status is JobStatus.FAILED:
            self.registry.report_failure(self.factory, job, message)

    def run_forever(self, stop: threading.Event) -> None:
        """Claim and run jobs until `stop` is set; database outages are waited out."""
        logger.info("worker %s started (kinds: %s)", self.owner, ", ".join(sorted(self.kinds)))
        while not stop.is_set():
            try:
                job = self.run_once()
            except SQLAlchemyError as exc:
                logger.warning("worker %s: database error, retrying: %s", self.owner, exc)
                job = None
            if job is None:
                stop.wait(self.poll_seconds)
        logger.info("worker %s stopped", self.owner)


class WorkerPool:
    """Worker threads inside a process (the server's embedded workers)."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        registry: TaskRegistry,
        threads: int = 1,
        lease_seconds: float = 60.0,
        poll_seconds: float = 1.0,
    ) -> None:
        self.stop_event = threading.Event()
        self.workers = [
            Worker(factory, registry, lease_seconds=lease_seconds, poll_seconds=poll_seconds)
            for _ in range(threads)
        ]
        self.threads = [
            threading.Thread(
                target=worker.run_forever, args=(self.stop_event,), name=f"worker-{i}", daemon=True
            )
            for i, worker in enumerate(self.workers)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the workers to stop and wait up to `timeout` for the current jobs.

        A job still running then is left to its lease: another worker takes it over once it lapses.
        """
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
