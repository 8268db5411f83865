"""A stored predictor that this lpnet cannot read (an older feature schema): 409 naming the refit, and
a refit from the stored measurements queued when a server starts; the first run's refining waits for
it and then samples by the refitted version.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from sqlalchemy import select, update

from lpnet.predictor.artifact import read_header
from service.config import FitSettings, Settings, WorkerSettings
from service.db.base import utcnow
from service.db.models import Job, JobStatus
from service.first_run.bootstrap import start_first_run
from service.job_handlers import default_registry, serving_registry
from service.jobs.kinds import JobKind
from service.jobs.worker import Worker
from service.main import create_app
from service.predictors import FittedPredictor
from service.stale_predictors import queue_stale_refits, unreadable_reason
from service.testing.tiny import TinyProfile
from tests.service.support import Api, api_client
from tests.service.test_first_run_refine import first_run_settings
from tests.service.test_health_api import assert_error_shape

SHORT_FIT = FitSettings(steps=120, members=2)


def with_header(artifact: bytes, **changes: str) -> bytes:
    """`artifact` with header fields replaced, its tensors unchanged."""
    return save_tensors(load_tensors(artifact), metadata={**read_header(artifact), **changes})


def stale(fitted: FittedPredictor) -> FittedPredictor:
    """`fitted` as an lpnet computing feature schema 2 would have stored it."""
    return dataclasses.replace(
        fitted, artifact=with_header(fitted.artifact, feature_schema_version="2"), feature_schema_version=2
    )


def _latency(api: Api, tiny_profile: TinyProfile) -> Any:
    architecture = tiny_profile.network.model_dump(mode="json")
    return api.post(
        "/v1/latency", key="reader", json={"device": api.device_name, "architecture": architecture}
    )


def _jobs(api: Api, kind: str) -> list[Job]:
    with api.factory() as session:
        jobs = list(session.scalars(select(Job).where(Job.kind == kind).order_by(Job.id)))
        session.expunge_all()
        return jobs


def _start_server(url: str) -> None:
    """Start and stop a serving process on the database (its start-up only; workers off)."""
    app = create_app(Settings(database_url=url, worker=WorkerSettings(embedded=False), fit=SHORT_FIT))
    with TestClient(app):
        pass


def test_the_reason_names_what_this_lpnet_cannot_read(tiny_profile: TinyProfile) -> None:
    artifact = tiny_profile.fitted.artifact
    assert unreadable_reason(artifact) is None
    assert "feature schema 2" in str(unreadable_reason(with_header(artifact, feature_schema_version="2")))
    assert "version 3" in str(unreadable_reason(with_header(artifact, artifact_version="3")))
    assert "malformed" in str(unreadable_reason(with_header(artifact, artifact_version="six")))
    assert "truncated" in str(unreadable_reason(b"\x01"))


def test_a_starting_server_refits_a_stale_predictor_from_the_stored_measurements(
    migrated_url: str, tiny_profile: TinyProfile
) -> None:
    with api_client(migrated_url, fit=SHORT_FIT) as api:
        api.store_measurements(api.device_id, tiny_profile.measurements)
        api.store_predictor(api.device_id, stale(tiny_profile.fitted))
        message = str(
            assert_error_shape(_latency(api, tiny_profile), 409, "predictor_artifact_unreadable")["message"]
        )
        assert "predictor version 1" in message and "feature schema 2" in message
        assert f"POST /v1/devices/{api.device_id}/predictors" in message

        _start_server(migrated_url)
        [fit] = _jobs(api, JobKind.FIT)
        assert fit.status == JobStatus.QUEUED and fit.input["fit"]["steps"] == SHORT_FIT.steps
        error = assert_error_shape(_latency(api, tiny_profile), 409, "predictor_artifact_unreadable")
        details = error["details"]
        assert f"(job {fit.id})" in str(error["message"])
        assert isinstance(details, dict) and details["refit_job_id"] == fit.id
        status = api.get(f"/v1/devices/{api.device_id}", key="reader").json()["status"]
        assert status["phase"] == "fitting" and status["job_id"] == fit.id
        assert "cannot read" in status["message"]
        _start_server(migrated_url)  # a second start while the refit is queued adds none
        assert len(_jobs(api, JobKind.FIT)) == 1

        assert Worker(api.factory, default_registry()).run_once() is not None
        [fit] = _jobs(api, JobKind.FIT)
        assert fit.status == JobStatus.SUCCEEDED, fit.error
        answer = _latency(api, tiny_profile)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictor"]["version"] == 2 and answer.json()["total_ms"] > 0
        _start_server(migrated_url)  # the refitted version is readable: nothing more to do
        assert len(_jobs(api, JobKind.FIT)) == 1


def test_a_stale_predictor_without_enough_measurements_is_left_with_a_warning(
    sqlite_migrated_url: str, tiny_profile: TinyProfile, caplog: pytest.LogCaptureFixture
) -> None:
    with api_client(sqlite_migrated_url) as api:
        api.store_predictor(api.device_id, stale(tiny_profile.fitted))
        other, _ = api.add_device("readable-cpu")
        api.store_predictor(other, tiny_profile.fitted)
        with caplog.at_level(logging.WARNING, logger="service.stale_predictors"):
            assert queue_stale_refits(Settings(database_url=sqlite_migrated_url), api.factory) == []
        assert "tiny-cpu" in caplog.text and "cannot refit it" in caplog.text and "measure" in caplog.text
        assert "readable-cpu" not in caplog.text and _jobs(api, JobKind.FIT) == []


@pytest.mark.slow
def test_refining_waits_for_the_refit_of_a_stale_predictor_then_samples_by_it(
    sqlite_migrated_url: str, tiny_profile: TinyProfile
) -> None:
    with api_client(sqlite_migrated_url) as api:
        api.store_measurements(api.device_id, tiny_profile.measurements)
        api.store_predictor(api.device_id, stale(tiny_profile.fitted))
        settings = first_run_settings(sqlite_migrated_url, rounds=1)
        [fit_id] = queue_stale_refits(settings, api.factory)
        refine_id = start_first_run(settings, api.factory)
        assert refine_id is not None and refine_id > fit_id
        # Another worker holds the refit: the round finds no job waiting, and defers until the refit is done.
        with api.factory() as session:
            held = {"lease_owner": "another-worker", "lease_expires_at": utcnow() + timedelta(minutes=10)}
            session.execute(update(Job).where(Job.id == fit_id).values(status=JobStatus.RUNNING, **held))
            session.commit()
        worker = Worker(api.factory, serving_registry(), poll_seconds=0.1)
        assert worker.run_once() is not None
        [refine] = _jobs(api, JobKind.REFINE)
        assert refine.status == JobStatus.RUNNING and refine.lease_owner is None  # deferred
        assert f"waiting for the refit of the predictor it would sample by (job {fit_id})" in str(
            refine.progress
        )

        with api.factory() as session:
            released = {"lease_owner": None, "lease_expires_at": None}
            session.execute(update(Job).where(Job.id == fit_id).values(status=JobStatus.QUEUED, **released))
            session.commit()
        deadline = time.monotonic() + 180
        while _jobs(api, JobKind.REFINE)[0].status == JobStatus.RUNNING and time.monotonic() < deadline:
            if worker.run_once() is None:
                time.sleep(0.2)
        [fit], [refine] = _jobs(api, JobKind.FIT), _jobs(api, JobKind.REFINE)
        assert fit.status == refine.status == JobStatus.SUCCEEDED, (fit.error, refine.error)
        assert fit.result is not None and fit.result["version"] == 2
        assert refine.result is not None and (
            refine.result["sampled_by_version"],
            refine.result["version"],
        ) == (2, 3)
