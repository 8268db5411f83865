"""The device's last-level cache reaches its fits: from its newest profile run that recorded one, else
from its registration, and never an implausible client-supplied value."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from service.config import FitSettings
from service.db.models import ProfileRun, RunSource
from service.devices import create_device
from service.predictors import fit_configs
from service.schemas.devices import DeviceCreate
from service.training_set import device_cache_kb, training_samples


def _device(session: Session, environment: dict[str, Any]) -> int:
    device = create_device(session, DeviceCreate(name="box", hardware="EPYC", environment=environment))
    session.flush()
    return device.id


def _run(session: Session, device_id: int, environment: dict[str, Any]) -> None:
    session.add(
        ProfileRun(device_id=device_id, source=RunSource.LOCAL, status="completed", environment=environment)
    )
    session.flush()


def test_the_newest_run_that_recorded_a_cache_decides_then_the_registration(session: Session) -> None:
    device_id = _device(session, {"last_level_cache_kb": 1024})
    assert device_cache_kb(session, device_id) == 1024
    _run(session, device_id, {"last_level_cache_kb": 32768})
    assert device_cache_kb(session, device_id) == 32768
    _run(session, device_id, {"cpu": "EPYC"})  # a run of an older profiler, without the field
    assert device_cache_kb(session, device_id) == 32768
    _run(session, device_id, {"last_level_cache_kb": 16384})
    assert device_cache_kb(session, device_id) == 16384
    set_ = training_samples(session, device_id)
    assert set_.last_level_cache_kb == 16384 and set_.describe()["last_level_cache_kb"] == 16384


@pytest.mark.parametrize("value", [True, "32768", 32768.5, -1, 0, 10**12, None])
def test_an_implausible_cache_is_not_believed(session: Session, value: object) -> None:
    device_id = _device(session, {"last_level_cache_kb": value})
    assert device_cache_kb(session, device_id) is None


def test_the_fit_config_carries_the_cache() -> None:
    config, _ = fit_configs(FitSettings(members=3), last_level_cache_kb=32768)
    assert (config.members, config.last_level_cache_kb) == (3, 32768)
    assert fit_configs(FitSettings())[0].last_level_cache_kb is None
