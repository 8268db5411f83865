"""Fixtures for the service tests: isolated settings, migrated databases, a live uvicorn server."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy.orm import Session

from service.config import get_settings
from service.db.migrate import upgrade
from service.db.session import make_engine, make_session_factory
from service.testing.tiny import TinyProfile, measure_tiny_profile
from tests.service.support import Api, api_client


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Point the settings at a per-test data directory and forget cached settings around each test."""
    data_dir = tmp_path / "lpnet-data"
    for name in list(os.environ):
        if name.startswith("LPNET_") and not name.startswith("LPNET_TEST_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LPNET_DATA_DIR", str(data_dir))
    monkeypatch.setenv("LPNET_ENV_FILE", "")  # a `.env` where the tests run must not change their settings
    # The first-run bootstrap (register, profile and fit this machine) is for `lpnet serve`; tests that
    # want it turn it on themselves (tests/service/test_first_run.py).
    monkeypatch.setenv("LPNET_FIRST_RUN__ENABLED", "false")
    get_settings.cache_clear()
    yield data_dir
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def postgres_migrated_session_url(postgres_session_url: str) -> str:
    """The shared PostgreSQL test database, migrated to the newest schema once per run."""
    upgrade(postgres_session_url, "head")
    return postgres_session_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def session(request: pytest.FixtureRequest) -> Iterator[Session]:
    """A session on a migrated database, on each backend in turn; nothing persists past the test.

    SQLite gets a fresh file. PostgreSQL shares one migrated database and wraps the test in a
    transaction that is rolled back; the session's own commits become savepoints inside it.
    """
    if request.param == "sqlite":
        engine = make_engine(request.getfixturevalue("sqlite_migrated_url"))
        with make_session_factory(engine)() as db_session:
            yield db_session
        engine.dispose()
        return

    engine = make_engine(request.getfixturevalue("postgres_migrated_session_url"))
    with engine.connect() as connection:
        transaction = connection.begin()
        with Session(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        ) as db_session:
            yield db_session
        transaction.rollback()
    engine.dispose()


@pytest.fixture
def live_server() -> Callable[[FastAPI], AbstractContextManager[str]]:
    """``with live_server(app) as base_url:`` runs `app` on a real uvicorn server on loopback."""
    return serve_in_thread


@contextmanager
def serve_in_thread(app: FastAPI, timeout_s: float = 10.0) -> Iterator[str]:
    """Run `app` with a real uvicorn server on a free loopback port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Binding port 0 here and handing the socket to uvicorn avoids racing another process for the port.
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port} within {timeout_s} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


@pytest.fixture(scope="session")
def tiny_profile() -> TinyProfile:
    """Real measurements of the tiny network's width variants and a predictor fitted on them."""
    return measure_tiny_profile()


@pytest.fixture
def api(migrated_url: str) -> Iterator[Api]:
    """A test client on a fresh migrated database (each backend in turn) with keys and one device."""
    with api_client(migrated_url) as harness:
        yield harness


@pytest.fixture
def sqlite_api(sqlite_migrated_url: str) -> Iterator[Api]:
    """`api` on SQLite only: for slow flows whose behaviour does not depend on the database (the
    database layer itself is exercised on both backends by the tests that use `api`)."""
    with api_client(sqlite_migrated_url) as harness:
        yield harness


@pytest.fixture
def api_with_predictor(api: Api, tiny_profile: TinyProfile) -> Api:
    """`api` whose device has the tiny measurements and a predictor fitted on them."""
    api.store_measurements(api.device_id, tiny_profile.measurements)
    api.extra["predictor_id"] = api.store_predictor(api.device_id, tiny_profile.fitted)
    return api
