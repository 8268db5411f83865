"""Measuring in child processes that are replaced every few seconds.

A process that has built and timed networks for a while runs the same network measurably slower
than a fresh one: on a 2-core EPYC, mobilenet_v2 took 15-16 ms in fresh processes and 18-19 ms in a
process that had profiled for 4.5 minutes, and children replaced every minute still predicted
unseen networks about 5 % high (docs/benchmarks.md). A latency label, a verification and a
deployment that has just started are all fresh processes, so an old process biases a profile
against all of them. `RecycledMeasurer` runs each sample in a child process and starts a new child once the
current one has lived `seconds_per_process`, so every sample is measured in a young process.

Children are forked from a fork server (``forkserver``), a clean interpreter started once per
measuring process that has imported torch and the measuring code and never runs a network: a new
child starts in a fraction of a second, where a spawned interpreter spends seconds importing torch,
so children can be replaced often. Where there is no fork server, children are spawned. A child
inherits no state of the measuring process, puts itself under the device's allocator policy, builds
the device's backend and its own speed probe, and ignores Ctrl-C, which the parent handles. It dies
with the measuring process, even one killed with SIGKILL: a watchdog thread waits for that process
to end. A child that dies mid-sample turns that sample into a `failed` measurement and the next
sample gets a new child.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
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


# The measuring state of a child process, set once by `_start_child`.
_child_backend: Backend | None = None
_child_probe: ProbeFn | None = None


# What the fork server imports before it forks any child: everything a child needs to measure.
_PRELOAD = ("torch", "profiler.recycling")


def child_context() -> multiprocessing.context.BaseContext:
    """How measuring children are started: forked from a fork server that has imported torch, or spawned."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(_PRELOAD))  # no effect once the server runs; it keeps its own
    return context


def _start_child(setup: ChildSetup) -> None:
    """Initialise a measuring child: ignore Ctrl-C, apply the allocator policy, build backend and probe."""
    global _child_backend, _child_probe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(setup.parent_pid)
    apply_allocator_policy(setup.allocator)
    _child_backend = setup.device.create_backend()
    if setup.speed_probe and _child_backend.runs_on_cpu:
        from profiler.speed import SpeedProbe

        _child_probe = SpeedProbe().run


def _die_with(measuring_pid: int) -> None:
    """End this process as soon as the measuring process `measuring_pid` ends, however it ends.

    Its own parent is no guide: a fork server's children keep the server alive (each holds the
    descriptor whose closing would stop it), so the kernel's parent-death signal would never come.
    A watchdog thread waits on the measuring process instead (a pidfd where the kernel has them,
    else a check every second).
    """
    if not _alive(measuring_pid):
        os._exit(1)
    try:
        handle: int | None = os.pidfd_open(measuring_pid)
    except (AttributeError, OSError):  # no pidfds here, or the process is gone already
        handle = None

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])  # readable once the process has ended
        else:
            while _alive(measuring_pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="measuring-process-watchdog", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


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
            mp_context=child_context(),
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
