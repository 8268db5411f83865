"""The HTTP edge on a real server: keys checked before a body is read, per-route body limits, /metrics.

Requests a normal client cannot make (a body that never ends, or shorter than it declared) are sent
with h11 over a plain socket, and the answer is read while the body is still unfinished.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import h11
import httpx
import pytest
from safetensors.torch import save

from service.config import Settings, WorkerSettings
from service.main import FORM_FIELDS_ALLOWANCE, create_app
from service.testing.tiny import tiny_module
from tests.service.support import Keys, api_client
from tests.service.test_health_api import LiveServer, assert_error_shape

MIB = 1024 * 1024
# A request the server refuses early is answered within FAST_ANSWER_S of its last byte; one it
# would read to the end is never answered, and fails on ANSWER_TIMEOUT_S.
FAST_ANSWER_S = 5.0
ANSWER_TIMEOUT_S = 10.0


@pytest.fixture
def keys(sqlite_migrated_url: str) -> Iterator[Keys]:
    """Admin, reader and agent keys (of device tiny-cpu) in `sqlite_migrated_url`."""
    with api_client(sqlite_migrated_url) as api:
        yield api.keys


@contextmanager
def serving(live_server: LiveServer, url: str, **settings: Any) -> Iterator[str]:
    """A real server on the database at `url` with `settings`; yields its base URL."""
    app = create_app(Settings(database_url=url, worker=WorkerSettings(embedded=False), **settings))
    with live_server(app) as base_url:
        yield base_url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def unfinished_request(
    base_url: str, path: str, headers: list[tuple[str, str]], parts: list[bytes]
) -> tuple[httpx.Response, float]:
    """POST `parts` of a body that never ends (chunked, or shorter than a declared Content-Length).

    Returns:
        The server's answer, and the seconds it took after the last part was sent.
    """
    url = httpx.URL(base_url)
    connection = h11.Connection(h11.CLIENT)
    with socket.create_connection((url.host, url.port), timeout=ANSWER_TIMEOUT_S) as sock:
        request = h11.Request(method="POST", target=path, headers=[("Host", url.host), *headers])
        sock.sendall(connection.send(request))
        for part in parts:
            sock.sendall(connection.send(h11.Data(data=part)))
        sent = time.monotonic()
        status, response_headers, body = 0, [], b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status, response_headers = (
                    event.status_code,
                    [(k.decode(), v.decode()) for k, v in event.headers],
                )
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        return httpx.Response(status, headers=response_headers, content=body), time.monotonic() - sent


def multipart_head(boundary: str, fields: dict[str, str], filename: str) -> bytes:
    """The start of a multipart form: its text `fields`, then the headers of a file part."""
    text = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    )
    text += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return text.encode()


def test_a_key_is_checked_before_the_body_is_parsed(
    sqlite_migrated_url: str, keys: Keys, live_server: LiveServer
) -> None:
    with serving(live_server, sqlite_migrated_url) as base_url:
        json_headers = {"Content-Type": "application/json"}
        missing = httpx.post(f"{base_url}/v1/latency", content=b"{", headers=json_headers)
        unknown = httpx.post(
            f"{base_url}/v1/latency", content=b"{", headers={**json_headers, **bearer("lpn_" + "x" * 43)}
        )
        # With a valid key the same body gets as far as the parser.
        parsed = httpx.post(
            f"{base_url}/v1/latency", content=b"{", headers={**json_headers, **bearer(keys.reader)}
        )
    error = assert_error_shape(missing, 401, "unauthenticated")
    assert "missing API key" in str(error["message"])
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert_error_shape(unknown, 401, "unauthenticated")
    assert_error_shape(parsed, 422, "validation_error")


def test_every_route_that_needs_a_key_checks_it_before_the_body(
    sqlite_migrated_url: str, live_server: LiveServer
) -> None:
    app = create_app(Settings(database_url=sqlite_migrated_url, worker=WorkerSettings(embedded=False)))
    # The routes' security schemes stay declared, so /docs still offers to send a key.
    operations = [
        (method.upper(), re.sub(r"\{[^}]+\}", "1", path))
        for path, item in app.openapi()["paths"].items()
        for method, operation in item.items()
        if operation.get("security")
    ]
    assert len(operations) >= 25
    with live_server(app) as base_url, httpx.Client(base_url=base_url) as client:
        for method, path in operations:
            response = client.request(
                method, path, content=b"{", headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 401, (
                f"{method} {path}: {response.status_code} {response.text[:200]}"
            )


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_huge_unauthenticated_body_is_refused_without_being_read(
    sqlite_migrated_url: str, live_server: LiveServer, framing: str
) -> None:
    # A 100 MiB weights upload is within the route's body limit: only the missing key refuses it.
    framing_header = (
        ("Content-Length", str(100 * MIB))
        if framing == "content-length"
        else ("Transfer-Encoding", "chunked")
    )
    with serving(live_server, sqlite_migrated_url) as base_url:
        response, seconds = unfinished_request(
            base_url,
            "/v1/models",
            [("Content-Type", "multipart/form-data; boundary=b0undary"), framing_header],
            [multipart_head("b0undary", {"name": "w"}, "w.safetensors"), b"x" * 1024],
        )
    assert_error_shape(response, 401, "unauthenticated")
    assert response.headers["Connection"] == "close"
    assert seconds < FAST_ANSWER_S


def test_json_bodies_over_the_limit_are_413_naming_it(
    sqlite_migrated_url: str, keys: Keys, live_server: LiveServer
) -> None:
    big = b'{"device": "tiny-cpu", "padding": "' + b"x" * 2000 + b'"}'
    headers = {"Content-Type": "application/json", **bearer(keys.reader)}

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 500):
            yield big[start : start + 500]

    with serving(live_server, sqlite_migrated_url, max_json_bytes=1024) as base_url:
        declared = httpx.post(f"{base_url}/v1/latency", content=big, headers=headers)
        streamed = httpx.post(f"{base_url}/v1/latency", content=chunks(), headers=headers)
        under = httpx.post(f"{base_url}/v1/latency", json={"device": "tiny-cpu"}, headers=headers)
        endless, seconds = unfinished_request(
            base_url,
            "/v1/latency/batch",
            [
                ("Content-Type", "application/json"),
                ("Transfer-Encoding", "chunked"),
                *bearer(keys.reader).items(),
            ],
            [b'{"padding": "', *[b"x" * 512] * 3],
        )
    error = assert_error_shape(declared, 413, "request_too_large")
    assert error["details"] == {"max_bytes": 1024, "content_length": len(big)}
    assert "1024 bytes" in str(error["message"]) and "LPNET_MAX_JSON_BYTES" in str(error["message"])
    error = assert_error_shape(streamed, 413, "request_too_large")
    assert error["details"] == {"max_bytes": 1024}
    assert "LPNET_MAX_JSON_BYTES" in str(error["message"])
    assert_error_shape(under, 422, "validation_error")
    # Counted while it streams: refused before the body (which never ends) is complete.
    assert_error_shape(endless, 413, "request_too_large")
    assert seconds < FAST_ANSWER_S


def test_profile_batches_have_a_limit_of_their_own(
    sqlite_migrated_url: str, keys: Keys, live_server: LiveServer
) -> None:
    def body(size: int) -> bytes:
        return b'{"padding": "' + b"x" * (size - 15) + b'"}'

    headers = {"Content-Type": "application/json", **bearer(keys.agent)}
    with serving(
        live_server, sqlite_migrated_url, max_json_bytes=1024, max_profile_batch_bytes=4096
    ) as base_url:
        profiles = f"{base_url}/v1/devices/tiny-cpu/profiles"
        within = httpx.post(profiles, content=body(3000), headers=headers)
        over = httpx.post(profiles, content=body(5000), headers=headers)
        elsewhere = httpx.post(f"{base_url}/v1/agent/hello", content=body(3000), headers=headers)
    # Over the JSON limit but within the batch limit: the batch is parsed (and found invalid).
    assert_error_shape(within, 422, "validation_error")
    error = assert_error_shape(over, 413, "request_too_large")
    assert error["details"]["max_bytes"] == 4096  # type: ignore[index]
    assert "LPNET_MAX_PROFILE_BATCH_BYTES" in str(error["message"])
    assert "LPNET_MAX_JSON_BYTES" in str(assert_error_shape(elsewhere, 413, "request_too_large")["message"])


def test_onnx_uploads_are_limited_while_they_stream(
    sqlite_migrated_url: str, keys: Keys, live_server: LiveServer
) -> None:
    limit = 4096 + FORM_FIELDS_ALLOWANCE
    headers = bearer(keys.reader)
    form = {"device": "tiny-cpu"}
    with serving(live_server, sqlite_migrated_url, max_onnx_bytes=4096) as base_url:
        onnx = f"{base_url}/v1/latency/onnx"
        over = httpx.post(onnx, files={"file": ("big.onnx", b"x" * (limit + 1))}, data=form, headers=headers)
        # Within the body limit, but the file itself is over LPNET_MAX_ONNX_BYTES.
        file_over = httpx.post(onnx, files={"file": ("f.onnx", b"x" * 5000)}, data=form, headers=headers)
        under = httpx.post(onnx, files={"file": ("f.onnx", b"not onnx")}, data=form, headers=headers)
        endless, seconds = unfinished_request(
            base_url,
            "/v1/latency/onnx",
            [
                ("Content-Type", "multipart/form-data; boundary=b0undary"),
                ("Transfer-Encoding", "chunked"),
                *headers.items(),
            ],
            [
                multipart_head("b0undary", form, "endless.onnx"),
                *[b"x" * (64 * 1024)] * (limit // (64 * 1024) + 1),
            ],
        )
    error = assert_error_shape(over, 413, "request_too_large")
    assert error["details"]["max_bytes"] == limit  # type: ignore[index]
    assert "LPNET_MAX_ONNX_BYTES" in str(error["message"])
    error = assert_error_shape(file_over, 413, "request_too_large")
    assert error["details"] == {"max_bytes": 4096} and "LPNET_MAX_ONNX_BYTES" in str(error["message"])
    # Under the limits the form is parsed and the route runs, as far as the device's missing predictor.
    assert_error_shape(under, 409, "no_predictor")
    error = assert_error_shape(endless, 413, "request_too_large")
    assert error["details"] == {"max_bytes": limit}
    assert seconds < FAST_ANSWER_S


def test_weights_uploads_under_the_limit_work_and_over_it_are_413(
    sqlite_migrated_url: str, keys: Keys, live_server: LiveServer
) -> None:
    weights = save({"w": tiny_module().fc.bias.detach().contiguous()})
    assert len(weights) < 4096
    with serving(live_server, sqlite_migrated_url, max_weights_bytes=4096) as base_url:
        models = f"{base_url}/v1/models"
        stored = httpx.post(
            models, files={"file": ("w.safetensors", weights)}, data={"name": "w"}, headers=bearer(keys.admin)
        )
        over = httpx.post(
            models,
            files={"file": ("w.safetensors", b"x" * (4096 + FORM_FIELDS_ALLOWANCE + 1))},
            data={"name": "w"},
            headers=bearer(keys.admin),
        )
    assert stored.status_code == 201, stored.text
    assert stored.json()["size_bytes"] == len(weights)
    error = assert_error_shape(over, 413, "request_too_large")
    assert error["details"]["max_bytes"] == 4096 + FORM_FIELDS_ALLOWANCE  # type: ignore[index]
    assert "LPNET_MAX_WEIGHTS_BYTES" in str(error["message"])


def test_metrics_need_an_admin_key_while_probes_and_docs_stay_open(
    sqlite_migrated_url: str, keys: Keys, live_server: LiveServer
) -> None:
    with serving(live_server, sqlite_migrated_url) as base_url, httpx.Client(base_url=base_url) as client:
        assert client.post("/v1/latency", json={}).status_code == 401
        missing = client.get("/metrics")
        reader = client.get("/metrics", headers=bearer(keys.reader))
        admin = client.get("/metrics", headers=bearer(keys.admin))
        open_paths = {
            path: client.get(path).status_code for path in ("/healthz", "/readyz", "/docs", "/openapi.json")
        }
    assert_error_shape(missing, 401, "unauthenticated")
    assert_error_shape(reader, 403, "permission_denied")
    assert admin.status_code == 200
    # The guard's refusals are counted like every other answer.
    counted = [line for line in admin.text.splitlines() if line.startswith("http_requests_total{")]
    assert any('handler="/v1/latency"' in line and 'status="401"' in line for line in counted)
    assert open_paths == {"/healthz": 200, "/readyz": 200, "/docs": 200, "/openapi.json": 200}
