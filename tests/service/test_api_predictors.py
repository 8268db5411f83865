"""Fitting predictors through the API: the job, versions, metrics, plot, device status, CLI."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from service.config import FitSettings, WorkerSettings
from service.job_handlers import default_registry
from service.jobs.worker import Worker
from service.testing.tiny import TinyProfile
from tests.service.support import Api, api_client
from tests.service.test_health_api import assert_error_shape

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fit_api(migrated_url: str) -> Iterator[Api]:
    """An API whose fits are short (fewer steps and members than the defaults)."""
    with api_client(migrated_url, fit=FitSettings(steps=120, members=2)) as harness:
        yield harness


def test_fit_job_stores_a_new_version(fit_api: Api, tiny_profile: TinyProfile) -> None:
    api = fit_api
    api.store_measurements(api.device_id, tiny_profile.measurements)
    accepted = api.post(f"/v1/devices/{api.device_id}/predictors")
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert accepted.json()["status"] == "queued" and accepted.json()["status_url"] == f"/v1/jobs/{job_id}"
    status = api.get(f"/v1/devices/{api.device_id}", key="reader").json()["status"]
    assert status["phase"] == "fitting" and status["job_id"] == job_id
    # One fit per device at a time.
    assert_error_shape(api.post(f"/v1/devices/{api.device_id}/predictors"), 409, "conflict")

    assert Worker(api.factory, default_registry()).run_once() is not None
    job = api.get(f"/v1/jobs/{job_id}", key="reader").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["result"]["version"] == 1
    predictor_id = job["result"]["predictor_id"]

    predictor = api.get(f"/v1/predictors/{predictor_id}", key="reader").json()
    assert predictor["version"] == 1 and predictor["device"] == "tiny-cpu" and predictor["kind"] == "lpnet"
    assert predictor["metrics"]["lpnet"]["count"] >= 1
    assert predictor["training_fingerprint"] == job["result"]["training_fingerprint"]
    assert predictor["plot_url"] == f"/v1/predictors/{predictor_id}/plot.png"
    plot = api.get(predictor["plot_url"], key="reader")
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    assert plot.content.startswith(PNG_MAGIC)

    device = api.get(f"/v1/devices/{api.device_id}", key="reader").json()
    assert device["status"]["phase"] == "ready" and device["predictor"]["id"] == predictor_id

    api.post(f"/v1/devices/{api.device_id}/predictors")
    Worker(api.factory, default_registry()).run_once()
    versions = api.get(f"/v1/devices/{api.device_id}/predictors", key="reader").json()["items"]
    assert [v["version"] for v in versions] == [2, 1]


def test_too_few_measurements_are_422_saying_how_many_more(fit_api: Api, tiny_profile: TinyProfile) -> None:
    api = fit_api
    # Five distinct architectures, one of them timed twice: a fit counts architectures, not rows.
    rows = tiny_profile.one_per_architecture[:5]
    twice = rows[0].model_copy(update={"sample_key": f"{rows[0].sample_key}-again"})
    api.store_measurements(api.device_id, [*rows, twice])
    error = assert_error_shape(
        api.post(f"/v1/devices/{api.device_id}/predictors"), 422, "not_enough_measurements"
    )
    assert error["details"]["have"] == 5  # type: ignore[index]
    assert f"measure {error['details']['missing']} more" in str(error["message"])  # type: ignore[index]
    assert api.get("/v1/jobs", key="reader").json() == {"items": [], "next_cursor": None}


def test_unknown_predictor_and_missing_plot_are_404(
    api_with_predictor: Api, tiny_profile: TinyProfile
) -> None:
    api = api_with_predictor
    assert_error_shape(api.get("/v1/predictors/9999", key="reader"), 404, "not_found")
    assert_error_shape(api.get("/v1/predictors/9999/plot.png", key="reader"), 404, "not_found")
    fitted = tiny_profile.fitted.__class__(**{**tiny_profile.fitted.__dict__, "plot_png": None})
    plotless = api.store_predictor(api.device_id, fitted)
    assert api.get(f"/v1/predictors/{plotless}", key="reader").json()["plot_url"] is None
    assert_error_shape(api.get(f"/v1/predictors/{plotless}/plot.png", key="reader"), 404, "not_found")


def test_the_embedded_worker_runs_fits_in_the_server(migrated_url: str, tiny_profile: TinyProfile) -> None:
    worker = WorkerSettings(embedded=True, poll_seconds=0.1, lease_seconds=10)
    with api_client(migrated_url, fit=FitSettings(steps=60, members=2), worker=worker) as api:
        api.store_measurements(api.device_id, tiny_profile.measurements)
        job_id = api.post(f"/v1/devices/{api.device_id}/predictors").json()["job_id"]
        deadline = time.monotonic() + 120
        job = api.get(f"/v1/jobs/{job_id}", key="reader").json()
        while job["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = api.get(f"/v1/jobs/{job_id}", key="reader").json()
        assert job["status"] == "succeeded", job
        assert api.get("/v1/jobs?kind=fit&status=succeeded", key="reader").json()["items"][0]["id"] == job_id
