"""Scenario: many agents posting the same overlapping batches at once, then replaying them all."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import httpx

from profiler.batch import Measurement, ProfileBatch, RunContext
from service.testing.processes import ServedApi
from service.testing.stored import count_stored, replicate_rows

# Answers a submitter retries with the same idempotency key (409: concurrent inserts kept colliding).
RETRIED_STATUS = frozenset({409, 500, 502, 503, 504})


def overlapping_batches(
    device_id: int, context: RunContext, rows: Sequence[Measurement], batch_rows: int, overlap: int
) -> list[ProfileBatch]:
    """Batches of `batch_rows` consecutive rows, each sharing `overlap` rows with the next one."""
    step = batch_rows - overlap
    return [
        ProfileBatch.build(f"cc-{device_id}-{start:06d}", context, list(rows[start : start + batch_rows]))
        for start in range(0, len(rows) - overlap, step)
    ]


def _post_until_final(
    client: httpx.Client, device_id: int, batch: ProfileBatch, retries: int
) -> httpx.Response | str:
    """POST one batch; transport errors, 5xx and 409 are retried with the same key.

    Returns the final response, or the last error when no attempt got one.
    """
    body = batch.model_dump_json().encode()
    error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(0.05 * 2**attempt)
        try:
            response = client.post(
                f"/v1/devices/{device_id}/profiles",
                content=body,
                headers={"Idempotency-Key": batch.idempotency_key},
            )
        except httpx.TransportError as exc:
            error = f"{type(exc).__name__}: {exc}"
            continue
        if response.status_code not in RETRIED_STATUS:
            return response
        error = f"{response.status_code} {response.text[:300]}"
    return error


def _post_batches(
    base_url: str,
    device_id: int,
    key: str,
    batches: Sequence[ProfileBatch],
    answers: list[tuple[str, int, bool, dict[str, Any]]],
    errors: list[str],
    lock: threading.Lock,
    retries: int = 8,
) -> None:
    """Post each batch until it gets a final answer; 201 answers go to `answers`, the rest to `errors`."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=base_url, timeout=30.0, headers=headers) as client:
        for batch in batches:
            outcome = _post_until_final(client, device_id, batch, retries)
            with lock:
                if isinstance(outcome, httpx.Response) and outcome.status_code == 201:
                    replayed = outcome.headers.get("Idempotency-Replayed") == "true"
                    answers.append((batch.idempotency_key, device_id, replayed, outcome.json()))
                else:
                    described = (
                        f"{outcome.status_code} {outcome.text[:300]}"
                        if isinstance(outcome, httpx.Response)
                        else outcome
                    )
                    errors.append(f"device {device_id} batch {batch.idempotency_key}: {described}")


def concurrent_submitters(
    api: ServedApi,
    context: RunContext,
    source: Sequence[Measurement],
    *,
    agents: int = 20,
    batches_per_agent: int = 4,
    batch_rows: int = 10,
    overlap: int = 5,
) -> dict[str, Any]:
    """`agents` devices, two threads each posting the same overlapping batches in opposite orders at once,
    then every batch replayed; returns what was sent, answered and stored."""
    devices = [api.register_device(f"agent-{i}-{os.getpid()}", context) for i in range(agents)]
    step = batch_rows - overlap
    row_count = step * batches_per_agent + overlap
    rows = {device_id: replicate_rows(source, row_count, f"cc-{device_id}") for device_id, _ in devices}
    batches = {
        device_id: overlapping_batches(device_id, context, rows[device_id], batch_rows, overlap)
        for device_id, _ in devices
    }
    answers: list[tuple[str, int, bool, dict[str, Any]]] = []
    errors: list[str] = []
    lock = threading.Lock()
    threads = []
    for device_id, key in devices:
        for order in (batches[device_id], batches[device_id][::-1]):
            threads.append(
                threading.Thread(
                    target=_post_batches, args=(api.base_url, device_id, key, order, answers, errors, lock)
                )
            )
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - began
    first_round = list(answers)
    # Every batch once more, one after another: each must be a replay with the first answer.
    replay_answers: list[tuple[str, int, bool, dict[str, Any]]] = []
    for device_id, key in devices:
        _post_batches(api.base_url, device_id, key, batches[device_id], replay_answers, errors, lock)
    counts = count_stored(api.database_url, [device_id for device_id, _ in devices])
    fresh = Counter(batch_key for batch_key, _d, replayed, _body in first_round if not replayed)
    first_body = {batch_key: body for batch_key, _d, replayed, body in first_round if not replayed}
    rows_stored = sum(c["rows"] for c in counts.values())
    return {
        "agents": agents,
        "threads": len(threads),
        "batches_per_agent": len(next(iter(batches.values()))),
        "batch_rows": batch_rows,
        "overlap_rows": overlap,
        "posts": len(first_round) + len(replay_answers),
        "batches_submitted": sum(len(b) for b in batches.values()),
        "batches_stored": sum(c["batches"] for c in counts.values()),
        "batches_stored_fresh_more_than_once": sum(1 for n in fresh.values() if n > 1),
        "batches_never_stored_fresh": sum(
            1 for b in batches.values() for batch in b if batch.idempotency_key not in fresh
        ),
        "replays_with_another_answer": sum(
            1 for batch_key, _d, _r, body in replay_answers if body != first_body.get(batch_key)
        ),
        "replays_not_marked": sum(1 for _k, _d, replayed, _b in replay_answers if not replayed),
        "rows_submitted": sum(len(r) for r in rows.values()),
        "rows_stored": rows_stored,
        "rows_duplicated": sum(c["rows"] - c["distinct_rows"] for c in counts.values()),
        "rows_stored_by_answers": sum(
            int(body["stored"]["network"]) for _k, _d, replayed, body in first_round if not replayed
        ),
        "errors": errors,
        "wall_seconds": round(wall, 3),
        "rows_per_second": round(rows_stored / wall, 1) if wall > 0 else None,
        "posts_per_second": round(len(first_round) / wall, 1) if wall > 0 else None,
    }
