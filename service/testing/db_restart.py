"""Scenario: the PostgreSQL cluster restarted while clients post profile batches through `HttpSink`."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from profiler.batch import Measurement, RunContext
from profiler.sinks import HttpSink, batch_idempotency_key
from service.testing.postgres import PostgresCluster, postmaster_started
from service.testing.processes import ServedApi
from service.testing.stored import count_stored, replicate_rows, stored_keys


@dataclass
class ResponseLog:
    """Statuses of every answer the clients got (an httpx response hook), and transport errors."""

    statuses: Counter[int] = field(default_factory=Counter)
    replays: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hook(self, response: httpx.Response) -> None:
        with self.lock:
            self.statuses[response.status_code] += 1
            self.replays += response.headers.get("Idempotency-Replayed") == "true"

    def successes(self) -> int:
        with self.lock:
            return sum(n for status, n in self.statuses.items() if 200 <= status < 300)


class ReadinessProbe(threading.Thread):
    """Polls /readyz every `interval` seconds and records (monotonic time, status or 0 on no answer)."""

    def __init__(self, base_url: str, interval: float = 0.05) -> None:
        super().__init__(name="readyz-probe", daemon=True)
        self.base_url = base_url
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self.stop.is_set():
                try:
                    status = client.get(f"{self.base_url}/readyz").status_code
                except httpx.TransportError:
                    status = 0
                self.samples.append((time.monotonic(), status))
                self.stop.wait(self.interval)

    def stop_once_ready(self, after: float, deadline: float) -> float | None:
        """Wait (until `deadline`) for a 200 after `after`, stop probing; returns when it came, if it did."""
        while time.monotonic() < deadline and not any(
            t > after and status == 200 for t, status in self.samples
        ):
            time.sleep(0.05)
        self.stop.set()
        self.join(5)
        return next((t for t, status in self.samples if t > after and status == 200), None)

    def unready_spell(self, after: float) -> tuple[float | None, float | None]:
        """First non-200 sample at or after `after`, and the first 200 after that one."""
        down = next((t for t, status in self.samples if t >= after and status != 200), None)
        if down is None:
            return None, None
        up = next((t for t, status in self.samples if t > down and status == 200), None)
        return down, up


def _submit_with_sink(
    api: ServedApi,
    device_id: int,
    key: str,
    context: RunContext,
    rows: Sequence[Measurement],
    spool: Path,
    batch_rows: int,
    pause: float,
    log: ResponseLog,
    deadline: float,
    errors: list[str],
) -> None:
    """One client: write `rows` through an HttpSink, then retry until its spool is empty."""
    client = httpx.Client(timeout=5.0, event_hooks={"response": [log.hook]})
    try:
        sink = HttpSink(
            api.base_url,
            str(device_id),
            key,
            context,
            spool,
            batch_size=batch_rows,
            backoff_seconds=0.1,
            max_backoff_seconds=1.0,
            max_retries=6,
            client=client,
        )
        for row in rows:
            sink.write(row)
            time.sleep(pause)
        sink.close()
        while list((spool / "pending").glob("*.json")):
            if time.monotonic() > deadline:
                errors.append(f"device {device_id}: batches still pending at the deadline")
                return
            time.sleep(0.2)
            HttpSink(
                api.base_url, str(device_id), key, context, spool, batch_size=batch_rows, client=client
            ).close()
        rejected = sorted(p.name for p in (spool / "rejected").iterdir())
        if rejected:
            errors.append(f"device {device_id}: batches rejected: {rejected}")
    except Exception as exc:  # reported by the caller; a thread must not die silently
        errors.append(f"device {device_id}: {type(exc).__name__}: {exc}")
    finally:
        client.close()


def expected_batch_keys(device_id: int, rows: Sequence[Measurement], batch_rows: int) -> set[str]:
    """The idempotency keys HttpSink gives `rows` written in order, `batch_rows` to a batch."""
    return {
        batch_idempotency_key(str(device_id), [m.sample_key for m in rows[i : i + batch_rows]])
        for i in range(0, len(rows), batch_rows)
    }


def storage_figures(database_url: str, rows: dict[int, list[Measurement]], batch_rows: int) -> dict[str, int]:
    """What the clients sent (rows per device, `batch_rows` to a batch) against what was stored."""
    counts = count_stored(database_url, list(rows))
    expected = {device_id: expected_batch_keys(device_id, rows[device_id], batch_rows) for device_id in rows}
    keys = {device_id: stored_keys(database_url, device_id) for device_id in rows}
    return {
        "batches_submitted": sum(len(keys) for keys in expected.values()),
        "rows_submitted": sum(len(r) for r in rows.values()),
        "batches_stored": sum(c["batches"] for c in counts.values()),
        "rows_stored": sum(c["rows"] for c in counts.values()),
        "rows_duplicated": sum(c["rows"] - c["distinct_rows"] for c in counts.values()),
        "batches_missing": sum(len(expected[d] - keys[d][0]) for d in expected),
        "batches_unexpected": sum(len(keys[d][0] - expected[d]) for d in expected),
        "rows_missing": sum(len({m.sample_key for m in rows[d]} - keys[d][1]) for d in expected),
    }


def postgres_restart_under_load(
    api: ServedApi,
    cluster: PostgresCluster,
    context: RunContext,
    source: Sequence[Measurement],
    workdir: Path,
    *,
    clients: int = 3,
    batches_per_client: int = 8,
    batch_rows: int = 5,
    pause: float = 0.02,
    restart_after_share: float = 0.3,
    timeout: float = 90.0,
) -> dict[str, Any]:
    """Clients post batches while the cluster restarts; returns what was sent, stored and seen.

    The cluster is started again in any case (``finally``) if the restart left it down.
    """
    devices = [api.register_device(f"restart-{i}-{os.getpid()}", context) for i in range(clients)]
    rows_per_client = batches_per_client * batch_rows
    rows = {
        device_id: replicate_rows(source, rows_per_client, f"rs-{device_id}") for device_id, _key in devices
    }
    log = ResponseLog()
    errors: list[str] = []
    probe = ReadinessProbe(api.base_url)
    started_before = postmaster_started(api.database_url)
    deadline = time.monotonic() + timeout
    threads = [
        threading.Thread(
            target=_submit_with_sink,
            args=(api, device_id, key, context, rows[device_id], workdir / f"spool-{device_id}", batch_rows),
            kwargs={"pause": pause, "log": log, "deadline": deadline, "errors": errors},
            name=f"client-{device_id}",
        )
        for device_id, key in devices
    ]
    total_batches = clients * batches_per_client
    began = time.monotonic()
    probe.start()
    restart_started = restart_done = float("nan")
    submitted_before_restart = 0
    try:
        for thread in threads:
            thread.start()
        while log.successes() < restart_after_share * total_batches:
            if time.monotonic() > deadline or not any(t.is_alive() for t in threads):
                raise RuntimeError(f"the clients stored too little before the restart: {errors}")
            time.sleep(0.02)
        submitted_before_restart = log.successes()
        restart_started = time.monotonic()
        cluster.restart()
        restart_done = time.monotonic()
    finally:
        cluster.ensure_running()
        for thread in threads:
            thread.join(max(1.0, deadline - time.monotonic()))
    wall = time.monotonic() - began
    ready_again = probe.stop_once_ready(restart_done, deadline)
    down, up = probe.unready_spell(restart_started)
    return {
        "clients": clients,
        "batch_rows": batch_rows,
        **storage_figures(api.database_url, rows, batch_rows),
        "batches_stored_before_restart": submitted_before_restart,
        "responses": {str(status): n for status, n in sorted(log.statuses.items())},
        "replayed_responses": log.replays,
        "client_errors": errors,
        "postmaster_restarted": postmaster_started(api.database_url) > started_before,
        "restart_seconds": round(restart_done - restart_started, 3),
        "api_unready_seconds": round(up - down, 3) if down is not None and up is not None else 0.0,
        "api_saw_outage": down is not None,
        "seconds_restart_start_to_ready": round(ready_again - restart_started, 3) if ready_again else None,
        "seconds_restart_done_to_ready": round(ready_again - restart_done, 3) if ready_again else None,
        "wall_seconds": round(wall, 3),
    }
