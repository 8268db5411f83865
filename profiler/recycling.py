"""Measuring in child processes that are replaced every minute or so.

A process that has built and timed networks for minutes runs the same network measurably slower
than a fresh one: on a 2-core EPYC, mobilenet_v2 took 15-16 ms in fresh processes and 18-19 ms in a
process that had profiled for 4.5 minutes (docs/benchmarks.md). A latency label, a verification and
a deployment that has just started are all fresh processes, so a long profile is biased against all
of them. `RecycledMeasurer` runs each sample in a child process and starts a new child once the
current one has lived `seconds_per_process`, so every sample is measured in a young process.

The child is started with ``spawn`` (no state inherited from the parent but its environment), puts
itself under the device's allocator policy, builds the device's backend and its own speed probe, and
ignores Ctrl-C, which the parent handles. It dies with its parent, even a parent killed with
SIGKILL: the kernel signals it (Linux's parent-death signal), or elsewhere a watchdog thread sees
the parent gone within a second. A child that dies mid-sample turns that sample into a `failed`
measurement and the next sample gets a new child.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Protocol

from profiler.backends.base import Backend
from profiler.batch import Measurement
from profiler.device import DeviceSpec
from profiler.environment import DEFAULT_SECONDS_PER_PROCESS, AllocatorPolicy, apply_allocator_policy
from profiler.measure import failed_measurement, measure_sample
from profiler.protocol import ProbeFn, TimingProtocol
from profiler.sampling import Sample

logger = logging.getLogger(__name__)


class Measurer(Protocol):
    """Measures one sample under a protocol; `close` releases whatever it holds."""

    def __call__(self, sample: Sample, protocol: TimingProtocol) -> Measurement: ...

    def close(self) -> None: ...


@dataclass
class InProcessMeasurer:
    """Measures in the calling process with a ready backend."""

    backend: Backend
    batch_size: int = 1
    probe: ProbeFn | None = None

    def __call__(self, sample: Sample, protocol: TimingProtocol) -> Measurement:
        return measure_sample(sample, self.backend, protocol, self.batch_size, probe=self.probe)

    def close(self) -> None:
        """Nothing to release: the backend belongs to the caller."""


@dataclass(frozen=True)
class ChildSetup:
    """What a measuring child needs to rebuild the parent's measuring state."""

    device: DeviceSpec
    allocator: AllocatorPolicy
    speed_probe: bool
    parent_pid: int = field(default_factory=os.getpid)


# prctl option (linux/prctl.h): the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1

# The measuring state of a child process, set once by `_start_child`.
_child_backend: Backend | None = None
_child_probe: ProbeFn | None = None


def _start_child(setup: ChildSetup) -> None:
    """Initialise a measuring child: ignore Ctrl-C, apply the allocator policy, build backend and probe."""
    global _child_backend, _child_probe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(setup.parent_pid)
    apply_allocator_policy(setup.allocator)
    _child_backend = setup.device.create_backend()
    if setup.speed_probe and _child_backend.runs_on_cpu:
        from profiler.speed import SpeedProbe

        _child_probe = SpeedProbe().run


def _die_with_parent(parent_pid: int) -> None:
    """End this process when `parent_pid` ends, however it ends."""
    libc_name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if (
        libc_name is not None
        and ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    ):
        # The parent may have died before the signal was asked for.
        if os.getppid() != parent_pid:
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _measure_in_child(sample: Sample, protocol: TimingProtocol, batch_size: int) -> Measurement:
    assert _child_backend is not None, "the child was not initialised"
    return measure_sample(sample, _child_backend, protocol, batch_size, probe=_child_probe)


class RecycledMeasurer:
    """Measures each sample in a child process no older than `seconds_per_process` when it starts."""

    def __init__(self, setup: ChildSetup, seconds_per_process: float = DEFAULT_SECONDS_PER_PROCESS) -> None:
        if seconds_per_process <= 0:
            raise ValueError(f"seconds_per_process must be positive, got {seconds_per_process}")
        self.setup = setup
        self.seconds_per_process = seconds_per_process
        self.children_started = 0
        self._pool: ProcessPoolExecutor | None = None
        self._started = 0.0

    def __call__(self, sample: Sample, protocol: TimingProtocol) -> Measurement:
        start = time.perf_counter()
        if self._pool is None or time.monotonic() - self._started >= self.seconds_per_process:
            self._replace_child()
        assert self._pool is not None
        try:
            future = self._pool.submit(_measure_in_child, sample, protocol, self.setup.device.batch_size)
            return future.result()
        except BrokenProcessPool as exc:
            # The child died (a crash or the kernel's OOM killer): the sample fails, the next gets a new child.
            self._discard_child(kill=True)
            logger.warning("the measuring process died on sample %s: %s", sample.sample_key, exc)
            return failed_measurement(
                sample, f"the measuring process died: {exc}", time.perf_counter() - start
            )
        except BaseException:
            # Ctrl-C or a lost lease in the parent: the child must not outlive the sample it was given.
            self._discard_child(kill=True)
            raise

    @property
    def child_pid(self) -> int | None:
        """The process id of the current measuring child (None before the first sample or after `close`)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    def _replace_child(self) -> None:
        self._discard_child(kill=False)
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_child,
            initargs=(self.setup,),
        )
        self._started = time.monotonic()
        self.children_started += 1

    def _discard_child(self, kill: bool) -> None:
        """Stop the current child: an idle one exits on its own; with `kill`, one mid-sample is killed."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if not kill:
            pool.shutdown(wait=True)
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)

    def close(self) -> None:
        self._discard_child(kill=True)
