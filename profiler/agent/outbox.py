"""Task results on disk until the server has them: written first, delivered oldest first."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from profiler.agent.client import AgentError, ServerClient, ServerRefused, ServerUnreachable

logger = logging.getLogger(__name__)


class Outbox:
    """The completions and failures of tasks, one JSON file each under `directory`.

    What the server refuses for good (404/409/422) is moved to ``rejected/`` for people to look at.
    """

    def __init__(self, directory: Path, server: ServerClient, agent_id: str) -> None:
        self.directory = directory
        self.rejected = directory / "rejected"
        self.rejected.mkdir(parents=True, exist_ok=True)
        self.server = server
        self.agent_id = agent_id

    def put(self, task_id: int, action: str, body: dict[str, Any]) -> None:
        """Write a task's completion or failure (on disk first), then try to deliver it."""
        if "error" in body:
            body = {**body, "error": str(body["error"])[:4000]}
        entry = {
            "path": f"/v1/agent/tasks/{task_id}/{action}",
            "body": {"agent_id": self.agent_id, **body},
        }
        path = self.directory / f"task-{task_id:010d}-{action}.json"
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(entry, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        try:
            self.flush()
        except ServerUnreachable as exc:
            logger.warning("task %d %s waits in the outbox: %s", task_id, action, exc)

    def flush(self) -> int:
        """Deliver what the outbox holds, oldest first; returns how many were delivered.

        Raises:
            ServerUnreachable: The server did not answer; the rest stays for the next attempt.
            AgentError: The key was refused (401/403).
        """
        delivered = 0
        for path in sorted(self.directory.glob("task-*.json")):
            entry = json.loads(path.read_text(encoding="utf-8"))
            try:
                self.server.call("POST", entry["path"], json_body=entry["body"])
            except ServerRefused as exc:
                if exc.status in (401, 403):
                    raise AgentError(f"the server refused the agent's key: {exc}") from exc
                # 404/409/422 will not change on a retry: keep it aside for people to look at.
                logger.warning("%s refused (%s); moved to %s", entry["path"], exc, self.rejected)
                os.replace(path, self.rejected / path.name)
                continue
            path.unlink()
            delivered += 1
            logger.info("delivered %s", entry["path"])
        return delivered

    def flush_once(self) -> None:
        """One delivery attempt on the way out; whatever fails stays for the next start."""
        try:
            self.flush()
        except AgentError as exc:
            logger.warning("the outbox keeps what it holds for the next start: %s", exc)
