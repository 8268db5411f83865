"""Logging set-up: every log record carries the id of the HTTP request it was emitted in."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any

# Set by the request-id middleware for the duration of a request; "-" outside requests.
request_id_var: ContextVar[str | None] = ContextVar("lpnet_request_id", default=None)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

_factory_installed = False


def install_request_id_record_factory() -> None:
    """Give every log record a ``request_id`` attribute (idempotent).

    A record factory rather than a handler filter, so that any handler, including ones installed by
    tests or uvicorn, can use ``%(request_id)s``.
    """
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id_var.get() or "-"
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


class _LpnetHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record.

    Holding on to the stream of the moment would break once it is replaced and closed (pytest's
    capture does that between tests, while worker threads keep logging). Its own type also lets
    `configure_logging` tell that it was called before.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(level: str) -> None:
    """Send log records to stderr with timestamps and request ids, at `level` (e.g. "INFO")."""
    install_request_id_record_factory()
    root = logging.getLogger()
    root.setLevel(level)
    # Alembic announces its dialect on every schema check; the CLI prints its own migration summary.
    logging.getLogger("alembic.runtime.migration").setLevel("DEBUG" if level == "DEBUG" else "WARNING")
    if any(isinstance(handler, _LpnetHandler) for handler in root.handlers):
        return
    handler = _LpnetHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
