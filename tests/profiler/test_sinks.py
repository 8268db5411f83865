from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lpnet.arch.ir import Layer, Op
from profiler.batch import Measurement, ProfileBatch, RunContext
from profiler.device import DeviceSpec
from profiler.environment import collect_environment
from profiler.errors import InvalidBatch, SinkError
from profiler.protocol import TimingProtocol
from profiler.sinks import HttpSink, JsonlSink, MeasurementSink, MemorySink, read_jsonl

API_KEY = "test-key-123"
DEVICE_ID = "dev-1"


def make_rows(n: int, start: int = 0) -> list[Measurement]:
    rows = []
    for i in range(start, start + n):
        layer = Layer(
            name="conv",
            op=Op.CONV2D,
            inputs=["input"],
            in_channels=8,
            out_channels=8 + i,
            in_hw=(8, 8),
            out_hw=(8, 8),
            kernel=(3, 3),
            padding=(1, 1),
        )
        rows.append(
            Measurement(
                sample_key=f"isolated-{i:08d}",
                kind="isolated",
                layer=layer,
                median_ms=1.0 + i,
                p10_ms=0.9 + i,
                p90_ms=1.2 + i,
                repetitions=10,
            )
        )
    return rows


@pytest.fixture(scope="module")
def context() -> RunContext:
    return RunContext(
        device=DeviceSpec(hardware="test-cpu"), environment=collect_environment(), protocol=TimingProtocol()
    )


class ProfileStore:
    """The service's contract, in miniature: same idempotency key -> stored once, same response."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.responses: dict[str, tuple[int, bytes]] = {}
        self.bodies: dict[str, bytes] = {}
        self.rows: list[str] = []
        self.requests = 0
        self.replays = 0
        self.fail_next = 0  # answer 503 to this many requests
        self.drop_after_store_next = 0  # store, then drop the connection without answering
        self.reject_all = False


class ProfileServer:
    def __init__(self, port: int = 0) -> None:
        self.store = ProfileStore()
        store = self.store

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with store.lock:
                    store.requests += 1
                    if self.path != f"/v1/devices/{DEVICE_ID}/profiles":
                        return self._answer(404, b'{"error": "no such device"}')
                    if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                        return self._answer(401, b'{"error": "bad key"}')
                    if store.fail_next > 0:
                        store.fail_next -= 1
                        return self._answer(503, b'{"error": "busy"}')
                    if store.reject_all:
                        return self._answer(422, b'{"error": "rejected"}')
                    try:
                        batch = ProfileBatch.from_json(body)
                    except InvalidBatch as exc:
                        return self._answer(422, json.dumps({"error": str(exc)}).encode())
                    key = batch.idempotency_key
                    assert self.headers.get("Idempotency-Key") == key
                    if key in store.responses and store.bodies[key] != body:
                        reused = {"error": {"code": "idempotency_key_reused", "message": "another body"}}
                        return self._answer(409, json.dumps(reused).encode())
                    if key in store.responses:
                        store.replays += 1
                        status, stored = store.responses[key]
                        return self._answer(status, stored)
                    store.rows.extend(m.sample_key for m in batch.measurements)
                    response = json.dumps(
                        {"batch": len(store.responses) + 1, "stored": len(batch.measurements)}
                    ).encode()
                    store.responses[key] = (201, response)
                    store.bodies[key] = body
                    if store.drop_after_store_next > 0:
                        store.drop_after_store_next -= 1
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return None
                    return self._answer(201, response)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[ProfileServer]:
    srv = ProfileServer()
    yield srv
    srv.stop()


def http_sink(url: str, context: RunContext, spool: Path, sleeps: list[float], **options: Any) -> HttpSink:
    values: dict[str, Any] = {"batch_size": 3, "max_retries": 4, "timeout": 5.0, "sleep": sleeps.append}
    values.update(options)
    return HttpSink(url, DEVICE_ID, API_KEY, context, spool, **values)


def test_sinks_satisfy_the_protocol(tmp_path: Path, context: RunContext, server: ProfileServer) -> None:
    jsonl = JsonlSink(tmp_path / "m.jsonl")
    http = http_sink(server.url, context, tmp_path / "spool", [])
    for sink in (MemorySink(), jsonl, http):
        assert isinstance(sink, MeasurementSink)
        sink.close()


def test_retry_after_server_errors_stores_the_batch_once(
    tmp_path: Path, context: RunContext, server: ProfileServer
) -> None:
    server.store.fail_next = 2
    sleeps: list[float] = []
    sink = http_sink(server.url, context, tmp_path / "spool", sleeps)
    for row in make_rows(3):
        sink.write(row)
    assert server.store.requests == 3
    assert server.store.rows == [r.sample_key for r in make_rows(3)]
    assert len(sleeps) == 2 and sleeps[1] >= sleeps[0] > 0  # exponential backoff
    assert sink.done_keys() == {r.sample_key for r in make_rows(3)}
    sink.close()
    assert not list((tmp_path / "spool" / "pending").iterdir())


def test_a_lost_response_is_retried_with_the_same_key_and_stored_once(
    tmp_path: Path, context: RunContext, server: ProfileServer
) -> None:
    server.store.drop_after_store_next = 1
    sink = http_sink(server.url, context, tmp_path / "spool", [])
    for row in make_rows(3):
        sink.write(row)
    sink.close()
    assert server.store.requests == 2
    assert server.store.replays == 1
    assert len(server.store.responses) == 1
    assert sorted(server.store.rows) == sorted(r.sample_key for r in make_rows(3))


def test_batches_spool_while_the_server_is_down_and_flush_on_next_start(
    tmp_path: Path, context: RunContext
) -> None:
    down = ProfileServer()
    port, url = down.port, down.url
    down.stop()  # nothing listens on the port now
    sleeps: list[float] = []
    sink = http_sink(url, context, tmp_path / "spool", sleeps, max_retries=2)
    rows = make_rows(7)
    for row in rows:
        sink.write(row)
    sink.close()
    pending = list((tmp_path / "spool" / "pending").glob("*.json"))
    assert len(pending) == 3  # 3 + 3 + 1 rows
    assert len(sleeps) == 2  # retried only the first batch; later ones waited in the spool
    reopened = http_sink(url, context, tmp_path / "spool", [], flush_on_start=False)
    assert reopened.done_keys() == {r.sample_key for r in rows}
    reopened.close()

    up = ProfileServer(port)
    try:
        again = http_sink(url, context, tmp_path / "spool", [])
        assert sorted(up.store.rows) == sorted(r.sample_key for r in rows)
        assert not list((tmp_path / "spool" / "pending").glob("*.json"))
        assert again.done_keys() == {r.sample_key for r in rows}
        again.close()
    finally:
        up.stop()


def test_rows_journaled_before_a_crash_are_delivered_by_the_next_sink(
    tmp_path: Path, context: RunContext, server: ProfileServer
) -> None:
    crashed = http_sink(server.url, context, tmp_path / "spool", [], batch_size=10)
    for row in make_rows(4):
        crashed.write(row)  # never closed: the process "dies" with the rows only in the journal
    assert server.store.rows == []
    recovered = http_sink(server.url, context, tmp_path / "spool", [], batch_size=10)
    assert sorted(server.store.rows) == sorted(r.sample_key for r in make_rows(4))
    recovered.close()


def test_a_refused_batch_is_set_aside_and_the_run_goes_on(
    tmp_path: Path, context: RunContext, server: ProfileServer
) -> None:
    server.store.reject_all = True
    sink = http_sink(server.url, context, tmp_path / "spool", [], batch_size=2)
    for row in make_rows(2):
        sink.write(row)
    assert sink.rejected_batches == 1
    server.store.reject_all = False
    for row in make_rows(2, start=2):
        sink.write(row)
    sink.close()
    assert server.store.rows == [r.sample_key for r in make_rows(2, start=2)]
    rejected = tmp_path / "spool" / "rejected"
    assert len(list(rejected.glob("*.json"))) == 1 and len(list(rejected.glob("*.error.txt"))) == 1


def test_re_measured_rows_under_a_used_key_count_as_delivered(
    tmp_path: Path, context: RunContext, server: ProfileServer
) -> None:
    first = http_sink(server.url, context, tmp_path / "first", [], batch_size=2)
    for row in make_rows(2):
        first.write(row)
    first.close()
    # A second run measures the same samples again: same sample keys (so the same idempotency key),
    # other timings. The server refuses the key's reuse; the samples are already stored.
    again = [row.model_copy(update={"median_ms": row.median_ms + 0.1}) for row in make_rows(2)]
    second = http_sink(server.url, context, tmp_path / "second", [], batch_size=2)
    for row in again:
        second.write(row)
    second.close()
    assert second.rejected_batches == 0
    assert server.store.rows == [r.sample_key for r in make_rows(2)]
    assert not list((tmp_path / "second" / "rejected").glob("*"))
    assert not list((tmp_path / "second" / "pending").glob("*"))


def test_a_wrong_api_key_stops_the_run_and_keeps_the_batch(
    tmp_path: Path, context: RunContext, server: ProfileServer
) -> None:
    sink = HttpSink(
        server.url, DEVICE_ID, "wrong", context, tmp_path / "spool", batch_size=1, sleep=lambda _seconds: None
    )
    with pytest.raises(SinkError, match="401"):
        sink.write(make_rows(1)[0])
    assert len(list((tmp_path / "spool" / "pending").glob("*.json"))) == 1


def test_jsonl_resumes_from_its_keys_and_survives_a_torn_line(tmp_path: Path, context: RunContext) -> None:
    path = tmp_path / "runs" / "m.jsonl"
    expected = make_rows(4)
    sink = JsonlSink(path, context)
    for row in expected[:3]:
        sink.write(row)
    sink.close()
    with path.open("a") as handle:
        handle.write('{"measurement": {"sample_key": "isolated-99')  # killed mid-write
    resumed = JsonlSink(path, context)
    assert resumed.done_keys() == {r.sample_key for r in make_rows(3)}
    resumed.write(expected[3])
    resumed.close()
    contexts, rows = read_jsonl(path)
    assert len(contexts) == 2 and contexts[0] == context
    assert rows == expected
