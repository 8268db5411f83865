"""Per-key plan quotas over real HTTP: 429 `quota_exceeded` with Retry-After, per key, admin keys exempt,
and exact under concurrent requests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.auth import create_api_key
from service.config import QuotaSettings, Settings, WorkerSettings
from service.db.base import utcnow
from service.db.models import Job, JobStatus, KeyScope, ProfileRun, RunSource
from service.db.session import make_engine, make_session_factory
from service.job_handlers import default_registry
from service.jobs.worker import Worker
from service.main import create_app
from service.predictors import store_predictor
from service.profiles import measurement_rows
from service.testing.tiny import TinyProfile
from tests.service.support import tiny_device
from tests.service.test_api_plans import budget_at, plan_request
from tests.service.test_health_api import assert_error_shape

LiveServer = Callable[[FastAPI], AbstractContextManager[str]]


@dataclass
class QuotaServer:
    """A served app whose device `tiny-cpu` has the tiny predictor; an admin and two reader keys."""

    url: str
    factory: sessionmaker[Session]
    keys: dict[str, str]
    request: dict[str, Any]

    def plan(self, key: str, **changes: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[key]}"}
        return httpx.post(
            f"{self.url}/v1/plans", json={**self.request, **changes}, headers=headers, timeout=60
        )

    def jobs(self) -> list[Job]:
        with self.factory() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))


@contextmanager
def quota_server(
    url: str, tiny_profile: TinyProfile, live_server: LiveServer, quota: QuotaSettings
) -> Iterator[QuotaServer]:
    """Serve the app on the migrated database `url` with `quota` and no workers (plans stay queued)."""
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with factory() as session:
        keys = {
            name: create_api_key(session, scope=scope.value)[1]
            for name, scope in [
                ("admin", KeyScope.ADMIN),
                ("reader", KeyScope.READER),
                ("other", KeyScope.READER),
            ]
        }
        device = tiny_device()
        session.add(device)
        session.flush()
        run = ProfileRun(device_id=device.id, source=RunSource.LOCAL, status="completed")
        session.add(run)
        session.flush()
        for measurement in tiny_profile.measurements:
            session.add_all(measurement_rows(measurement, device.id, run.id))
        store_predictor(session, device.id, tiny_profile.fitted)
        session.commit()
    settings = Settings(database_url=url, worker=WorkerSettings(embedded=False), quota=quota)
    try:
        with live_server(create_app(settings)) as base_url:
            yield QuotaServer(
                base_url, factory, keys, plan_request(tiny_profile, budget_at(tiny_profile, 0.5))
            )
    finally:
        engine.dispose()


def assert_quota_exceeded(response: httpx.Response, limit: str, allowed: int, count: int) -> int:
    """Check a 429 answer; return its Retry-After seconds."""
    error = assert_error_shape(response, 429, "quota_exceeded")
    retry_after = int(response.headers["Retry-After"])
    assert error["details"] == {
        "limit": limit,
        "allowed": allowed,
        "count": count,
        "retry_after_seconds": retry_after,
    }
    assert f"at most {allowed}" in str(error["message"])
    return retry_after


def test_a_reader_key_may_have_only_so_many_plans_at_once(
    migrated_url: str, tiny_profile: TinyProfile, live_server: LiveServer
) -> None:
    with quota_server(migrated_url, tiny_profile, live_server, QuotaSettings(active_plans=2)) as server:
        assert [server.plan("reader").status_code for _ in range(2)] == [202, 202]
        refused = server.plan("reader")
        assert assert_quota_exceeded(refused, "active_plans", 2, 2) == 30
        assert "LPNET_QUOTA__ACTIVE_PLANS" in refused.json()["error"]["message"]
        # The quota is per key, and admin keys are exempt.
        assert server.plan("other").status_code == 202
        assert [server.plan("admin").status_code for _ in range(3)] == [202] * 3
        jobs = server.jobs()
        assert len(jobs) == 6 and all(job.key_id is not None for job in jobs)
        # A finished plan frees its slot.
        finished = Worker(server.factory, default_registry()).run_once()
        assert finished is not None and finished.id == jobs[0].id
        assert server.jobs()[0].status == JobStatus.SUCCEEDED
        assert server.plan("reader").status_code == 202
        assert_quota_exceeded(server.plan("reader"), "active_plans", 2, 2)


def test_a_reader_key_may_request_only_so_many_plans_an_hour(
    migrated_url: str, tiny_profile: TinyProfile, live_server: LiveServer
) -> None:
    quota = QuotaSettings(active_plans=100, plans_per_hour=3)
    with quota_server(migrated_url, tiny_profile, live_server, quota) as server:
        assert [server.plan("reader").status_code for _ in range(3)] == [202] * 3
        retry_after = assert_quota_exceeded(server.plan("reader"), "plans_per_hour", 3, 3)
        assert 3590 <= retry_after <= 3600
        first = server.jobs()[0]
        with server.factory() as session:
            # The oldest plan of the hour leaves the window in 10 s: that is when to retry.
            session.execute(
                update(Job)
                .where(Job.id == first.id)
                .values(created_at=utcnow() - timedelta(minutes=59, seconds=50))
            )
            session.commit()
        assert 1 <= assert_quota_exceeded(server.plan("reader"), "plans_per_hour", 3, 3) <= 10
        with server.factory() as session:
            session.execute(
                update(Job).where(Job.id == first.id).values(created_at=utcnow() - timedelta(hours=1))
            )
            session.commit()
        assert server.plan("reader").status_code == 202
        assert server.plan("admin").status_code == 202


def test_concurrent_requests_never_exceed_the_quota(
    migrated_url: str, tiny_profile: TinyProfile, live_server: LiveServer
) -> None:
    with quota_server(migrated_url, tiny_profile, live_server, QuotaSettings(active_plans=2)) as server:
        statuses: list[int] = []
        barrier = threading.Barrier(6)

        def request() -> None:
            barrier.wait()
            statuses.append(server.plan("reader").status_code)

        threads = [threading.Thread(target=request) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses) == [202, 202, 429, 429, 429, 429]
        assert len(server.jobs()) == 2


@pytest.mark.parametrize("limit", ["active_plans", "plans_per_hour"])
def test_quota_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, limit: str) -> None:
    monkeypatch.setenv(f"LPNET_QUOTA__{limit.upper()}", "7")
    assert getattr(Settings().quota, limit) == 7
    monkeypatch.setenv(f"LPNET_QUOTA__{limit.upper()}", "0")
    with pytest.raises(ValueError, match=limit):
        Settings()
