"""Per-layer charts over REST: a plan's layers before and after pruning, and the chart a latency query
asks for with `plot`, kept for the key that asked until it expires; the client's methods for both
against a real server on loopback; and the migration that adds the charts' table."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from matplotlib.image import imread
from sqlalchemy import inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from lpnet.arch.onnx_io import export_onnx
from lpnet.client import Conflict, NotFound
from service.auth import create_api_key
from service.config import WorkerSettings
from service.db import migrate
from service.db.base import utcnow
from service.db.models import Job, JobStatus, KeyScope, LatencyPlot
from service.db.session import make_engine
from service.job_handlers import default_registry
from service.jobs.kinds import JobKind
from service.jobs.worker import Worker
from service.testing.tiny import TINY_INPUT_SHAPE, TinyProfile, tiny_module
from tests.service.support import Api, api_client
from tests.service.test_api_plans import budget_at, plan_request, run_plan
from tests.service.test_client import served
from tests.service.test_health_api import assert_error_shape

LiveServer = Callable[[FastAPI], AbstractContextManager[str]]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_URL = re.compile(r"^/v1/latency/plots/([0-9a-f]{32})\.png$")
TTL_SECONDS = 60.0


def decoded_png(data: bytes) -> np.ndarray:
    """The image `data` decodes to (height, width, RGBA), after checking it is a PNG."""
    assert data[:8] == PNG_SIGNATURE
    image = np.asarray(imread(io.BytesIO(data), format="png"))
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def assert_png_answer(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return decoded_png(response.content)


def another_reader(api: Api) -> str:
    with api.factory() as session:
        raw = create_api_key(session, scope=KeyScope.READER.value, name="another reader")[1]
        session.commit()
    return raw


def ask_with_plot(api: Api, profile: TinyProfile, key: str = "reader") -> str:
    """POST /v1/latency with plot for the tiny network; the id in its plot_url."""
    response = api.post(
        "/v1/latency",
        key=key,
        json={"device": "tiny-cpu", "architecture": profile.network.model_dump(mode="json"), "plot": True},
    )
    assert response.status_code == 200, response.text
    match = PLOT_URL.fullmatch(response.json()["plot_url"])
    assert match is not None, response.json()["plot_url"]
    return match.group(1)


def stored_plots(api: Api) -> set[str]:
    with api.factory() as session:
        return set(session.scalars(select(LatencyPlot.id)))


def age_plot(api: Api, plot_id: str, seconds: float) -> None:
    with api.factory() as session:
        session.execute(
            update(LatencyPlot)
            .where(LatencyPlot.id == plot_id)
            .values(created_at=utcnow() - timedelta(seconds=seconds))
        )
        session.commit()


# Plan charts ------------------------------------------------------------------------------------


def test_a_succeeded_plan_has_a_chart_of_its_layers(
    api_with_predictor: Api, tiny_profile: TinyProfile
) -> None:
    api = api_with_predictor
    plan = run_plan(api, plan_request(tiny_profile, budget_at(tiny_profile, 0.5), round_to=8))
    assert plan["status"] == "succeeded", plan["error"]
    image = assert_png_answer(api.get(f"/v1/plans/{plan['id']}/layers.png", key="reader"))
    # Two panels (latency, widths) in a 7.2-inch-high figure at 100 dpi, at least 6 inches wide.
    assert image.shape[0] == 720 and image.shape[1] >= 600
    assert image[..., :3].std() > 0.05  # bars and text, not a blank canvas
    assert_png_answer(api.get(f"/v1/plans/{plan['id']}/layers.png", key="admin"))


def test_a_plan_without_a_result_has_no_chart(api_with_predictor: Api, tiny_profile: TinyProfile) -> None:
    api = api_with_predictor
    accepted = api.post(
        "/v1/plans", key="reader", json=plan_request(tiny_profile, budget_at(tiny_profile, 0.5))
    )
    assert accepted.status_code == 202, accepted.text
    plan_id = accepted.json()["job_id"]
    queued = assert_error_shape(
        api.get(f"/v1/plans/{plan_id}/layers.png", key="reader"), 409, "plan_not_succeeded"
    )
    assert queued["details"] == {"plan_id": plan_id, "status": "queued"}
    assert f"plan {plan_id} is queued" in str(queued["message"])

    with api.factory() as session:
        session.execute(
            update(Job).where(Job.id == plan_id).values(status=JobStatus.FAILED, error="timed out")
        )
        session.commit()
    failed = assert_error_shape(
        api.get(f"/v1/plans/{plan_id}/layers.png", key="reader"), 409, "plan_not_succeeded"
    )
    assert failed["details"] == {"plan_id": plan_id, "status": "failed"}
    assert f"plan {plan_id} failed" in str(failed["message"])


def test_unknown_plans_and_other_jobs_have_no_chart(api: Api) -> None:
    missing = assert_error_shape(api.get("/v1/plans/12345/layers.png", key="reader"), 404, "not_found")
    assert "12345" in str(missing["message"])
    with api.factory() as session:
        fit = Job(kind=JobKind.FIT, status=JobStatus.SUCCEEDED, input={}, result={})
        session.add(fit)
        session.commit()
        fit_id = fit.id
    assert_error_shape(api.get(f"/v1/plans/{fit_id}/layers.png", key="reader"), 404, "not_found")
    assert_error_shape(api.get("/v1/plans/0/layers.png", key="reader"), 422, "validation_error")
    assert_error_shape(api.get("/v1/plans/1/layers.png", key="agent"), 403, "permission_denied")


# Latency plots ----------------------------------------------------------------------------------


def test_a_latency_plot_is_served_to_its_key_and_admin_only(
    api_with_predictor: Api, tiny_profile: TinyProfile
) -> None:
    api = api_with_predictor
    plot_id = ask_with_plot(api, tiny_profile)
    url = f"/v1/latency/plots/{plot_id}.png"
    image = assert_png_answer(api.get(url, key="reader"))
    assert image.shape[0] == 480 and image.shape[1] >= 600
    assert image[..., :3].std() > 0.05
    assert_png_answer(api.get(url, key="admin"))
    other = assert_error_shape(api.get(url, key=another_reader(api)), 404, "not_found")
    assert other["details"] == {"plot_id": plot_id}
    assert_error_shape(api.get(url, key="agent"), 403, "permission_denied")
    assert_error_shape(api.get(f"/v1/latency/plots/{'0' * 32}.png", key="reader"), 404, "not_found")
    assert_error_shape(api.get("/v1/latency/plots/not-a-plot.png", key="reader"), 422, "validation_error")


def test_latency_answers_without_plot_are_unchanged(
    api_with_predictor: Api, tiny_profile: TinyProfile
) -> None:
    api = api_with_predictor
    request: dict[str, Any] = {
        "device": "tiny-cpu",
        "architecture": tiny_profile.network.model_dump(mode="json"),
    }
    plain = api.post("/v1/latency", key="reader", json=request)
    unplotted = api.post("/v1/latency", key="reader", json={**request, "plot": False})
    plotted = api.post("/v1/latency", key="reader", json={**request, "plot": True})
    assert plain.status_code == unplotted.status_code == plotted.status_code == 200
    assert plain.json()["plot_url"] is None and unplotted.json() == plain.json()
    # The plotted answer is the same prediction, with a URL.
    assert {**plotted.json(), "plot_url": None} == plain.json()
    assert len(stored_plots(api)) == 1
    refused = assert_error_shape(
        api.post("/v1/latency", key="reader", json={**request, "plot": "maybe"}), 422, "validation_error"
    )
    assert "plot" in str(refused)


def test_a_plot_needs_a_device_with_a_predictor(api: Api, tiny_profile: TinyProfile) -> None:
    request = {
        "device": "tiny-cpu",
        "architecture": tiny_profile.network.model_dump(mode="json"),
        "plot": True,
    }
    assert_error_shape(api.post("/v1/latency", key="reader", json=request), 409, "no_predictor")
    assert_error_shape(
        api.post("/v1/latency", key="reader", json={**request, "device": "nowhere"}), 404, "not_found"
    )
    assert stored_plots(api) == set()


def test_latency_plots_expire(migrated_url: str, tiny_profile: TinyProfile) -> None:
    with api_client(migrated_url, latency_plot_ttl_seconds=TTL_SECONDS) as api:
        api.store_measurements(api.device_id, tiny_profile.measurements)
        api.store_predictor(api.device_id, tiny_profile.fitted)
        first = ask_with_plot(api, tiny_profile)
        # Inside the TTL it is served; past it, it is 404 to its own key and to admin alike.
        age_plot(api, first, TTL_SECONDS / 2)
        assert_png_answer(api.get(f"/v1/latency/plots/{first}.png", key="reader"))
        age_plot(api, first, TTL_SECONDS * 1.5)
        for key in ("reader", "admin"):
            expired = assert_error_shape(api.get(f"/v1/latency/plots/{first}.png", key=key), 404, "not_found")
            assert "LPNET_LATENCY_PLOT_TTL_SECONDS" in str(expired["message"])
        assert first in stored_plots(api)
        # Storing the next plot deletes the expired one, whoever's it was, and keeps the live ones.
        live = ask_with_plot(api, tiny_profile, key="admin")
        newest = ask_with_plot(api, tiny_profile)
        assert stored_plots(api) == {live, newest}


# The client over real HTTP ----------------------------------------------------------------------


def test_the_client_reads_both_charts(
    sqlite_migrated_url: str, tiny_profile: TinyProfile, live_server: LiveServer, tmp_path: Path
) -> None:
    no_worker = WorkerSettings(embedded=False)
    with served(sqlite_migrated_url, tiny_profile, live_server, worker=no_worker) as server:
        with server.client() as client:
            answer = client.latency("tiny-cpu", tiny_profile.network, plot=True)
            assert answer.plot_url is not None and PLOT_URL.fullmatch(answer.plot_url)
            png = client.latency_plot(answer)
            decoded_png(png)
            assert client.latency_plot(answer.plot_url) == png
            assert client.latency_plot(server.url + answer.plot_url) == png
            with pytest.raises(ValueError, match="not on this client's server"):
                client.latency_plot("http://203.0.113.7:8000" + answer.plot_url)
            plain = client.latency("tiny-cpu", tiny_profile.network)
            assert plain.plot_url is None
            with pytest.raises(ValueError, match="plot=True"):
                client.latency_plot(plain)
            onnx = client.latency("tiny-cpu", export_onnx(tiny_module(), TINY_INPUT_SHAPE), plot=True)
            assert onnx.plot_url is not None and onnx.plot_url != answer.plot_url
            decoded_png(client.latency_plot(onnx))

            accepted = client.create_plan("tiny-cpu", tiny_profile.network, budget_at(tiny_profile, 0.5))
            with pytest.raises(Conflict) as queued:
                client.plan_layers_chart(accepted.job_id)
            assert queued.value.code == "plan_not_succeeded" and queued.value.details["status"] == "queued"
            Worker(server.factory, default_registry()).run_once()
            assert client.plan(accepted.job_id).status == "succeeded"
            decoded_png(client.plan_layers_chart(accepted.job_id))
            with pytest.raises(NotFound):
                client.plan_layers_chart(accepted.job_id + 1000)

        with server.client("admin") as admin:
            assert admin.latency_plot(answer) == png
        with server.factory() as session:
            other_key = create_api_key(session, scope=KeyScope.READER.value)[1]
            session.commit()
        with server.client(other_key) as other, pytest.raises(NotFound) as hidden:
            other.latency_plot(answer)
        assert hidden.value.code == "not_found"


# The migration ----------------------------------------------------------------------------------


def test_revision_0008_adds_and_removes_the_latency_plot_table(db_url: str) -> None:
    migrate.upgrade(db_url, "0007")
    engine = make_engine(db_url)
    assert "latency_plot" not in inspect(engine).get_table_names()
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO api_key (id, name, prefix, key_hash, scope, created_at) "
                "VALUES (7, 'r', 'lpn_r', :hash, 'reader', CURRENT_TIMESTAMP)"
            ),
            {"hash": "0" * 64},
        )
    migrate.upgrade(db_url, "0008")
    engine.dispose()
    engine = make_engine(db_url)
    assert "latency_plot" in inspect(engine).get_table_names()
    insert = text(
        "INSERT INTO latency_plot (id, key_id, png, created_at) VALUES (:id, :key_id, :png, CURRENT_TIMESTAMP)"
    )
    with engine.begin() as connection:
        connection.execute(insert, {"id": "a" * 32, "key_id": 7, "png": PNG_SIGNATURE})
        assert connection.execute(text("SELECT key_id, png FROM latency_plot")).one() == (7, PNG_SIGNATURE)
    with pytest.raises(IntegrityError), engine.begin() as connection:  # the owner must exist
        connection.execute(insert, {"id": "b" * 32, "key_id": 8, "png": PNG_SIGNATURE})
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM api_key WHERE id = 7"))
    with engine.connect() as connection:  # ON DELETE CASCADE: a deleted key's plots go with it
        assert connection.execute(text("SELECT COUNT(*) FROM latency_plot")).scalar_one() == 0
        connection.execute(
            text(
                "INSERT INTO api_key (id, name, prefix, key_hash, scope, created_at) "
                "VALUES (8, 'r', 'lpn_s', :hash, 'reader', CURRENT_TIMESTAMP)"
            ),
            {"hash": "1" * 64},
        )
        connection.commit()
    migrate.downgrade(db_url, "0007")
    engine.dispose()
    engine = make_engine(db_url)
    assert "latency_plot" not in inspect(engine).get_table_names()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT prefix FROM api_key")).scalar_one() == "lpn_s"
    engine.dispose()
