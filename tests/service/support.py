"""Helpers for the API tests: a tiny real network, its real measurements, and a test client with keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from lpnet.arch.from_torch import network_from_module
from lpnet.arch.ir import Network
from profiler.batch import Measurement, MeasurementKind, ProfileBatch, RunContext
from profiler.device import DeviceSpec
from profiler.environment import collect_environment
from profiler.protocol import TimingProtocol
from service.auth import create_api_key
from service.config import Settings, WorkerSettings
from service.db.models import Device, KeyScope
from service.db.session import make_engine, make_session_factory
from service.main import create_app
from service.predictors import FittedPredictor, store_predictor
from service.profiles import measurement_rows
from tests.networks import TinyResNet

TINY_INPUT_SHAPE = (1, 3, 32, 32)
# The spec every tiny measurement was taken with; a device registered with it accepts them.
TINY_SPEC = DeviceSpec(hardware="test-cpu", backend="torch-cpu", threads=1, batch_size=1, dtype="float32")


def tiny_module() -> TinyResNet:
    """The tiny residual net every service test measures, prunes and uploads."""
    return TinyResNet(width=32)


def tiny_network() -> Network:
    return network_from_module(tiny_module(), TINY_INPUT_SHAPE, name="tiny", family="tiny")


@dataclass(frozen=True)
class TinyProfile:
    """Real measurements of width variants of the tiny network, and a predictor fitted on them."""

    network: Network
    context: RunContext
    measurements: list[Measurement]
    fitted: FittedPredictor

    @property
    def network_measurements(self) -> list[Measurement]:
        return [m for m in self.measurements if m.kind is not MeasurementKind.ISOLATED]

    @property
    def one_per_architecture(self) -> list[Measurement]:
        """Whole-network rows with each architecture once: the in-context timing where there is one.

        A fit merges repeated timings of one architecture into one sample, so with these rows
        sample i is row i.
        """
        last = {m.architecture.content_hash: m for m in self.network_measurements if m.architecture}
        return [
            m for m in self.network_measurements if m.architecture and last[m.architecture.content_hash] is m
        ]

    def batch(self, key: str, measurements: list[Measurement] | None = None) -> ProfileBatch:
        return ProfileBatch.build(
            key, self.context, list(self.measurements if measurements is None else measurements)
        )

    def batch_json(self, key: str, measurements: list[Measurement] | None = None) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.batch(key, measurements).model_dump_json())
        return data


def measure_tiny_profile() -> TinyProfile:
    """Time ~34 width variants (4 with per-layer times) and 4 isolated layers, then fit (about 10 s)."""
    from lpnet.predictor.samples import NetworkSample
    from profiler.runner import make_run_context, run_profile
    from profiler.sampling import SamplingConfig, StratifiedSampler
    from profiler.sinks import MemorySink
    from service.config import FitSettings
    from service.predictors import fit_from_samples

    torch.set_num_threads(1)
    network = tiny_network()
    config = SamplingConfig(
        network_samples=34, in_context_samples=4, isolated_samples=4, lhs_block=8, min_ratio=0.2
    )
    sampler = StratifiedSampler({"tiny": network}, TINY_SPEC, config)
    sink = MemorySink()
    protocol = TimingProtocol.quick()
    backend = TINY_SPEC.create_backend()
    run_profile(TINY_SPEC, sampler, sink, protocol, progress=False, backend=backend)
    context = make_run_context(TINY_SPEC, protocol, backend)
    samples = [
        NetworkSample(
            network=m.architecture,
            latency_ms=float(m.median_ms),
            per_layer_ms={t.layer: t.ms for t in m.per_layer} if m.per_layer else None,
            family=m.family,
        )
        for m in sink.measurements
        if m.status == "ok" and m.architecture is not None and m.median_ms is not None
    ]
    fitted = fit_from_samples(samples, settings=FitSettings(steps=200, members=3))
    return TinyProfile(network, context, list(sink.measurements), fitted)


def feasible_budget(artifact: bytes, network: Network, share: float) -> float:
    """A budget `share` of the way from the predicted latency at minimum widths to the unpruned one.

    The tiny network's latency is mostly fixed overhead, so a plain share of the unpruned latency
    can fall below what its narrowest widths reach, depending on how a fit came out.
    """
    from lpnet.arch.groups import apply_width_vector, channel_layout
    from lpnet.gates.budget import width_grid
    from lpnet.predictor.artifact import load_predictor

    predictor = load_predictor(artifact)
    narrowest = apply_width_vector(network, list(width_grid(channel_layout(network)).min_widths))
    low, full = predictor.predict(narrowest).total_ms, predictor.predict(network).total_ms
    return low + share * (full - low)


@dataclass
class Keys:
    admin: str
    reader: str
    agent: str


@dataclass
class Api:
    """A test client on a migrated database, with admin and reader keys and one registered device."""

    app: FastAPI
    client: TestClient
    factory: sessionmaker[Session]
    keys: Keys
    device_id: int
    device_name: str
    extra: dict[str, Any] = field(default_factory=dict)

    def headers(self, key: str | None) -> dict[str, str]:
        return {} if key is None else {"Authorization": f"Bearer {key}"}

    def get(self, path: str, key: str | None = "admin", **kwargs: Any) -> httpx.Response:
        return self.client.get(path, headers=self._headers(key, kwargs), **kwargs)

    def post(self, path: str, key: str | None = "admin", **kwargs: Any) -> httpx.Response:
        return self.client.post(path, headers=self._headers(key, kwargs), **kwargs)

    def delete(self, path: str, key: str | None = "admin", **kwargs: Any) -> httpx.Response:
        return self.client.delete(path, headers=self._headers(key, kwargs), **kwargs)

    def _headers(self, key: str | None, kwargs: dict[str, Any]) -> dict[str, str]:
        """The key's header (``key`` is admin/reader/agent, a raw key, or None) and any given ones."""
        return {**self.headers(self._key(key)), **(kwargs.pop("headers", None) or {})}

    def _key(self, key: str | None) -> str | None:
        if key in ("admin", "reader", "agent"):
            return str(getattr(self.keys, key))
        return key

    def add_device(self, name: str, *, local: bool = True, spec: DeviceSpec = TINY_SPEC) -> tuple[int, str]:
        """Register a device through the API; returns its id and agent key."""
        response = self.post(
            "/v1/devices",
            json={"name": name, **spec.to_dict(), "is_local": local},
        )
        assert response.status_code == 201, response.text
        body = response.json()
        return int(body["id"]), str(body["agent_key"])

    def store_measurements(self, device_id: int, measurements: list[Measurement]) -> None:
        """Write measurements straight into the database (as a local profile run would)."""
        from service.db.models import ProfileRun, RunSource

        with self.factory() as session:
            run = ProfileRun(device_id=device_id, source=RunSource.LOCAL, status="completed")
            session.add(run)
            session.flush()
            for measurement in measurements:
                session.add_all(measurement_rows(measurement, device_id, run.id))
            session.commit()

    def store_predictor(self, device_id: int, fitted: FittedPredictor) -> int:
        with self.factory() as session:
            predictor = store_predictor(session, device_id, fitted)
            session.commit()
            return predictor.id


def tiny_device(name: str = "tiny-cpu") -> Device:
    """A local device with the spec every tiny measurement was taken with (not yet added to a session)."""
    return Device(
        name=name,
        hardware=TINY_SPEC.hardware,
        backend=TINY_SPEC.backend,
        threads=TINY_SPEC.threads,
        batch_size=TINY_SPEC.batch_size,
        dtype=TINY_SPEC.dtype,
        environment=collect_environment({"threads": 1}).model_dump(mode="json"),
        is_local=True,
    )


@contextmanager
def api_client(url: str, **settings: Any) -> Iterator[Api]:
    """An `Api` on the migrated database at `url`; background workers off unless asked for."""
    worker = settings.pop("worker", WorkerSettings(embedded=False))
    app = create_app(Settings(database_url=url, worker=worker, **settings))
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with factory() as session:
        admin = create_api_key(session, scope=KeyScope.ADMIN.value)[1]
        reader = create_api_key(session, scope=KeyScope.READER.value)[1]
        device = tiny_device()
        session.add(device)
        session.flush()
        agent = create_api_key(session, scope=KeyScope.AGENT.value, device=device)[1]
        session.commit()
        device_id = device.id
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield Api(app, client, factory, Keys(admin, reader, agent), device_id, "tiny-cpu")
    finally:
        engine.dispose()
