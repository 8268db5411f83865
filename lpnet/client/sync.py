"""The synchronous REST client: one server, one API key, retries of 429 and 503 after Retry-After."""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel

from lpnet.client.answers import (
    BatchLatency,
    Device,
    DeviceCreated,
    Job,
    JobAccepted,
    Latency,
    ModelUpload,
    Page,
    Plan,
    Predictor,
    ProfileSubmission,
)
from lpnet.client.architectures import Architecture, architecture_json, onnx_bytes, onnx_filename
from lpnet.client.errors import (
    ClientError,
    JobFailed,
    ServerUnreachable,
    WaitTimeout,
    api_error,
    retry_after_seconds,
)

DEFAULT_TIMEOUT_SECONDS = 60.0
DEFAULT_RETRIES = 3
# Longest Retry-After the client waits out by itself; a longer one (an hourly quota) is raised at once.
DEFAULT_MAX_RETRY_WAIT_SECONDS = 60.0
# Backoff without Retry-After: BASE * 2**attempt seconds, at most CAP.
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
RETRIED_STATUSES = frozenset({429, 503})

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class RetryEvent:
    """A retried request: passed to the client's ``on_retry`` before it waits ``wait_seconds``."""

    method: str
    path: str
    attempt: int
    wait_seconds: float
    status: int | None
    error: ClientError


class Client:
    """Synchronous client of one lpnet server, authenticated with one API key.

    Args:
        url: The server's base URL, e.g. ``http://127.0.0.1:8000``.
        key: An API key (``lpn_...``); reader keys read and plan, admin keys also register and upload.
        timeout: Seconds to wait for each answer.
        retries: How many times a 429 or 503 answer (or a failed connection of a GET) is retried.
        max_retry_wait: The longest ``Retry-After`` waited out; a longer one is raised at once.
        on_retry: Called before each retry's wait, e.g. to log it.
        transport: An httpx transport to send requests through (the network by default).
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retries: int = DEFAULT_RETRIES,
        max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT_SECONDS,
        on_retry: Callable[[RetryEvent], None] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self.on_retry = on_retry
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}", "User-Agent": "lpnet-client"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # Devices and profiles -----------------------------------------------------------------------

    def devices(self, *, limit: int | None = None) -> list[Device]:
        """Every device with its profiling counts, newest predictor and status, by name.

        Args:
            limit: Devices per request (1 to 500; the server's default without); every page is read.
        """
        return list(self._pages(Device, "/v1/devices", limit=limit))

    def device(self, device: int | str) -> Device:
        """One device by id or name."""
        return Device.model_validate(self._request("GET", f"/v1/devices/{_ref(device)}").json())

    def register_device(
        self,
        name: str,
        hardware: str,
        *,
        backend: str = "torch-cpu",
        threads: int = 1,
        batch_size: int = 1,
        dtype: str = "float32",
        allocator: str = "retain",
        environment: Mapping[str, Any] | None = None,
        is_local: bool = False,
    ) -> DeviceCreated:
        """Register a device (admin key); the answer holds its agent key, shown only this once.

        `allocator` is the policy its latencies hold under: retain (freed memory kept by the process) or
        system (the C library's default).
        """
        body = {
            "name": name,
            "hardware": hardware,
            "backend": backend,
            "threads": threads,
            "batch_size": batch_size,
            "dtype": dtype,
            "allocator": allocator,
            "environment": dict(environment or {}),
            "is_local": is_local,
        }
        return DeviceCreated.model_validate(self._request("POST", "/v1/devices", json=body).json())

    def submit_profiles(self, device: int | str, batch: BaseModel | Mapping[str, Any]) -> ProfileSubmission:
        """Submit a batch of measurements (`profiler.batch.ProfileBatch` or its JSON dict) for a device.

        Safe to repeat: the batch's idempotency key makes a replay store nothing (``replayed`` is set).
        """
        body = json.loads(batch.model_dump_json()) if isinstance(batch, BaseModel) else dict(batch)
        headers = {}
        if isinstance(body.get("idempotency_key"), str):
            headers["Idempotency-Key"] = body["idempotency_key"]
        response = self._request(
            "POST", f"/v1/devices/{_ref(device)}/profiles", json=body, headers=headers, idempotent=True
        )
        replayed = response.headers.get("idempotency-replayed") == "true"
        return ProfileSubmission.model_validate({**response.json(), "replayed": replayed})

    # Latency ------------------------------------------------------------------------------------

    def latency(
        self,
        device: int | str,
        architecture: Architecture,
        *,
        input_shape: Sequence[int] | None = None,
        plot: bool = False,
    ) -> Latency:
        """Predicted latency of an architecture on a device: total, interval and per-layer times.

        Args:
            architecture: A torchvision name, the IR, ONNX bytes or an ``.onnx`` path (uploaded), or an
                nn.Module (traced here).
            input_shape: ``(N, C, H, W)`` for a torchvision name (the server's default otherwise) or a
                module (required).
            plot: Also have the server render a per-layer bar chart: the answer's ``plot_url``, read
                with `latency_plot` (by this client's key, until the server lets it expire).
        """
        onnx = onnx_bytes(architecture)
        if onnx is not None:
            return self.latency_onnx(device, onnx, filename=onnx_filename(architecture), plot=plot)
        body: dict[str, Any] = {
            "device": device,
            "architecture": architecture_json(architecture, input_shape),
        }
        if plot:
            body["plot"] = True
        return Latency.model_validate(self._request("POST", "/v1/latency", json=body).json())

    def latency_onnx(
        self, device: int | str, data: bytes, *, filename: str = "model.onnx", plot: bool = False
    ) -> Latency:
        """Predicted latency of an ONNX model, uploaded as a file; `plot` as for `latency`."""
        form = {"device": str(device)}
        if plot:
            form["plot"] = "true"
        response = self._request(
            "POST",
            "/v1/latency/onnx",
            data=form,
            files={"file": (filename, data, "application/octet-stream")},
        )
        return Latency.model_validate(response.json())

    def latency_plot(self, answer_or_url: Latency | str) -> bytes:
        """The PNG of a latency answer's per-layer chart (asked for with ``plot=True``), by the answer or
        its ``plot_url``.

        Raises:
            ValueError: The answer has no ``plot_url``, or the URL is on another server than this
                client's (this client's key is sent to its own server only).
            NotFound: The plot expired, or was made for another key.
        """
        if isinstance(answer_or_url, Latency):
            if answer_or_url.plot_url is None:
                raise ValueError(
                    "this latency answer has no plot_url: ask for it with latency(..., plot=True)"
                )
            url = answer_or_url.plot_url
        else:
            url = answer_or_url
        return self._request("GET", self._own_path(url)).content

    def latency_batch(
        self,
        device: int | str,
        architecture: Architecture,
        widths: Sequence[Sequence[int]],
        *,
        input_shape: Sequence[int] | None = None,
    ) -> BatchLatency:
        """Predicted latencies of many width vectors (kept channels per group) of one architecture."""
        body = {
            "device": device,
            "architecture": architecture_json(architecture, input_shape),
            "widths": [[int(w) for w in vector] for vector in widths],
        }
        return BatchLatency.model_validate(self._request("POST", "/v1/latency/batch", json=body).json())

    # Plans and jobs -----------------------------------------------------------------------------

    def create_plan(
        self,
        device: int | str,
        architecture: Architecture,
        budget_ms: float,
        *,
        input_shape: Sequence[int] | None = None,
        **options: Any,
    ) -> JobAccepted:
        """Queue a pruning plan for a latency budget; wait for it with `wait_plan`.

        Args:
            options: The plan options the server takes: ``mode`` (``"architecture"`` or
                ``"weights"``), ``round_to``, ``verify``, ``model_id`` (uploaded weights),
                ``max_skew``, ``min_keep_ratio``, ``filters`` (``"l1"`` or ``"gates"``). Unset ones
                keep the server's defaults.
        """
        body = {
            "device": device,
            "architecture": architecture_json(architecture, input_shape),
            "budget_ms": budget_ms,
            "options": options,
        }
        return JobAccepted.model_validate(self._request("POST", "/v1/plans", json=body).json())

    def plan(self, plan_id: int) -> Plan:
        """A plan's status, progress and, once finished, its result or error."""
        return Plan.model_validate(self._request("GET", f"/v1/plans/{int(plan_id)}").json())

    def wait_plan(
        self,
        plan_id: int,
        *,
        progress: Callable[[Plan], None] | None = None,
        poll_seconds: float = 1.0,
        timeout: float | None = None,
    ) -> Plan:
        """Poll a plan until it finishes and return it.

        Args:
            progress: Called with the plan whenever its status or progress changes.
            poll_seconds: Time between polls.
            timeout: Most seconds to wait; None waits as long as it takes.

        Raises:
            JobFailed: The plan failed (its ``error`` says why).
            WaitTimeout: It had not finished after ``timeout`` seconds.
        """
        return _wait(lambda: self.plan(plan_id), progress, poll_seconds, timeout)

    def plan_model(self, plan_id: int, format: Literal["safetensors", "onnx"] = "safetensors") -> bytes:
        """The pruned model of a succeeded weights-mode plan: safetensors (`lpnet.pruning.load_pruned`
        reads it) or ONNX."""
        return self._request("GET", f"/v1/plans/{int(plan_id)}/model", params={"format": format}).content

    def plan_layers_chart(self, plan_id: int) -> bytes:
        """The PNG of a succeeded plan's layers: predicted latency and kept output channels of each,
        before and after pruning.

        Raises:
            Conflict: The plan has not succeeded (code ``plan_not_succeeded``).
        """
        return self._request("GET", f"/v1/plans/{int(plan_id)}/layers.png").content

    def plans(
        self, *, device: int | str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[Plan]:
        """The plans requested with this client's key, newest first, of one device and in one status
        if given; `limit` is the plans per request, as for `devices`."""
        return list(self._pages(Plan, "/v1/plans", limit=limit, device=device, status=status))

    def jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        device_id: int | None = None,
        limit: int | None = None,
    ) -> list[Job]:
        """The jobs, newest first, filtered by status, kind and device; `limit` is the jobs per request,
        as for `devices`."""
        filters = {"status": status, "kind": kind, "device_id": device_id}
        return list(self._pages(Job, "/v1/jobs", limit=limit, **filters))

    def job(self, job_id: int) -> Job:
        """A background job (a fit or a plan) by id."""
        return Job.model_validate(self._request("GET", f"/v1/jobs/{int(job_id)}").json())

    def wait_job(
        self,
        job_id: int,
        *,
        progress: Callable[[Job], None] | None = None,
        poll_seconds: float = 1.0,
        timeout: float | None = None,
    ) -> Job:
        """Poll a job until it finishes; like `wait_plan`."""
        return _wait(lambda: self.job(job_id), progress, poll_seconds, timeout)

    # Predictors ---------------------------------------------------------------------------------

    def fit(self, device: int | str) -> JobAccepted:
        """Queue a fit of a new predictor version on the device's measurements (admin key)."""
        response = self._request("POST", f"/v1/devices/{_ref(device)}/predictors")
        return JobAccepted.model_validate(response.json())

    def predictors(self, device: int | str, *, limit: int | None = None) -> list[Predictor]:
        """Every predictor version of a device, newest first; `limit` is the versions per request, as
        for `devices`."""
        return list(self._pages(Predictor, f"/v1/devices/{_ref(device)}/predictors", limit=limit))

    def predictor(self, predictor_id: int) -> Predictor:
        """One predictor: version, metrics and training fingerprint."""
        return Predictor.model_validate(self._request("GET", f"/v1/predictors/{int(predictor_id)}").json())

    def predictor_metrics(self, predictor_id: int) -> dict[str, Any]:
        """A predictor's accuracy metrics on held-out networks."""
        return dict(self.predictor(predictor_id).metrics)

    def predictor_plot(self, predictor_id: int) -> bytes:
        """The PNG of a predictor's predicted-vs-measured latencies."""
        return self._request("GET", f"/v1/predictors/{int(predictor_id)}/plot.png").content

    def predictor_artifact(self, predictor_id: int) -> bytes:
        """A predictor's safetensors artifact, as `lpnet.load_predictor` and `import_predictor` take it."""
        return self._request("GET", f"/v1/predictors/{int(predictor_id)}/artifact").content

    def import_predictor(self, device: int | str, artifact: bytes | os.PathLike[str]) -> Predictor:
        """Store an exported predictor artifact as the device's next version (admin key, or the
        device's agent key)."""
        data = artifact if isinstance(artifact, bytes) else Path(artifact).read_bytes()
        response = self._request(
            "POST",
            f"/v1/devices/{_ref(device)}/predictors/import",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return Predictor.model_validate(response.json())

    # Models -------------------------------------------------------------------------------------

    def upload_model(
        self,
        name: str,
        weights: bytes | os.PathLike[str] | Mapping[str, Any],
        *,
        architecture: Architecture | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> ModelUpload:
        """Upload weights for weights-mode plans (admin key); refer to them by the answer's ``id``.

        Args:
            weights: safetensors bytes, a path to a ``.safetensors`` file, or a state dict of tensors
                keyed ``"<layer>.<tensor>"`` (a torchvision model's ``state_dict()`` as it is).
            architecture: The architecture they belong to (as for `latency`, ONNX aside); plans with
                these weights then check that they match.
        """
        if isinstance(weights, bytes):
            data = weights
        elif isinstance(weights, os.PathLike):
            data = Path(weights).read_bytes()
        else:
            from safetensors.torch import save

            data = save({k: v.detach().contiguous() for k, v in weights.items()})
        form = {"name": name}
        if architecture is not None:
            form["architecture"] = json.dumps(architecture_json(architecture, input_shape))
        response = self._request(
            "POST",
            "/v1/models",
            data=form,
            files={"file": (f"{name}.safetensors", data, "application/octet-stream")},
        )
        return ModelUpload.model_validate(response.json())

    def model(self, model_id: int) -> ModelUpload:
        """An uploaded model's name, checksum, size and architecture."""
        return ModelUpload.model_validate(self._request("GET", f"/v1/models/{int(model_id)}").json())

    # Requests -----------------------------------------------------------------------------------

    def _own_path(self, url: str) -> str:
        """A URL the server answered with, as a path to request from it: a path as it is, and an absolute
        URL only when it is on this client's server.

        Raises:
            ValueError: An absolute URL on another server.
        """
        parsed = httpx.URL(url)
        if not parsed.is_absolute_url:
            return url
        base = self._http.base_url
        if (parsed.scheme, parsed.host, parsed.port) != (base.scheme, base.host, base.port) or not (
            parsed.path.startswith(base.path)
        ):
            raise ValueError(f"{url} is not on this client's server {base}; its API key is sent there only")
        relative = parsed.path[len(base.path.rstrip("/")) :]
        return relative + (f"?{parsed.query.decode()}" if parsed.query else "")

    def _pages(
        self, model: type[ModelT], path: str, *, limit: int | None, **filters: str | int | None
    ) -> Iterator[ModelT]:
        """Every item of a list, page after page: each request passes the previous page's
        ``next_cursor`` with the same filters, until a page has none."""
        params: dict[str, str | int] = {name: value for name, value in filters.items() if value is not None}
        if limit is not None:
            params["limit"] = limit
        cursor: str | None = None
        while True:
            query = params if cursor is None else {**params, "cursor": cursor}
            body = self._request("GET", path, params=query).json()
            # A server from before lists had pages answers the whole list at once.
            page = Page(items=body) if isinstance(body, list) else Page.model_validate(body)
            yield from (model.model_validate(item) for item in page.items)
            if page.next_cursor is None:
                return
            if page.next_cursor == cursor:
                raise ClientError(f"GET {path}: the server answered the same next_cursor twice")
            cursor = page.next_cursor

    def _request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request, retrying 429/503 answers (and connection failures when idempotent).

        Raises:
            ApiError: The server's error answer, as the subclass for its status.
            ServerUnreachable: No answer, after the retries of an idempotent request.
        """
        retry_connection = method == "GET" if idempotent is None else idempotent
        attempt = 0
        while True:
            error: ClientError
            status: int | None
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                error = ServerUnreachable(f"{method} {path}: no answer from {self._http.base_url}: {exc}")
                if not retry_connection:
                    raise error from exc
                status, wait = None, None
            else:
                if response.is_success:
                    return response
                error = api_error(response)
                if response.status_code not in RETRIED_STATUSES:
                    raise error
                status, wait = response.status_code, retry_after_seconds(response.headers.get("retry-after"))
            if wait is None:
                wait = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt)
            if attempt >= self.retries or wait > self.max_retry_wait:
                raise error
            attempt += 1
            if self.on_retry is not None:
                self.on_retry(RetryEvent(method, path, attempt, wait, status, error))
            time.sleep(wait)


def _ref(device: int | str) -> str:
    """A device id or name as one path segment."""
    return urllib.parse.quote(str(device), safe="")


FinishingT = TypeVar("FinishingT", Plan, Job)


def _wait(
    fetch: Callable[[], FinishingT],
    progress: Callable[[FinishingT], None] | None,
    poll_seconds: float,
    timeout: float | None,
) -> FinishingT:
    started = time.monotonic()
    seen: tuple[str, Any] | None = None
    while True:
        current = fetch()
        state = (current.status, current.progress)
        if progress is not None and state != seen:
            progress(current)
        seen = state
        if current.status == "failed":
            raise JobFailed(current)
        if current.finished:
            return current
        if timeout is not None and time.monotonic() - started + poll_seconds > timeout:
            raise WaitTimeout(current, timeout)
        time.sleep(poll_seconds)
