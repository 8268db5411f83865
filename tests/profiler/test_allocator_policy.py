"""The allocator policy of a process, checked in fresh processes against what glibc actually does.

glibc's `mallinfo2` tells whether a block was mapped on its own (`hblkhd`): by default a 16 MiB block
is, while under the retain policy (mmap threshold at its 32 MiB ceiling) it comes from the heap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from profiler.environment import ALLOCATOR_ENVIRONMENT, AllocatorPolicy, Environment, collect_environment

RETAIN_ENVIRONMENT = dict(ALLOCATOR_ENVIRONMENT[AllocatorPolicy.RETAIN])
BLOCK = 16 * 2**20

# Allocates and frees one block before anything else is imported (so no earlier large free has moved
# glibc's adaptive threshold), then reports the policy the process says it runs under.
PROBE = f"""
import ctypes, json, sys

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped_block(size: int) -> bool:
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    mapped = libc.mallinfo2().hblkhd - before >= size
    libc.free(block)
    return mapped

report = {{"mapped": mapped_block({BLOCK})}}
from profiler import environment
from profiler.errors import AllocatorPolicyUnavailable

report["policy"] = environment.process_allocator_policy().value
report["applied"] = []
for step in sys.argv[1:]:
    if step == "fingerprint":
        report["retains"] = environment.collect_environment().allocator_retains_memory
        continue
    try:
        environment.apply_allocator_policy(environment.AllocatorPolicy(step))
        # Larger than any block freed before: glibc's own adaptive threshold stays below it.
        size = {BLOCK} + (len(report["applied"]) + 1) * 2**20
        outcome = {{"policy": environment.process_allocator_policy().value, "mapped": mapped_block(size)}}
    except AllocatorPolicyUnavailable as exc:
        outcome = {{"refused": exc.message, "details": exc.details}}
    report["applied"].append(outcome)
print(json.dumps(report))
"""


def probe(tmp_path: Path, *steps: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `PROBE` in a fresh process started with `environ` (and none of glibc's malloc variables)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *steps],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**env, **(environ or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_the_recipe_names_glibcs_variables_at_the_mallopt_settings() -> None:
    assert RETAIN_ENVIRONMENT == {
        "MALLOC_MMAP_THRESHOLD_": "33554432",
        "MALLOC_TRIM_THRESHOLD_": "1073741824",
    }
    assert dict(ALLOCATOR_ENVIRONMENT[AllocatorPolicy.SYSTEM]) == {}


def test_a_fresh_process_runs_under_system(tmp_path: Path) -> None:
    report = probe(tmp_path, "fingerprint")
    assert report == {"mapped": True, "policy": "system", "applied": [], "retains": False}


def test_the_environment_recipe_puts_a_fresh_process_under_retain(tmp_path: Path) -> None:
    report = probe(tmp_path, "fingerprint", "system", environ=RETAIN_ENVIRONMENT)
    # glibc took the settings (the block came from the heap), and the process says so, fingerprint too.
    assert report["mapped"] is False and report["policy"] == "retain" and report["retains"] is True
    # Such a process cannot measure for a system device.
    [system] = report["applied"]
    assert system["details"] == {"wanted": "system", "process": "retain"}
    assert "MALLOC_MMAP_THRESHOLD_" in system["refused"]


@pytest.mark.parametrize(("mmap_threshold", "retains"), [(64 * 2**20, True), (BLOCK, False)])
def test_thresholds_count_as_retain_from_the_recipes_values_up(
    tmp_path: Path, mmap_threshold: int, retains: bool
) -> None:
    environ = {**RETAIN_ENVIRONMENT, "MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}
    report = probe(tmp_path, environ=environ)
    assert report == {"mapped": not retains, "policy": "retain" if retains else "system", "applied": []}


def test_retain_applied_in_a_process_holds_and_cannot_be_undone(tmp_path: Path) -> None:
    report = probe(tmp_path, "retain", "system")
    assert report["mapped"] is True and report["policy"] == "system"
    retain, system = report["applied"]
    assert retain == {"policy": "retain", "mapped": False}  # mallopt took effect
    assert system["details"] == {"wanted": "system", "process": "retain"}
    assert "cannot be undone" in system["refused"]


def test_an_environment_tells_the_policy_it_ran_under() -> None:
    data = collect_environment().model_dump(mode="json")
    assert Environment.model_validate({**data, "allocator_retains_memory": True}).allocator_policy == "retain"
    assert (
        Environment.model_validate({**data, "allocator_retains_memory": False}).allocator_policy == "system"
    )
