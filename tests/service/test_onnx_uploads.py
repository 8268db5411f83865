"""Hostile ONNX files posted to a real server on loopback: 422 with a code, and nothing of the server's files.

The files come from tests/lpnet/onnx_hostile.py; tests/lpnet/test_onnx_io_*.py check the same refusals in
the reader itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from lpnet.arch.onnx_io.limits import MAX_NODES
from service.config import Settings, WorkerSettings
from service.main import create_app
from tests.lpnet.onnx_hostile import (
    EXTERNAL_DATA_MODELS,
    LOCATIONS,
    MARKER,
    PlantedFiles,
    opened_files,
    plant_secret_files,
    refused_files,
    relu_chain,
)
from tests.service.support import Api
from tests.service.test_health_api import assert_error_shape

LiveServer = Callable[[FastAPI], AbstractContextManager[str]]
Upload = Callable[[bytes], httpx.Response]


@pytest.fixture
def upload(api_with_predictor: Api, migrated_url: str, live_server: LiveServer) -> Iterator[Upload]:
    """POST a file to /v1/latency/onnx of a live server, for a device that has a predictor."""
    app = create_app(Settings(database_url=migrated_url, worker=WorkerSettings(embedded=False)))
    headers = api_with_predictor.headers(api_with_predictor.keys.reader)
    with live_server(app) as base_url, httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:

        def post(data: bytes) -> httpx.Response:
            return client.post(
                "/v1/latency/onnx",
                files={"file": ("model.onnx", data)},
                data={"device": api_with_predictor.device_name},
            )

        yield post


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PlantedFiles:
    files = plant_secret_files(tmp_path)
    monkeypatch.chdir(files.work)
    return files


def assert_refused(response: httpx.Response, code: str, case: str) -> dict[str, object]:
    assert (response.status_code, response.json().get("error", {}).get("code")) == (422, code), (
        f"{case}: {response.status_code} {response.text[:500]}"
    )
    return assert_error_shape(response, 422, code)


def test_external_data_is_refused_and_no_server_file_is_read(upload: Upload, planted: PlantedFiles) -> None:
    for place, build in sorted(EXTERNAL_DATA_MODELS.items()):
        for location in LOCATIONS:
            case = f"{place} at a {location} location"
            with opened_files(planted.secrets) as opened:
                response = upload(build(planted.location(location)).SerializeToString())
            error = assert_refused(response, "external_data_refused", case)
            assert error["details"]["tensor"] in str(error["message"]), case  # type: ignore[index]
            assert MARKER not in response.content and b"4242" not in response.content, case
            assert opened == [], case


def test_oversized_unsupported_and_malformed_files_are_422(upload: Upload) -> None:
    for case, (data, code) in refused_files().items():
        assert_refused(upload(data), code, case)


def test_a_hundred_thousand_node_upload_is_refused_quickly(upload: Upload) -> None:
    data = relu_chain(100_000)
    started = time.perf_counter()
    response = upload(data)
    elapsed = time.perf_counter() - started
    error = assert_refused(response, "onnx_limit_exceeded", "100,000 nodes")
    assert error["details"] == {"limit": "nodes", "found": 100_000, "maximum": MAX_NODES}
    assert elapsed < 5.0
