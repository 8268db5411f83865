"""An imported predictor artifact's header may hold any metrics: the server stores what `PredictorMetrics`
names and types, leaves out and logs the rest, and `GET /v1/predictors/{id}` answers the stored metrics
typed, with nothing left over. Through `lpnet.client` against a real server on loopback."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from sqlalchemy import select

from lpnet.predictor.artifact import read_header
from service.config import WorkerSettings
from service.db.models import Predictor
from service.schemas.fits import PredictorMetrics
from service.testing.tiny import TinyProfile
from tests.service.test_client import LiveServer, Served, served
from tests.service.test_openapi_types import extras


@pytest.fixture
def server(migrated_url: str, tiny_profile: TinyProfile, live_server: LiveServer) -> Iterator[Served]:
    """`served` on each backend; importing needs no worker."""
    with served(migrated_url, tiny_profile, live_server, worker=WorkerSettings(embedded=False)) as running:
        yield running


def with_metrics(artifact: bytes, metrics: Any) -> bytes:
    """`artifact` with `metrics` in its header, its tensors and other header keys as they were."""
    header = read_header(artifact)
    extra = {**json.loads(header["extra"]), "metrics": metrics}
    return save_tensors(load_tensors(artifact), metadata={**header, "extra": json.dumps(extra)})


def import_and_read(server: Served, artifact: bytes) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The metrics the import answered, those `GET /v1/predictors/{id}` answers, and those stored."""
    with server.client("admin") as admin:
        imported = admin.import_predictor("tiny-cpu", artifact)
        answered = admin.predictor(imported.id).metrics
    with server.factory() as session:
        stored = session.scalar(select(Predictor.metrics).where(Predictor.id == imported.id))
    return dict(imported.metrics), dict(answered), stored


def assert_reads_back_typed(metrics: dict[str, Any]) -> None:
    """Every key is one the model names, at any depth, and every value fits its type."""
    typed = PredictorMetrics.model_validate(metrics)
    assert list(extras(typed)) == []
    assert typed.model_dump(mode="json") == metrics  # nothing was left out on reading


def test_junk_metrics_in_an_imported_artifact_are_left_out_and_logged(
    server: Served, tiny_profile: TinyProfile, caplog: pytest.LogCaptureFixture
) -> None:
    fitted = tiny_profile.fitted.metrics
    assert fitted["baselines"] and fitted["lpnet"]["count"] >= 1
    junk = {
        **fitted,
        "train_networks": "twelve",
        "labels": "seconds",
        "families": [1, 2],
        "fit_seconds": math.nan,  # JSON has no NaN: stored as null
        "lpnet": {**fitted["lpnet"], "count": "many", "colour": "red"},
        "baselines": [{**row, "r2": 0.5} for row in fitted["baselines"]],
        "note": {"free": "form"},
    }
    with caplog.at_level(logging.WARNING, logger="service.predictors"):
        imported, answered, stored = import_and_read(server, with_metrics(tiny_profile.fitted.artifact, junk))

    expected = {
        key: value for key, value in fitted.items() if key not in ("train_networks", "labels", "families")
    }
    expected["fit_seconds"] = None
    expected["lpnet"] = {key: value for key, value in fitted["lpnet"].items() if key != "count"}
    assert imported == answered == stored == expected
    assert_reads_back_typed(answered)
    [logged] = [record.getMessage() for record in caplog.records if record.name == "service.predictors"]
    dropped = logged.rsplit(": ", 1)[1].split(", ")
    assert sorted(dropped) == sorted(
        ["train_networks", "labels", "families", "lpnet.count", "lpnet.colour", "note"]
        + [f"baselines.{index}.r2" for index in range(len(fitted["baselines"]))]
    )


def test_an_exported_predictors_metrics_are_imported_whole(server: Served, tiny_profile: TinyProfile) -> None:
    imported, answered, stored = import_and_read(server, tiny_profile.fitted.artifact)
    assert imported == answered == stored == tiny_profile.fitted.metrics
    assert_reads_back_typed(answered)


@pytest.mark.parametrize("metrics", [["not", "an", "object"], "great", None])
def test_metrics_that_are_not_an_object_are_stored_as_none(
    server: Served, tiny_profile: TinyProfile, metrics: Any
) -> None:
    imported, answered, stored = import_and_read(server, with_metrics(tiny_profile.fitted.artifact, metrics))
    assert imported == answered == stored == {}
