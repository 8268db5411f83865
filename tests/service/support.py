"""Helpers for the API tests: a test client with keys on a migrated database, and budgets for plans.

The tiny network they measure and its profile come from `service.testing.tiny`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from lpnet.arch.ir import Network
from profiler.batch import Measurement
from profiler.device import DeviceSpec
from profiler.environment import collect_environment
from service.auth import create_api_key
from service.config import Settings, WorkerSettings
from service.db.models import Device, KeyScope
from service.db.session import make_engine, make_session_factory
from service.main import create_app
from service.predictors import FittedPredictor, store_predictor
from service.profiles import measurement_rows
from service.testing.tiny import TINY_SPEC


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
