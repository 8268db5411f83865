"""Where measurements go as soon as they finish: memory, a JSONL file, or the service over HTTP.

A sink knows which sample keys it already holds (so a rerun skips them) and makes every row
durable before `write` returns, so an interrupted run loses at most the measurement in flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
from pydantic import ValidationError

from profiler.batch import MAX_BATCH_ROWS, Measurement, ProfileBatch, RunContext
from profiler.errors import SinkError

logger = logging.getLogger(__name__)


@runtime_checkable
class MeasurementSink(Protocol):
    """The contract the runner writes to (the service implements a database sink with it)."""

    def done_keys(self) -> set[str]:
        """Sample keys this sink already holds, failed ones included."""
        ...

    def write(self, measurement: Measurement) -> None:
        """Store one measurement durably before returning."""
        ...

    def close(self) -> None:
        """Flush and release resources; the sink is not used afterwards."""
        ...


class MemorySink:
    """Keeps measurements in a list (tests, and callers that post-process in Python)."""

    def __init__(self, measurements: list[Measurement] | None = None) -> None:
        self.measurements: list[Measurement] = list(measurements or [])
        self.closed = False

    def done_keys(self) -> set[str]:
        return {m.sample_key for m in self.measurements}

    def write(self, measurement: Measurement) -> None:
        self.measurements.append(measurement)

    def close(self) -> None:
        self.closed = True


def _fsync_append(handle: Any, line: str) -> None:
    handle.write(line)
    handle.flush()
    os.fsync(handle.fileno())


def _read_records(path: Path) -> Iterator[dict[str, Any]]:
    """JSON objects of a JSONL file; a torn last line (a crash mid-write) is skipped with a warning."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d is not valid JSON (interrupted write?); skipped", path.name, number)
                continue
            if isinstance(record, dict):
                yield record


class JsonlSink:
    """Appends one JSON line per measurement, fsynced; resumes by reading the keys back.

    Lines are `{"context": {...}}` (written when a sink opens with a context) or
    `{"measurement": {...}}`; `read_jsonl` gives them back.
    """

    def __init__(self, path: str | os.PathLike[str], context: RunContext | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keys = {
            str(record["measurement"].get("sample_key"))
            for record in _read_records(self.path)
            if isinstance(record.get("measurement"), dict)
        }
        self._handle = self.path.open("a+", encoding="utf-8")
        # A crash mid-line leaves no newline at the end; start a fresh line so the next row parses.
        self._handle.seek(0, os.SEEK_END)
        if self._handle.tell() > 0:
            self._handle.seek(self._handle.tell() - 1)
            if self._handle.read(1) != "\n":
                _fsync_append(self._handle, "\n")
        if context is not None:
            _fsync_append(self._handle, json.dumps({"context": context.model_dump(mode="json")}) + "\n")

    def done_keys(self) -> set[str]:
        return set(self._keys)

    def write(self, measurement: Measurement) -> None:
        if self._handle.closed:
            raise SinkError(f"{self.path} is closed")
        _fsync_append(self._handle, json.dumps({"measurement": measurement.model_dump(mode="json")}) + "\n")
        self._keys.add(measurement.sample_key)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


def read_jsonl(path: str | os.PathLike[str]) -> tuple[list[RunContext], list[Measurement]]:
    """Contexts and measurements of a JSONL file written by `JsonlSink`, in file order."""
    contexts: list[RunContext] = []
    measurements: list[Measurement] = []
    for record in _read_records(Path(path)):
        if "context" in record:
            contexts.append(RunContext.model_validate(record["context"]))
        elif "measurement" in record:
            measurements.append(Measurement.model_validate(record["measurement"]))
    return contexts, measurements


# HTTP ------------------------------------------------------------------------------------------------

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403, 404})


def batch_idempotency_key(device_id: str, sample_keys: list[str]) -> str:
    """Deterministic per content: the same rows for the same device always get the same key."""
    digest = hashlib.sha256(json.dumps([device_id, sorted(sample_keys)]).encode()).hexdigest()
    return f"pb-{digest[:40]}"


class HttpSink:
    """Posts measurements in batches to `{url}/v1/devices/{device_id}/profiles`.

    Durability: each row is first appended (fsynced) to `spool_dir/journal.jsonl`; a full batch is
    sealed into `spool_dir/pending/<idempotency key>.json` and then posted with exponential backoff.
    A batch that cannot be delivered stays pending and is posted when the sink next opens (or on
    `close`). Rows the server refuses (4xx other than auth) move to `spool_dir/rejected/`.
    The same idempotency key is reused on every retry, so a server that keeps its contract
    ("same key -> stored once, same response") never stores a batch twice.

    Raises SinkError at once on 401/403/404: a wrong key or device id is not a network blip.
    """

    def __init__(
        self,
        url: str,
        device_id: str,
        api_key: str,
        context: RunContext,
        spool_dir: str | os.PathLike[str],
        batch_size: int = 50,
        timeout: float = 30.0,
        max_retries: int = 5,
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 30.0,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        flush_on_start: bool = True,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH_ROWS:
            raise ValueError(f"batch_size must be in 1..{MAX_BATCH_ROWS}, got {batch_size}")
        self.url = url.rstrip("/")
        self.device_id = device_id
        self.context = context
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self._sleep = sleep
        self._owns_client = client is None
        self._client = client or httpx.Client(timeout=timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self.spool = Path(spool_dir)
        self._pending_dir = self.spool / "pending"
        self._rejected_dir = self.spool / "rejected"
        for directory in (self._pending_dir, self._rejected_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._journal_path = self.spool / "journal.jsonl"
        self._sent_path = self.spool / "sent_keys.txt"
        self._sent: set[str] = set()
        if self._sent_path.exists():
            self._sent = {line.strip() for line in self._sent_path.read_text().splitlines() if line.strip()}
        self._buffer: list[Measurement] = []
        self.offline = False
        self.posted_batches = 0
        self.rejected_batches = 0
        self._recover_journal()
        self._journal = self._journal_path.open("a", encoding="utf-8")
        self._start_journal()
        if flush_on_start:
            self.flush_pending()

    @property
    def endpoint(self) -> str:
        return f"{self.url}/v1/devices/{self.device_id}/profiles"

    # Sink protocol -----------------------------------------------------------------------------------

    def done_keys(self) -> set[str]:
        keys = set(self._sent) | {m.sample_key for m in self._buffer}
        for _, batch in self._pending_batches():
            keys.update(m.sample_key for m in batch.measurements)
        return keys

    def write(self, measurement: Measurement) -> None:
        _fsync_append(self._journal, json.dumps({"measurement": measurement.model_dump(mode="json")}) + "\n")
        self._buffer.append(measurement)
        if len(self._buffer) >= self.batch_size:
            self._seal_buffer()
            self.flush_pending()

    def close(self) -> None:
        """Seal what is buffered and make a last delivery attempt; undelivered batches stay spooled."""
        if self._journal.closed:
            return
        self._seal_buffer()
        self.flush_pending()
        self._journal.close()
        if self._owns_client:
            self._client.close()
        pending = len(list(self._pending_dir.glob("*.json")))
        if pending:
            logger.warning(
                "%d batch(es) not delivered yet; they stay in %s for the next run", pending, self._pending_dir
            )

    def __enter__(self) -> HttpSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Spool -------------------------------------------------------------------------------------------

    def _recover_journal(self) -> None:
        """Rows journaled by an earlier process that never became a batch are sealed now,
        each under the context it was measured with."""
        groups: list[tuple[RunContext, list[Measurement]]] = []
        context = self.context
        for record in _read_records(self._journal_path):
            try:
                if "context" in record:
                    context = RunContext.model_validate(record["context"])
                elif "measurement" in record:
                    row = Measurement.model_validate(record["measurement"])
                    if row.sample_key in self._sent:
                        continue
                    if not groups or groups[-1][0] is not context:
                        groups.append((context, []))
                    groups[-1][1].append(row)
            except ValidationError as exc:
                logger.warning("unreadable journal row skipped: %s", exc)
        for group_context, rows in groups:
            logger.info("recovering %d journaled measurement(s) from an earlier run", len(rows))
            for start in range(0, len(rows), self.batch_size):
                self._seal(rows[start : start + self.batch_size], group_context)
        self._journal_path.unlink(missing_ok=True)

    def _start_journal(self) -> None:
        _fsync_append(self._journal, json.dumps({"context": self.context.model_dump(mode="json")}) + "\n")

    def _seal(self, rows: list[Measurement], context: RunContext | None = None) -> Path:
        key = batch_idempotency_key(self.device_id, [m.sample_key for m in rows])
        batch = ProfileBatch.build(key, context or self.context, rows)
        envelope = {"device_id": self.device_id, "batch": batch.model_dump(mode="json")}
        path = self._pending_dir / f"{key}.json"
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(envelope, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # a batch file is either complete or absent
        return path

    def _seal_buffer(self) -> None:
        if not self._buffer:
            return
        self._seal(self._buffer)
        self._buffer = []
        # Every journaled row is now inside a sealed batch file: start the journal afresh.
        self._journal.truncate(0)
        self._start_journal()

    def _pending_batches(self) -> list[tuple[Path, ProfileBatch]]:
        found = []
        for path in sorted(self._pending_dir.glob("*.json")):
            try:
                envelope = json.loads(path.read_text(encoding="utf-8"))
                if envelope.get("device_id") != self.device_id:
                    continue  # spooled for another device; left for a sink of that device
                found.append((path, ProfileBatch.model_validate(envelope["batch"])))
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("spooled batch %s is unreadable (%s); moved to rejected/", path.name, exc)
                os.replace(path, self._rejected_dir / path.name)
        return found

    # Delivery ----------------------------------------------------------------------------------------

    def flush_pending(self) -> int:
        """Post every spooled batch of this device; returns how many were delivered."""
        delivered = 0
        for path, batch in self._pending_batches():
            # While the server is down, one attempt per batch: the spool, not the run, waits.
            outcome = self._post(batch, retries=0 if self.offline else self.max_retries)
            if outcome == "stored":
                self._mark_sent(batch)
                path.unlink(missing_ok=True)
                delivered += 1
                self.offline = False
            elif outcome == "rejected":
                os.replace(path, self._rejected_dir / path.name)
                self.rejected_batches += 1
            else:
                self.offline = True
                break
        self.posted_batches += delivered
        return delivered

    def _mark_sent(self, batch: ProfileBatch) -> None:
        keys = [m.sample_key for m in batch.measurements]
        with self._sent_path.open("a", encoding="utf-8") as handle:
            _fsync_append(handle, "".join(f"{k}\n" for k in keys))
        self._sent.update(keys)

    def _post(self, batch: ProfileBatch, retries: int) -> str:
        """POST one batch; returns "stored", "rejected" or "unreachable"."""
        body = batch.model_dump_json().encode()
        headers = {
            **self._headers,
            "Idempotency-Key": batch.idempotency_key,
            "Content-Type": "application/json",
        }
        for attempt in range(retries + 1):
            retry_after: float | None = None
            try:
                response = self._client.post(self.endpoint, content=body, headers=headers)
            except httpx.TransportError as exc:
                logger.info(
                    "posting batch %s failed (%s), attempt %d", batch.idempotency_key, exc, attempt + 1
                )
            else:
                if response.is_success:
                    return "stored"
                if _key_already_used(response):
                    # The key is a hash of the batch's sample keys: the server already holds an earlier
                    # measurement of every one of them, and keeps that one.
                    logger.info(
                        "batch %s: its samples were stored by an earlier batch; the re-measured rows are dropped",
                        batch.idempotency_key,
                    )
                    return "stored"
                if response.status_code in FATAL_STATUS:
                    raise SinkError(
                        f"{self.endpoint} answered {response.status_code}: {response.text[:500]}; check the API key "
                        "and device id (the batch stays spooled)",
                        {"status": response.status_code},
                    )
                if response.status_code not in RETRYABLE_STATUS:
                    logger.error(
                        "batch %s rejected with %d: %s",
                        batch.idempotency_key,
                        response.status_code,
                        response.text[:1000],
                    )
                    (self._rejected_dir / f"{batch.idempotency_key}.error.txt").write_text(
                        f"{response.status_code}\n{response.text}", encoding="utf-8"
                    )
                    return "rejected"
                retry_after = _retry_after_seconds(response)
                logger.info(
                    "batch %s got %d, attempt %d", batch.idempotency_key, response.status_code, attempt + 1
                )
            if attempt < retries:
                delay = min(self.max_backoff_seconds, self.backoff_seconds * 2**attempt)
                delay = retry_after if retry_after is not None else delay * (0.5 + random.random() / 2)
                self._sleep(min(delay, self.max_backoff_seconds))
        return "unreachable"


def _key_already_used(response: httpx.Response) -> bool:
    """Whether the server refused the batch because its idempotency key came with another body."""
    if response.status_code != 409:
        return False
    try:
        error = response.json().get("error", {})
    except ValueError:
        return False
    return isinstance(error, dict) and error.get("code") == "idempotency_key_reused"


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
