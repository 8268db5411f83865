"""JSON calls from the agent to the server, and the errors the agent raises."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from profiler.errors import ProfilerError

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class AgentError(ProfilerError):
    """The agent cannot go on: bad configuration, or the server refuses it."""

    code = "agent_error"


class ServerUnreachable(AgentError):
    """No answer, or an answer that says to try again later (5xx, 429)."""

    code = "server_unreachable"


class ServerRefused(AgentError):
    """A 4xx answer in the service's error shape."""

    code = "server_refused"

    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(f"{message} ({status} {error_code})", {"status": status, "code": error_code})
        self.status = status
        self.error_code = error_code
        self.reason = message

    @classmethod
    def from_response(cls, response: httpx.Response) -> ServerRefused:
        try:
            error = response.json()["error"]
            return cls(response.status_code, str(error["code"]), str(error["message"]))
        except (ValueError, KeyError, TypeError):
            return cls(response.status_code, "http_error", response.text[:300] or response.reason_phrase)


class ServerClient:
    """JSON calls to the server; raises `ServerUnreachable` or `ServerRefused` instead of returning errors."""

    def __init__(self, base_url: str, token: str, timeout: float, client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._owns_client = client is None
        self._client = client or httpx.Client(timeout=timeout)

    def call(
        self, method: str, path: str, *, json_body: Any = None, params: Mapping[str, str] | None = None
    ) -> httpx.Response:
        url = f"{self.base_url}{path}"
        try:
            response = self._client.request(
                method, url, json=json_body, params=params, headers={"Authorization": f"Bearer {self.token}"}
            )
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"{self.base_url} is unreachable ({type(exc).__name__}: {exc})") from exc
        if response.status_code in RETRYABLE_STATUS:
            raise ServerUnreachable(
                f"{method} {path} answered {response.status_code}; the server is not ready"
            )
        if not response.is_success:
            raise ServerRefused.from_response(response)
        return response

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
