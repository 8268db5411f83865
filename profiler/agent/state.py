"""The agent's state file: its id, the key it obtained, its device and current task."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from profiler.agent.client import AgentError

STATE_FILE = "agent.json"


@dataclass
class AgentState:
    """What survives a restart: the agent's id, the key it obtained, its device and current task."""

    agent_id: str
    server: str | None = None
    device_id: int | None = None
    device_name: str | None = None
    agent_key: str | None = None
    # Fingerprint of the token the agent key was obtained with: a different token means other intentions.
    key_origin: str | None = None
    task_id: int | None = None

    @classmethod
    def load(cls, path: Path) -> AgentState:
        """The state stored at `path`, or a fresh one with a new agent id."""
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
                return cls(**known)
            except (OSError, ValueError, TypeError) as exc:
                raise AgentError(
                    f"the agent state {path} is unreadable ({exc}); fix or remove it (the agent then gets a new id)"
                ) from exc
        return cls(agent_id=new_agent_id())

    def save(self, path: Path) -> None:
        """Write atomically, readable by this user only (it may hold an API key)."""
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def token_fingerprint(token: str) -> str:
    """A short hash of an API key, to recognise it without storing it."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def new_agent_id() -> str:
    """This host's name and a random suffix, in the characters the server accepts."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:60] or "agent"
    return f"{host}:{uuid.uuid4().hex[:12]}"
