from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from profiler import environment
from profiler.environment import (
    Environment,
    collect_environment,
    cpu_signature,
    non_finite_path,
    physical_cores,
)


def test_fingerprint_is_plain_serialisable_data() -> None:
    env = collect_environment({"backend": "torch-cpu", "threads": 1})
    assert env.logical_cores == os.cpu_count()
    assert 1 <= env.physical_cores <= env.logical_cores
    assert env.cpu_model and env.cpu_signature and env.cpu_signature.startswith(env.cpu_model)
    assert env.python.count(".") >= 1
    assert {"torch", "numpy", "onnxruntime"} <= set(env.packages)
    assert env.backend_settings == {"backend": "torch-cpu", "threads": 1}
    assert env.load_average is not None and len(env.load_average) == 3
    data = json.loads(env.model_dump_json())
    assert Environment.model_validate(data) == env


def test_the_cpu_signature_tells_generations_of_one_model_name_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = "processor\t: {n}\nmodel name\t: AMD EPYC\ncpu family\t: {family}\nmodel\t\t: {model}\n"
    block += "stepping\t: 1\ncache size\t: {cache} KB\n"
    signatures = []
    for family, model, cache in ((25, 17, 1024), (23, 49, 512)):
        cpuinfo = tmp_path / f"cpuinfo-{family}"
        # Two processors: the first one's fields are read.
        text = block.format(n=0, family=family, model=model, cache=cache)
        text += "\n" + block.format(n=1, family=99, model=99, cache=1)
        cpuinfo.write_text(text)
        monkeypatch.setattr(environment, "_CPUINFO", cpuinfo)
        signatures.append(cpu_signature())
    assert signatures == ["AMD EPYC / 25 / 17 / 1 / 1024 KB", "AMD EPYC / 23 / 49 / 1 / 512 KB"]
    bare = tmp_path / "cpuinfo-bare"
    bare.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    monkeypatch.setattr(environment, "_CPUINFO", bare)
    assert cpu_signature() == "Some CPU"


def test_physical_cores_is_at_least_one() -> None:
    assert physical_cores() >= 1


def test_the_fingerprint_records_non_finite_settings_as_none() -> None:
    env = collect_environment(
        {"threads": 1, "scale": math.nan, "clocks": [2.5, math.inf], "max": {"x": -math.inf}}
    )
    assert env.backend_settings == {"threads": 1, "scale": None, "clocks": [2.5, None], "max": {"x": None}}
    # Standard JSON throughout, which is what the service stores.
    json.dumps(env.model_dump(mode="json"), allow_nan=False)


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"cpu_max_mhz": math.inf}, ("cpu_max_mhz",), "finite number"),
        ({"load_average": [0.5, math.nan, 0.1]}, ("load_average", 1), "finite number"),
        ({"backend_settings": {"scale": math.nan}}, ("backend_settings", "scale"), "not a finite number"),
        (
            {"backend_settings": {"clocks": {"boost": [3.1, math.inf]}}},
            ("backend_settings", "clocks"),
            "boost.1 is not a finite number",
        ),
        ({"gpu_temperature": -math.inf}, ("gpu_temperature",), "not a finite number"),
        ({"gpu": {"clocks": [1.0, math.nan]}}, ("gpu",), "clocks.1 is not a finite number"),
    ],
)
def test_an_environment_with_a_non_finite_number_is_refused_naming_it(
    change: dict[str, Any], field: tuple[str | int, ...], message: str
) -> None:
    data = {**collect_environment().model_dump(mode="json"), **change}
    with pytest.raises(ValidationError) as info:
        Environment.model_validate(data)
    [error] = info.value.errors()
    assert error["loc"] == field and message in error["msg"]


def test_extra_keys_with_finite_numbers_are_kept() -> None:
    data = {**collect_environment().model_dump(mode="json"), "gpu": {"clocks": [1.0, 2]}}
    assert Environment.model_validate(data).model_extra == {"gpu": {"clocks": [1.0, 2]}}


def test_non_finite_path_names_the_first_nan_or_infinity() -> None:
    assert non_finite_path({"a": 1, "b": [0.5, {"c": math.nan}], "d": math.inf}) == "b.1.c"
    assert non_finite_path(math.inf) == ""
    assert non_finite_path({"a": [1, 2.5, "nan"], "b": None, "c": True}) is None


def _cache(root: Path, index: int, level: str, kind: str, size: str) -> None:
    entry = root / f"index{index}"
    entry.mkdir(parents=True)
    for name, value in (("level", level), ("type", kind), ("size", size)):
        (entry / name).write_text(value + "\n")


def test_the_last_level_cache_is_the_highest_data_or_unified_level(tmp_path: Path) -> None:
    _cache(tmp_path, 0, "1", "Data", "48K")
    _cache(tmp_path, 1, "1", "Instruction", "64K")
    _cache(tmp_path, 2, "2", "Unified", "2048K")
    _cache(tmp_path, 3, "3", "Unified", "32M")
    _cache(tmp_path, 4, "4", "Instruction", "1G")  # an instruction cache never counts
    _cache(tmp_path, 5, "x", "Unified", "garbage")  # unreadable entries are skipped
    assert environment.last_level_cache_kb(tmp_path) == 32 * 1024
    assert environment.last_level_cache_kb(tmp_path / "missing") is None


def test_the_fingerprint_records_the_last_level_cache_this_machine_lists() -> None:
    listed = environment.last_level_cache_kb()
    recorded = collect_environment().last_level_cache_kb
    assert recorded == listed
    assert recorded is None or recorded > 0


def test_glibc_maps_afresh_past_its_threshold_ceiling_unless_started_with_a_larger_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(environment, "_is_glibc", lambda: True)
    monkeypatch.setattr(environment, "_startup_environment", lambda: {"MALLOC_MMAP_THRESHOLD_": str(2**27)})
    assert environment.fresh_mapping_kb() == 128 * 1024
    assert environment.fresh_mapping_kb({}) == 32 * 1024  # an empty environment sets no threshold
    assert environment.fresh_mapping_kb({"MALLOC_MMAP_THRESHOLD_": str(2**20)}) == 32 * 1024
    assert environment.fresh_mapping_kb({"MALLOC_MMAP_THRESHOLD_": str(2**28)}) == 256 * 1024
    assert environment.fresh_mapping_kb({"MALLOC_MMAP_THRESHOLD_": "lots"}) == 32 * 1024
    monkeypatch.setattr(environment, "_is_glibc", lambda: False)
    assert environment.fresh_mapping_kb({}) is None


def test_the_fingerprint_records_the_mapping_threshold_of_this_process() -> None:
    assert collect_environment().fresh_mapping_kb == environment.fresh_mapping_kb()


# Times a dense 3x3 convolution of 45.6 MB of weights in a process that keeps freed memory, and
# prints the mapping threshold it records and the page faults a call took.
_CONVOLUTION_FAULTS = """
import resource
import torch
from profiler.environment import fresh_mapping_kb, retain_freed_memory
assert retain_freed_memory()
torch.set_num_threads(1)
layer = torch.nn.Conv2d(1152, 1152, 3, padding=1, bias=False).eval()
x = torch.randn(1, 1152, 7, 7)
with torch.inference_mode():
    for _ in range(2):
        layer(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        layer(x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(fresh_mapping_kb(), (after - before) // 3)
"""


def _convolution_faults(mmap_threshold: int | None) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    done = subprocess.run(
        [sys.executable, "-c", _CONVOLUTION_FAULTS], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    kb, faults = done.stdout.split()
    return int(kb), int(faults)


@pytest.mark.skipif(not environment._is_glibc(), reason="glibc's mmap threshold")
def test_past_the_recorded_mapping_threshold_a_convolution_faults_its_weights_in_on_every_call() -> None:
    pages = 1152 * 1152 * 9 * 4 // 4096
    kb, faults = _convolution_faults(None)
    assert kb == 32 * 1024 and faults >= 0.9 * pages
    # Started with a larger threshold, the process keeps it through `retain_freed_memory`, and
    # records it: the copy is taken from freed memory.
    kb, faults = _convolution_faults(2**28)
    assert kb == 256 * 1024 and faults < 0.1 * pages
