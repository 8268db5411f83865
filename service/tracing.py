"""Tracing torchvision models in a child process, for the serving app.

torch.fx patches ``torch.nn.Module.__call__`` for the whole process while it traces: any other
module's forward pass meanwhile (a request's channel-group analysis, a plan verification, profiling
in a worker thread) would run through the patch and fail or be recorded into the trace. The server
therefore traces in one child process (started with "spawn", one intra-op thread), shared by every
`LatencyService` of the process. The CLI and the library trace in their own process.

lpnet's errors (unknown model, unsupported operator, too large) come back as data and are raised
again in the parent unchanged: some of them take constructor arguments other than their message and
would not survive pickling. A child that dies or overruns the trace timeout is answered
`TracerUnavailable` (503, not cached) and replaced on the next trace.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from lpnet.arch.ir import Network
from lpnet.errors import LpnetError
from service.errors import ServiceError

logger = logging.getLogger(__name__)

# Tracing on the meta device takes 0.1-4 s; a minute means the child is stuck.
TRACE_TIMEOUT_SECONDS = 60.0
# The child imports torch and torchvision before its first trace: a few seconds, more under load.
START_TIMEOUT_SECONDS = 120.0
# A replacement child is ready a few seconds after the next trace starts it.
TRACER_RETRY_SECONDS = 5


class TracerUnavailable(ServiceError):
    """The child process that traces models died or overran its timeout; retry after ``Retry-After``."""

    code = "tracer_unavailable"
    status_code = 503

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(
            f"{message}; retry in {TRACER_RETRY_SECONDS} s",
            {**details, "retry_after_seconds": TRACER_RETRY_SECONDS},
            headers={"Retry-After": str(TRACER_RETRY_SECONDS)},
        )


@dataclass(frozen=True)
class _TraceFailure:
    """An lpnet error raised in the child, as its class, arguments and attributes."""

    error_type: type[LpnetError]
    args: tuple[Any, ...]
    state: dict[str, Any]

    def error(self) -> LpnetError:
        # Built without calling __init__, whose signature differs between error classes.
        error = self.error_type.__new__(self.error_type, *self.args)
        error.args = self.args
        error.__dict__.update(self.state)
        return error


# How often the child checks that the server that started it is still alive.
PARENT_CHECK_SECONDS = 1.0


def _exit_with_parent(parent_pid: int) -> None:
    """End the child once its parent is gone: a server killed outright must not leave it behind."""
    while os.getppid() == parent_pid:
        threading.Event().wait(PARENT_CHECK_SECONDS)
    os._exit(0)


def _prepare_child(parent_pid: int) -> None:
    """Watch the parent; import what tracing needs once, with one intra-op thread (the parent serves
    on the others)."""
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    import torch
    import torchvision  # noqa: F401

    import lpnet.arch.from_torch  # noqa: F401

    torch.set_num_threads(1)


def _trace_in_child(name: str, input_shape: tuple[int, ...]) -> Network | _TraceFailure:
    from lpnet.arch.from_torch import network_from_torchvision

    try:
        return network_from_torchvision(name, input_shape)
    except LpnetError as exc:
        return _TraceFailure(type(exc), exc.args, dict(exc.__dict__))


class TraceProcess:
    """Traces torchvision models by name in a child process, started lazily and replaced when it dies."""

    def __init__(
        self,
        timeout_seconds: float = TRACE_TIMEOUT_SECONDS,
        start_timeout_seconds: float = START_TIMEOUT_SECONDS,
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self.start_timeout_seconds = start_timeout_seconds
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._pid: Future[int] | None = None

    def start(self) -> None:
        """Start the child in the background unless it runs already; it imports torch and torchvision."""
        self._running()

    def stop(self) -> None:
        """Kill the child now, even halfway through its imports (a server shutting down must not wait
        for it); the next trace starts a new one."""
        with self._lock:
            executor, self._executor, self._pid = self._executor, None, None
        if executor is None:
            return
        # The pool's own processes: the pid task may not have run yet.
        for process in list(getattr(executor, "_processes", {}).values()):
            process.kill()
        executor.shutdown(wait=False, cancel_futures=True)

    def pid(self) -> int:
        """The child's process id, starting it (and waiting until it is ready) if need be."""
        _, pid = self._running()
        return pid.result(timeout=self.start_timeout_seconds)

    def trace(self, name: str, input_shape: Sequence[int]) -> Network:
        """`lpnet.arch.from_torch.network_from_torchvision` run in the child.

        A child found dead (killed or out of memory while idle, or during this trace) is replaced and
        the trace tried once more in the new one.

        Raises:
            UnknownModel, UnsupportedOperator, ArchitectureTooLarge, InvalidArchitecture: As raised
                by the trace.
            TracerUnavailable: The child died twice, or did not start or finish within its timeout.
        """
        try:
            result = self._run(name, input_shape)
        except BrokenProcessPool:
            logger.warning("the trace child died; tracing %r in a new one", name)
            try:
                result = self._run(name, input_shape)
            except BrokenProcessPool as exc:
                raise TracerUnavailable(f"the process tracing {name!r} died", {"model": name}) from exc
        if isinstance(result, _TraceFailure):
            raise result.error()
        return result

    def _run(self, name: str, input_shape: Sequence[int]) -> Network | _TraceFailure:
        """One trace in the current child; a broken or overrunning child is discarded."""
        executor, pid = self._running()
        try:
            pid.result(timeout=self.start_timeout_seconds)
            return executor.submit(_trace_in_child, name, tuple(input_shape)).result(
                timeout=self.timeout_seconds
            )
        except BrokenProcessPool:
            self._discard(executor)
            raise
        except FutureTimeout as exc:
            if pid.done() and pid.exception() is None:
                _kill(pid.result())
            self._discard(executor)
            logger.warning("tracing %r overran %g s; the trace child was stopped", name, self.timeout_seconds)
            raise TracerUnavailable(
                f"tracing {name!r} did not finish within {self.timeout_seconds:g} s",
                {"model": name, "timeout_seconds": self.timeout_seconds},
            ) from exc

    def _running(self) -> tuple[ProcessPoolExecutor, Future[int]]:
        with self._lock:
            if self._executor is None or self._pid is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_prepare_child,
                    initargs=(os.getpid(),),
                )
                # The first task: the child's pid, known once it has imported what tracing needs.
                self._pid = self._executor.submit(os.getpid)
            return self._executor, self._pid

    def _discard(self, executor: ProcessPoolExecutor) -> None:
        """Drop a broken or stopped pool; the next trace starts a new child."""
        with self._lock:
            if self._executor is executor:
                self._executor = None
                self._pid = None
        executor.shutdown(wait=False, cancel_futures=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it died on its own meanwhile
        pass


_shared: TraceProcess | None = None
_shared_lock = threading.Lock()


def shared_trace_process() -> TraceProcess:
    """The process's one `TraceProcess` (its child starts on the first trace or `start()`)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = TraceProcess()
        return _shared
