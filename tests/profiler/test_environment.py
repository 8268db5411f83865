from __future__ import annotations

import json
import os

from profiler.environment import Environment, collect_environment, physical_cores


def test_fingerprint_is_plain_serialisable_data() -> None:
    env = collect_environment({"backend": "torch-cpu", "threads": 1})
    assert env.logical_cores == os.cpu_count()
    assert 1 <= env.physical_cores <= env.logical_cores
    assert env.cpu_model
    assert env.python.count(".") >= 1
    assert {"torch", "numpy", "onnxruntime"} <= set(env.packages)
    assert env.backend_settings == {"backend": "torch-cpu", "threads": 1}
    assert env.load_average is not None and len(env.load_average) == 3
    data = json.loads(env.model_dump_json())
    assert Environment.model_validate(data) == env


def test_physical_cores_is_at_least_one() -> None:
    assert physical_cores() >= 1
