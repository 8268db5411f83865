"""The progress of a first-run job (the bootstrap, or a round of refining) as one percentage and ETA."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.jobs.context import JobContext
from service.profiling import ProgressReporter

if TYPE_CHECKING:
    from profiler.batch import Measurement

logger = logging.getLogger(__name__)

# How often the terminal of `lpnet serve` gets a progress line.
LOG_INTERVAL_S = 10.0


def format_duration(seconds: float) -> str:
    """``4 min 10 s`` or ``35 s``."""
    seconds = max(0, round(seconds))
    minutes, rest = divmod(seconds, 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


class FirstRunProgress(ProgressReporter):
    """Progress of a first-run job, profiling then fitting, as one percentage and ETA.

    The percentage and ETA span the work before the job and after it as well: the bootstrap's earlier
    runs, or a refining round's earlier and later rounds. Written to the job and the device's status
    (rate-limited by the job context), and logged every `LOG_INTERVAL_S`.

    Args:
        context: The running job.
        device_name: For the log lines.
        spent_s: Time of the work done before this run.
        profile_s: Profiling time of this run (0: none).
        fit_s: Estimated fitting time.
        later_s: Estimated time of the work after this job.
        stage: What the job is, heading its messages and log lines.
        device_phase: The device's phase throughout; by default the job's (profiling, then fitting).
        check: Called with every measurement before it is reported, e.g. to give way to other jobs.
    """

    def __init__(
        self,
        context: JobContext,
        device_name: str,
        spent_s: float,
        profile_s: float,
        fit_s: float,
        *,
        later_s: float = 0.0,
        stage: str = "first run",
        device_phase: str | None = None,
        check: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            context.factory, context.job.device_id or 0, profile_s / 60 if profile_s else None, None
        )
        self.context = context
        self.device_name = device_name
        self.spent_s = spent_s
        self.profile_s = profile_s
        self.fit_s = fit_s
        self.later_s = later_s
        self.stage = stage
        self.device_phase = device_phase
        self.check = check
        self._profiled_s = 0.0
        self._fit_started = 0.0
        self._last_log = 0.0
        self._profiling_started = False
        self._percent = 0.0

    @property
    def percent(self) -> float:
        """The percentage reported last."""
        return self._percent

    def extend(self, seconds: float) -> None:
        """Profile for `seconds` more than planned."""
        self.profile_s += seconds
        self.budget_s = self.profile_s

    def seconds_per_measurement(self) -> float:
        """Average time per measurement so far (a network at 224x224 is a few seconds)."""
        if not self.count:
            return 5.0
        return (time.monotonic() - self.started) / self.count

    def start(self) -> None:
        """Say that profiling has begun (once: a top-up run continues the same clock)."""
        if self._profiling_started:
            return
        self._profiling_started = True
        self.started = time.monotonic()
        self._report(
            "profiling",
            self._share(0.0),
            self.profile_s + self.fit_s + self.later_s,
            "profiling started",
            force=True,
        )

    def __call__(self, _measurement: Measurement) -> None:
        if self.check is not None:
            self.check()
        self.count += 1
        elapsed = time.monotonic() - self.started
        # The budget ends profiling: the inherited estimate is the share of it spent, and what is left.
        share, eta = self.progress(elapsed)
        done = self.profile_s * min(1.0, (share or 0.0) / 100)
        left = eta if eta is not None else max(0.0, self.profile_s - elapsed)
        self._report(
            "profiling",
            self._share(done),
            left + self.fit_s + self.later_s,
            f"profiling, {self.count} measurement(s) this run",
        )

    def fitting_started(self, networks: int) -> None:
        """Switch to the fitting phase."""
        self._profiled_s = time.monotonic() - self.started if self.profile_s else 0.0
        self._fit_started = time.monotonic()
        self._report(
            "fitting",
            self._fit_percent(0.0, self.fit_s),
            self.fit_s + self.later_s,
            f"fitting the predictor on {networks} measured networks",
            force=True,
        )

    def fitting(self, step: int, total: int) -> None:
        """A fit step is done (the fit's progress callback)."""
        share = step / total if total else 0.0
        elapsed = time.monotonic() - self._fit_started
        fit_total = elapsed / share if share > 0.02 else max(self.fit_s, elapsed)
        self._report(
            "fitting",
            self._fit_percent(share, fit_total),
            fit_total * (1 - share) + self.later_s,
            f"fitting the predictor, step {step} of {total}",
        )

    def finish(self) -> None:
        """Nothing to clear: storing the predictor sets the device's status."""

    def _share(self, profiled_s: float) -> float:
        total = self.spent_s + self.profile_s + self.fit_s + self.later_s
        return 100.0 * (self.spent_s + profiled_s) / total

    def _fit_percent(self, share: float, fit_total: float) -> float:
        before = self.spent_s + self._profiled_s
        return 100.0 * (before + share * fit_total) / max(before + fit_total + self.later_s, 1e-6)

    def _report(self, phase: str, percent: float, eta: float, what: str, *, force: bool = False) -> None:
        # Estimates change as the run learns its real speed; the percentage still never goes back.
        percent = self._percent = max(self._percent, min(99.9, percent))
        message = f"{self.stage}: {what}"
        device_phase = self.device_phase or phase
        self.context.progress(phase, percent, eta, message, device_phase=device_phase, force=force)
        now = time.monotonic()
        if force or now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            logger.info(
                "%s: %s %r, %.0f %% done, about %s left (%s)",
                self.stage,
                phase,
                self.device_name,
                min(100.0, percent),
                format_duration(eta),
                what,
            )
