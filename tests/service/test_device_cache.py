"""The device facts that decide where weights spill (its last-level cache and the block size past which
its allocator maps afresh) reach its fits: each from the newest profile run that recorded it, else from
its registration, and never an implausible client-supplied value."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from service.config import FitSettings
from service.db.models import ProfileRun, RunSource
from service.devices import create_device
from service.predictors import fit_configs
from service.schemas.devices import DeviceCreate
from service.training_set import device_spill_facts, training_samples


def _device(session: Session, environment: dict[str, Any]) -> int:
    device = create_device(session, DeviceCreate(name="box", hardware="EPYC", environment=environment))
    session.flush()
    return device.id


def _run(session: Session, device_id: int, environment: dict[str, Any]) -> None:
    session.add(
        ProfileRun(device_id=device_id, source=RunSource.LOCAL, status="completed", environment=environment)
    )
    session.flush()


def _cache_kb(session: Session, device_id: int) -> int | None:
    return device_spill_facts(session, device_id)["last_level_cache_kb"]


def test_the_newest_run_that_recorded_a_cache_decides_then_the_registration(session: Session) -> None:
    device_id = _device(session, {"last_level_cache_kb": 1024})
    assert _cache_kb(session, device_id) == 1024
    _run(session, device_id, {"last_level_cache_kb": 32768})
    assert _cache_kb(session, device_id) == 32768
    _run(session, device_id, {"cpu": "EPYC"})  # a run of an older profiler, without the field
    assert _cache_kb(session, device_id) == 32768
    _run(session, device_id, {"last_level_cache_kb": 16384})
    assert _cache_kb(session, device_id) == 16384
    set_ = training_samples(session, device_id)
    assert set_.last_level_cache_kb == 16384 and set_.describe()["last_level_cache_kb"] == 16384


def test_each_fact_comes_from_the_newest_run_that_recorded_it(session: Session) -> None:
    device_id = _device(session, {"last_level_cache_kb": 491520})
    assert device_spill_facts(session, device_id) == {"last_level_cache_kb": 491520, "fresh_mapping_kb": None}
    _run(session, device_id, {"last_level_cache_kb": 491520, "fresh_mapping_kb": 32768})
    _run(session, device_id, {"last_level_cache_kb": 262144})  # a profiler that did not record the other
    assert device_spill_facts(session, device_id) == {
        "last_level_cache_kb": 262144,
        "fresh_mapping_kb": 32768,
    }
    set_ = training_samples(session, device_id)
    assert (set_.fresh_mapping_kb, set_.describe()["fresh_mapping_kb"]) == (32768, 32768)


@pytest.mark.parametrize("key", ["last_level_cache_kb", "fresh_mapping_kb"])
@pytest.mark.parametrize("value", [True, "32768", 32768.5, -1, 0, 10**12, None])
def test_an_implausible_value_is_not_believed(session: Session, key: str, value: object) -> None:
    device_id = _device(session, {key: value})
    assert device_spill_facts(session, device_id)[key] is None


def test_the_fit_config_carries_both_facts_and_spills_at_the_smaller() -> None:
    config, _ = fit_configs(FitSettings(members=3), last_level_cache_kb=491520, fresh_mapping_kb=32768)
    assert (config.members, config.last_level_cache_kb, config.spill_kb) == (3, 491520, 32768)
    config, _ = fit_configs(FitSettings(), last_level_cache_kb=16384, fresh_mapping_kb=32768)
    assert config.spill_kb == 16384
    assert fit_configs(FitSettings(), fresh_mapping_kb=32768)[0].spill_kb == 32768
    assert fit_configs(FitSettings())[0].spill_kb is None
