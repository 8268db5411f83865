"""The app: probes, the one error shape, request ids and the body size limit."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from lpnet.errors import InvalidWidthVector, UnknownModel
from service.config import Settings
from service.errors import Conflict
from service.main import create_app


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_error_shape(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    error: dict[str, object] = body["error"]
    return error


LiveServer = Callable[[FastAPI], AbstractContextManager[str]]


@pytest.fixture
def app(sqlite_migrated_url: str) -> FastAPI:
    return create_app(Settings(database_url=sqlite_migrated_url))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


class Echo(BaseModel):
    name: str
    threads: int


def add_test_routes(app: FastAPI) -> None:
    """Routes that raise each kind of error, to check what the handlers make of them."""

    @app.post("/test/echo")
    def echo(payload: Echo) -> Echo:
        return payload

    @app.post("/test/raw")
    async def raw(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    @app.get("/test/unknown-model")
    def unknown_model() -> None:
        raise UnknownModel("unknown torchvision model 'resnet19'", {"name": "resnet19"})

    @app.get("/test/width")
    def width() -> None:
        raise InvalidWidthVector("width vector has 3 entries, the network has 12 groups")

    @app.get("/test/conflict")
    def conflict() -> None:
        raise Conflict("a device named 'x' exists already")

    @app.get("/test/bug")
    def bug() -> None:
        raise RuntimeError("boom")

    @app.get("/test/log")
    def log() -> dict[str, str]:
        logging.getLogger("lpnet.test").warning("inside the request")
        return {"ok": "yes"}


def backend_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def test_probes_on_a_real_server(migrated_url: str, live_server: LiveServer) -> None:
    app = create_app(Settings(database_url=migrated_url))
    with live_server(app) as base_url:
        health = httpx.get(f"{base_url}/healthz", timeout=10)
        ready = httpx.get(f"{base_url}/readyz", timeout=10)
        docs = httpx.get(f"{base_url}/docs", timeout=10)
        missing = httpx.get(f"{base_url}/no/such/route", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "database": backend_of(migrated_url)}
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert_error_shape(missing, 404, "not_found")


def test_readyz_is_503_when_the_database_is_unreachable(live_server: LiveServer) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/lpnet"
    app = create_app(Settings(database_url=url))
    with live_server(app) as base_url:
        health = httpx.get(f"{base_url}/healthz", timeout=30)
        ready = httpx.get(f"{base_url}/readyz", timeout=30)
    assert health.status_code == 200
    error = assert_error_shape(ready, 503, "database_unavailable")
    assert "unreachable" in str(error["message"])
    assert error["details"] == {"backend": "postgresql"}


def test_a_request_that_needs_the_unreachable_database_gets_503_not_500(live_server: LiveServer) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/lpnet"
    app = create_app(Settings(database_url=url))
    with live_server(app) as base_url:
        # Checking the key reads the database.
        response = httpx.get(
            f"{base_url}/v1/devices", headers={"Authorization": "Bearer lpn_" + "x" * 43}, timeout=30
        )
    error = assert_error_shape(response, 503, "database_unavailable")
    assert "retry" in str(error["message"])
    assert response.headers["retry-after"] == "1"


def test_healthz_and_readyz_with_test_client(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok", "database": "sqlite"}


def test_docs_and_openapi_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/healthz", "/readyz"} <= set(schema["paths"])
    assert "ErrorResponse" in schema["components"]["schemas"]


def test_unknown_route_and_wrong_method_use_the_error_shape(client: TestClient) -> None:
    error = assert_error_shape(client.get("/v1/nothing-here"), 404, "not_found")
    assert error["details"] == {"method": "GET", "path": "/v1/nothing-here"}
    wrong_method = client.delete("/healthz")
    assert_error_shape(wrong_method, 405, "method_not_allowed")
    assert "GET" in wrong_method.headers["allow"]


def test_validation_errors_use_the_error_shape(app: FastAPI, client: TestClient) -> None:
    add_test_routes(app)
    error = assert_error_shape(client.post("/test/echo", json={"threads": "many"}), 422, "validation_error")
    fields = {item["field"] for item in error["details"]["errors"]}  # type: ignore[index]
    assert fields == {"body.name", "body.threads"}
    assert "body.name" in str(error["message"])

    malformed = client.post("/test/echo", content=b"{not json", headers={"content-type": "application/json"})
    assert_error_shape(malformed, 422, "validation_error")


def test_domain_errors_map_to_status_codes(app: FastAPI, client: TestClient) -> None:
    add_test_routes(app)
    error = assert_error_shape(client.get("/test/unknown-model"), 422, "unknown_model")
    assert error["details"] == {"name": "resnet19"}
    assert_error_shape(client.get("/test/width"), 422, "invalid_width_vector")
    assert_error_shape(client.get("/test/conflict"), 409, "conflict")


def test_unexpected_errors_are_500_with_the_request_id(app: FastAPI, client: TestClient) -> None:
    add_test_routes(app)
    response = client.get("/test/bug", headers={"X-Request-ID": "req-42"})
    error = assert_error_shape(response, 500, "internal_error")
    assert error["details"] == {"request_id": "req-42"}
    assert "boom" not in response.text
    assert response.headers["x-request-id"] == "req-42"


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    # Ids that could corrupt log lines are replaced rather than echoed.
    replaced = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert replaced != "bad id\twith spaces" and len(replaced) == 32
    assert client.get("/nowhere", headers={"X-Request-ID": "e-1"}).headers["x-request-id"] == "e-1"


def test_log_records_carry_the_request_id(
    app: FastAPI, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    add_test_routes(app)
    with caplog.at_level(logging.WARNING, logger="lpnet.test"):
        client.get("/test/log", headers={"X-Request-ID": "trace-7"})
    records = [record for record in caplog.records if record.getMessage() == "inside the request"]
    assert [record.request_id for record in records] == ["trace-7"]  # type: ignore[attr-defined]
    outside = logging.getLogger("lpnet.test").makeRecord("lpnet.test", logging.INFO, "f", 1, "x", (), None)
    assert outside.request_id == "-"  # type: ignore[attr-defined]


def test_request_bodies_over_the_limit_are_refused(sqlite_migrated_url: str) -> None:
    app = create_app(Settings(database_url=sqlite_migrated_url, max_request_bytes=100))
    add_test_routes(app)
    with TestClient(app) as client:
        assert client.post("/test/raw", content=b"x" * 100).json() == {"received": 100}

        declared = client.post("/test/raw", content=b"x" * 101)
        error = assert_error_shape(declared, 413, "request_too_large")
        assert error["details"] == {"max_bytes": 100, "content_length": 101}

        def chunks() -> Iterator[bytes]:
            for _ in range(5):
                yield b"y" * 40

        streamed = client.post("/test/raw", content=chunks())
        assert_error_shape(streamed, 413, "request_too_large")
        # A parsed JSON body is counted the same way.
        assert_error_shape(client.post("/test/echo", content=chunks()), 413, "request_too_large")
