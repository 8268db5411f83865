"""What a task runner (campaign, verify) gets from the agent loop that leased the task."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from profiler.agent.client import ServerClient
from profiler.agent.config import AgentLoopConfig
from profiler.agent.heartbeat import Heartbeat

if TYPE_CHECKING:
    from profiler.backends.base import Backend
    from profiler.device import DeviceSpec
    from profiler.environment import AllocatorPolicy


class TaskHost(Protocol):
    """The agent loop as its task runners see it."""

    config: AgentLoopConfig
    server: ServerClient
    state_dir: Path
    # The device as the server's hello described it.
    device: dict[str, Any]
    # Set by SIGTERM/SIGINT: the task in hand stops at its next check.
    stop: threading.Event

    def device_spec(self) -> DeviceSpec:
        """The device as registered: what every measurement is taken (and keyed) with."""
        ...

    def allocator_policy(self) -> AllocatorPolicy:
        """The device's allocator policy, which every measurement is taken under."""
        ...

    def backend(self, spec: DeviceSpec) -> Backend:
        """One backend per device spec, built once."""
        ...

    def start_heartbeat(self, task: dict[str, Any]) -> Heartbeat:
        """A started thread renewing the task's lease."""
        ...

    def finish(self, task: dict[str, Any], action: str, body: dict[str, Any]) -> None:
        """Hand the task's completion or failure to the outbox."""
        ...
