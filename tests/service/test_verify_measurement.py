"""An agent's verify result, checked on arrival and judged at the predictor's nominal speed."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from profiler.speed import PROBE_VERSION
from service.agents.verify import verify_measurement
from service.schemas.agent import VerifyResult

HASH = "a" * 64


def result(**probe: Any) -> dict[str, Any]:
    return {"measured_ms": 6.0, "network_hash": HASH, **probe}


def test_a_probed_result_is_judged_at_the_nominal_speed() -> None:
    # Measured while the probe took 1.5 ms; the predictor's latencies are at a 1.0 ms probe.
    probed = result(probe_ms=1.5, relative_latency=4.0, probe_version=PROBE_VERSION)
    measured = verify_measurement(probed, nominal_probe_ms=1.0)
    assert measured.ms == pytest.approx(4.0)
    assert (measured.raw_ms, measured.probe_ms, measured.nominal_probe_ms) == (6.0, 1.5, 1.0)


def test_without_a_nominal_speed_or_a_current_probe_the_raw_median_is_judged() -> None:
    probed = result(probe_ms=1.5, relative_latency=4.0, probe_version=PROBE_VERSION)
    older = result(probe_ms=1.5, relative_latency=4.0, probe_version=PROBE_VERSION + 1)
    unprobed = verify_measurement(result(), 1.0)
    assert (unprobed.ms, unprobed.raw_ms, unprobed.probe_ms) == (6.0, 6.0, None)
    assert verify_measurement(older, 1.0).ms == 6.0 and verify_measurement(older, 1.0).probe_ms is None
    raw = verify_measurement(probed, None)
    assert (raw.ms, raw.probe_ms, raw.nominal_probe_ms) == (6.0, 1.5, None)


def test_probe_fields_come_all_together() -> None:
    VerifyResult.model_validate(result(probe_ms=1.5, relative_latency=4.0, probe_version=PROBE_VERSION))
    VerifyResult.model_validate(result())
    with pytest.raises(ValidationError, match="give all or none"):
        VerifyResult.model_validate(result(probe_ms=1.5))
    with pytest.raises(ValidationError, match="relative_latency"):
        VerifyResult.model_validate(result(probe_ms=1.5, relative_latency=-1.0, probe_version=1))
