"""Renewing a task's lease while the agent works on it."""

from __future__ import annotations

import logging
import threading
from typing import Any

from profiler.agent.client import ServerClient, ServerRefused, ServerUnreachable

logger = logging.getLogger(__name__)


class TaskLost(Exception):
    """The server took the task away (lapsed lease, cancelled): stop working on it."""


class Heartbeat(threading.Thread):
    """Renews a task's lease every `interval` seconds with the latest progress, until stopped.

    A 404 or 409 answer means the task is no longer this agent's: `lost` is set and the work stops at
    its next check. An unreachable server is logged and tried again at the next beat.
    """

    def __init__(self, server: ServerClient, task_id: int, agent_id: str, lease_seconds: float) -> None:
        super().__init__(name=f"heartbeat-{task_id}", daemon=True)
        self.server = server
        self.task_id = task_id
        self.agent_id = agent_id
        self.lease_seconds = lease_seconds
        self.interval = max(0.5, lease_seconds / 3)
        self.progress: dict[str, Any] = {}
        self.lost = threading.Event()
        self.reason = ""
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        body = {
            "agent_id": self.agent_id,
            "lease_seconds": self.lease_seconds,
            "progress": dict(self.progress),
        }
        try:
            self.server.call("POST", f"/v1/agent/tasks/{self.task_id}/heartbeat", json_body=body)
        except ServerRefused as exc:
            if exc.status in (404, 409):
                self.reason = exc.reason
                self.lost.set()
                self._stopped.set()
                logger.warning("task %d is no longer ours: %s", self.task_id, exc.reason)
            else:
                logger.warning("heartbeat of task %d refused: %s", self.task_id, exc)
        except ServerUnreachable as exc:
            logger.warning("heartbeat of task %d failed (%s); measuring on", self.task_id, exc)

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join(timeout=self.server.timeout)
