"""The progress of a first-run bootstrap: profiling then fitting, as one percentage and ETA."""

from __future__ import annotations

import logging
import time
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


class BootstrapProgress(ProgressReporter):
    """Progress over the whole bootstrap, profiling then fitting, as one percentage and ETA.

    Written to the job and the device's status (rate-limited by the job context), and logged every
    `LOG_INTERVAL_S`.

    Args:
        context: The running job.
        device_name: For the log lines.
        spent_s: Profiling time spent by earlier runs of the device.
        profile_s: Profiling time of this run (0: none).
        fit_s: Estimated fitting time.
    """

    def __init__(
        self, context: JobContext, device_name: str, spent_s: float, profile_s: float, fit_s: float
    ) -> None:
        super().__init__(
            context.factory, context.job.device_id or 0, profile_s / 60 if profile_s else None, None
        )
        self.context = context
        self.device_name = device_name
        self.spent_s = spent_s
        self.profile_s = profile_s
        self.fit_s = fit_s
        self._profiled_s = 0.0
        self._fit_started = 0.0
        self._last_log = 0.0
        self._profiling_started = False
        self._percent = 0.0

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
            self.profile_s + self.fit_s,
            "first run: profiling started",
            force=True,
        )

    def __call__(self, _measurement: Measurement) -> None:
        self.count += 1
        elapsed = time.monotonic() - self.started
        # The budget ends profiling: the inherited estimate is the share of it spent, and what is left.
        share, eta = self.progress(elapsed)
        done = self.profile_s * min(1.0, (share or 0.0) / 100)
        left = eta if eta is not None else max(0.0, self.profile_s - elapsed)
        self._report(
            "profiling",
            self._share(done),
            left + self.fit_s,
            f"first run: profiling, {self.count} measurement(s) this run",
        )

    def fitting_started(self, networks: int) -> None:
        """Switch to the fitting phase."""
        self._profiled_s = time.monotonic() - self.started if self.profile_s else 0.0
        self._fit_started = time.monotonic()
        self._report(
            "fitting",
            self._fit_percent(0.0, self.fit_s),
            self.fit_s,
            f"first run: fitting the predictor on {networks} measured networks",
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
            fit_total * (1 - share),
            f"first run: fitting the predictor, step {step} of {total}",
        )

    def finish(self) -> None:
        """Nothing to clear: storing the predictor makes the device ready."""

    def _share(self, profiled_s: float) -> float:
        total = self.spent_s + self.profile_s + self.fit_s
        return 100.0 * (self.spent_s + profiled_s) / total

    def _fit_percent(self, share: float, fit_total: float) -> float:
        before = self.spent_s + self._profiled_s
        return 100.0 * (before + share * fit_total) / max(before + fit_total, 1e-6)

    def _report(self, phase: str, percent: float, eta: float, message: str, *, force: bool = False) -> None:
        # Estimates change as the run learns its real speed; the percentage still never goes back.
        percent = self._percent = max(self._percent, min(99.9, percent))
        self.context.progress(phase, percent, eta, message, device_phase=phase, force=force)
        now = time.monotonic()
        if force or now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            logger.info(
                "first run: %s %r, %.0f %% done, about %s left (%s)",
                phase,
                self.device_name,
                min(100.0, percent),
                format_duration(eta),
                message.removeprefix("first run: "),
            )
