"""What `lpnet agent` was told, checked before anything starts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from profiler.agent.client import AgentError

SERVER_ENV = "LPNET_SERVER"
API_KEY_ENV = "LPNET_API_KEY"
DEVICE_ENV = "LPNET_AGENT_DEVICE"
STATE_DIR_ENV = "LPNET_AGENT_STATE_DIR"
DEFAULT_STATE_DIR = Path(".lpnet-agent")
# Waiting for an unreachable server backs off up to this many seconds between attempts.
MAX_RETRY_WAIT_S = 30.0


@dataclass
class AgentLoopConfig:
    """What `lpnet agent` was told."""

    server: str
    token: str
    device: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    poll_seconds: float = 5.0
    once: bool = False
    backend: str = "torch-cpu"
    threads: int = 1
    profile_minutes: float | None = None
    lease_seconds: float | None = None
    batch_rows: int = 10
    request_timeout: float = 30.0

    def __post_init__(self) -> None:
        self.server = self.server.rstrip("/")
        if not re.match(r"^https?://[^/\s]+", self.server):
            raise AgentError(f"--server must be an http(s) URL such as http://host:8000, got {self.server!r}")
        if not self.token.strip():
            raise AgentError(f"an API key is needed: --token KEY or ${API_KEY_ENV}")
        if not self.poll_seconds > 0:
            raise AgentError(f"--poll-seconds must be positive, got {self.poll_seconds}")
        if self.profile_minutes is not None and not self.profile_minutes > 0:
            raise AgentError(f"--profile-minutes must be positive, got {self.profile_minutes}")
        if self.lease_seconds is not None and not 1 <= self.lease_seconds <= 3600:
            raise AgentError(f"--lease-seconds must be in 1..3600, got {self.lease_seconds}")
        if not 1 <= self.batch_rows <= 500:
            raise AgentError(f"--batch-rows must be in 1..500, got {self.batch_rows}")
        self.state_dir = Path(self.state_dir)
