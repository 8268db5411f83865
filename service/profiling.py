"""Profiling into the database: a measurement sink that commits every row as soon as it is written.

`DatabaseSink` implements the profiler's `MeasurementSink` protocol. Each `write` is its own
transaction, so a crash (or Ctrl-C) loses at most the measurement in flight, and a rerun skips every
sample key already stored (`done_keys`). Like a posted batch, a run under another allocator policy
than the device's is refused.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from profiler.batch import Measurement, RunContext
from service.db.base import utcnow
from service.db.models import Device, ProfileRun, RunSource, RunStatus
from service.devices import set_device_status
from service.profiles import check_allocator, existing_sample_keys, measurement_rows

logger = logging.getLogger(__name__)

# Progress is written to the device row at most this often, not after every measurement.
STATUS_INTERVAL_S = 2.0


class DatabaseSink:
    """Stores measurements of one device in one profile run, committing each as it arrives.

    Args:
        factory: Session factory of the database to write to.
        device: The device measured (only its id is kept).
        context: Device spec, environment and protocol of the run, stored with the run row.
        source: local (this machine) or agent.

    Raises:
        AllocatorMismatch: The context's environment ran under another allocator policy than the
            device's (nothing is stored).
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        device: Device,
        context: RunContext,
        source: RunSource = RunSource.LOCAL,
    ) -> None:
        check_allocator(device, context.environment)
        self._factory = factory
        self.device_id = device.id
        with factory() as session:
            run = ProfileRun(
                device_id=self.device_id,
                source=source,
                status=RunStatus.RUNNING,
                protocol=context.protocol.model_dump(mode="json"),
                environment=context.environment.model_dump(mode="json"),
            )
            session.add(run)
            session.commit()
            self.run_id = run.id
        self._done: set[str] | None = None
        self.written = 0
        self.duplicates = 0
        self.closed = False

    def done_keys(self) -> set[str]:
        """Sample keys the device already has in the database, failed ones included."""
        if self._done is None:
            with self._factory() as session:
                self._done = existing_sample_keys(session, self.device_id)
        return set(self._done)

    def write(self, measurement: Measurement) -> None:
        """Store one measurement in its own transaction."""
        if self.closed:
            raise RuntimeError(f"the database sink of run {self.run_id} is closed")
        with self._factory() as session:
            session.add_all(measurement_rows(measurement, self.device_id, self.run_id))
            try:
                session.commit()
            except IntegrityError:
                # Stored meanwhile by another process (a second `lpnet profile`, an agent batch).
                session.rollback()
                self.duplicates += 1
                logger.info("%s is already stored for this device; skipped", measurement.sample_key)
                return
        self.written += 1
        if self._done is not None:
            self._done.add(measurement.sample_key)

    def close(self, status: RunStatus = RunStatus.COMPLETED, summary: dict[str, Any] | None = None) -> None:
        """Mark the run finished with `status` and `summary`."""
        if self.closed:
            return
        with self._factory() as session:
            run = session.get(ProfileRun, self.run_id)
            if run is not None:
                run.status = status
                run.finished_at = utcnow()
                run.summary = {"written": self.written, "duplicates": self.duplicates, **(summary or {})}
                session.commit()
        self.closed = True


class ProgressReporter:
    """Turns measurements into the device's profiling status (percent and ETA), written now and then.

    Args:
        factory: Session factory to write the device status with.
        device_id: The device being profiled.
        budget_minutes: The run's time budget, if any; it bounds the ETA.
        planned: How many samples the run plans to measure, if known.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        device_id: int,
        budget_minutes: float | None,
        planned: int | None,
    ) -> None:
        self._factory = factory
        self.device_id = device_id
        self.budget_s = None if budget_minutes is None else budget_minutes * 60.0
        self.planned = planned
        self.count = 0
        self.started = time.monotonic()
        self._last_write = 0.0

    def start(self) -> None:
        """Say that profiling has begun."""
        set_device_status(
            self._factory, self.device_id, "profiling", percent=0.0, message="profiling started"
        )

    def __call__(self, _measurement: Measurement) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last_write < STATUS_INTERVAL_S:
            return
        self._last_write = now
        percent, eta = self.progress(now - self.started)
        set_device_status(
            self._factory,
            self.device_id,
            "profiling",
            percent=percent,
            eta_seconds=eta,
            message=f"{self.count} measurement(s) this run",
        )

    def progress(self, elapsed: float) -> tuple[float | None, float | None]:
        """Percent done and seconds left, from the budget or the planned sample count."""
        estimates: list[tuple[float, float]] = []
        if self.budget_s:
            estimates.append((100.0 * elapsed / self.budget_s, max(0.0, self.budget_s - elapsed)))
        if self.planned and self.count:
            share = min(1.0, self.count / self.planned)
            estimates.append((100.0 * share, elapsed / self.count * max(0, self.planned - self.count)))
        if not estimates:
            return None, None
        # Whichever ends the run first (the budget or the sample count) is the estimate to show.
        return max(estimates, key=lambda pair: pair[0])

    def finish(self) -> None:
        """Clear the profiling status: the device's counts say what it has now."""
        set_device_status(self._factory, self.device_id, None)
