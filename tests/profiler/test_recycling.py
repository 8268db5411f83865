"""Measuring in recycled child processes: real children, real timings of tiny networks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lpnet.arch.ir import Network
from profiler.batch import MeasurementKind
from profiler.device import DeviceSpec
from profiler.environment import process_allocator_policy
from profiler.protocol import TimingProtocol
from profiler.recycling import ChildSetup, RecycledMeasurer, child_context
from profiler.runner import run_profile
from profiler.sampling import ListSampler, Sample
from profiler.sinks import MemorySink

NET, CTX = MeasurementKind.NETWORK, MeasurementKind.IN_CONTEXT

pytestmark = pytest.mark.slow


def samples(network: Network, device: DeviceSpec, kinds: tuple[MeasurementKind, ...]) -> list[Sample]:
    return [Sample.for_network(network, device, kind=kind, family=network.family) for kind in kinds]


def test_a_run_in_child_processes_measures_every_sample_with_the_probe(
    tiny_network: Network, tiny_mobile_network: Network, device: DeviceSpec, fast_protocol: TimingProtocol
) -> None:
    plan = samples(tiny_network, device, (NET, CTX)) + samples(tiny_mobile_network, device, (NET, CTX))
    sink = MemorySink()
    summary = run_profile(
        device, ListSampler(plan), sink, fast_protocol, progress=False, seconds_per_process=60.0
    )
    assert not summary.failures and summary.measured == 4
    assert {m.sample_key for m in sink.measurements} == {s.sample_key for s in plan}
    for m in sink.measurements:
        assert m.status == "ok" and m.median_ms is not None and m.median_ms > 0
        assert m.probe_version is not None  # the child built its own speed probe
        if m.kind is CTX:
            assert m.per_layer and {t.layer for t in m.per_layer} <= {
                layer.name for layer in tiny_network.layers
            } | {layer.name for layer in tiny_mobile_network.layers}


def test_children_are_replaced_once_they_reach_their_age(
    tiny_network: Network, device: DeviceSpec, fast_protocol: TimingProtocol
) -> None:
    setup = ChildSetup(device=device, allocator=process_allocator_policy(), speed_probe=False)
    measurer = RecycledMeasurer(setup, seconds_per_process=1e-3)
    try:
        pids = []
        for sample in samples(tiny_network, device, (NET, CTX, NET)):
            assert measurer(sample, fast_protocol).status == "ok"
            pids.append(measurer.child_pid)
    finally:
        measurer.close()
    assert measurer.children_started == 3
    assert len(set(pids)) == 3 and os.getpid() not in pids
    assert measurer.child_pid is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_children_are_forked_from_one_server_that_imported_torch_once(
    tiny_network: Network, device: DeviceSpec, fast_protocol: TimingProtocol
) -> None:
    assert child_context().get_start_method() == "forkserver"
    setup = ChildSetup(device=device, allocator=process_allocator_policy(), speed_probe=False)
    measurer = RecycledMeasurer(setup, seconds_per_process=1e-3)
    parents = []
    try:
        for sample in samples(tiny_network, device, (NET, NET)):
            assert measurer(sample, fast_protocol).status == "ok"
            assert measurer.child_pid is not None
            parents.append(parent_of(measurer.child_pid))
    finally:
        measurer.close()
    # Both children come from the same server, not from this process: torch was imported once, by the server.
    assert parents[0] == parents[1] != os.getpid()
    assert "forkserver" in Path(f"/proc/{parents[0]}/cmdline").read_text()


def test_a_child_that_dies_fails_its_sample_and_the_next_sample_gets_a_new_child(
    tiny_network: Network, device: DeviceSpec, fast_protocol: TimingProtocol
) -> None:
    setup = ChildSetup(device=device, allocator=process_allocator_policy(), speed_probe=False)
    measurer = RecycledMeasurer(setup, seconds_per_process=3600.0)
    first, second = samples(tiny_network, device, (NET, CTX))
    third = Sample.for_network(tiny_network, device, kind=NET, replicate=1)
    try:
        assert measurer(first, fast_protocol).status == "ok"
        pid = measurer.child_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        dead = measurer(second, fast_protocol)
        assert dead.status == "failed" and dead.sample_key == second.sample_key
        assert dead.error is not None and "measuring process died" in dead.error
        again = measurer(third, fast_protocol)
        assert again.status == "ok" and measurer.child_pid not in (None, pid)
    finally:
        measurer.close()
    assert measurer.children_started == 2


def test_seconds_per_process_must_be_positive(device: DeviceSpec) -> None:
    setup = ChildSetup(device=device, allocator=process_allocator_policy(), speed_probe=False)
    with pytest.raises(ValueError, match="seconds_per_process"):
        RecycledMeasurer(setup, seconds_per_process=0)


PARENT_THAT_IS_KILLED = """
import os, signal, sys
from lpnet.arch.from_torch import network_from_module
from profiler.batch import MeasurementKind
from profiler.device import DeviceSpec
from profiler.environment import process_allocator_policy
from profiler.protocol import TimingProtocol
from profiler.recycling import ChildSetup, RecycledMeasurer
from profiler.sampling import Sample
from service.testing.tiny import TinyResNet

device = DeviceSpec(hardware="test-cpu")
network = network_from_module(TinyResNet(), (1, 3, 32, 32), name="tiny", family="tiny")
measurer = RecycledMeasurer(ChildSetup(device, process_allocator_policy(), speed_probe=False), 3600.0)
sample = Sample.for_network(network, device, kind=MeasurementKind.NETWORK)
assert measurer(sample, TimingProtocol.quick()).status == "ok"
with open(sys.argv[1], "w") as out:
    out.write(str(measurer.child_pid))
os.kill(os.getpid(), signal.SIGKILL)
"""


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name: state, parent pid, ..."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def parent_of(pid: int) -> int:
    return int(stat_fields(pid)[1])


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        return stat_fields(pid)[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_does_not_outlive_a_parent_killed_with_sigkill(tmp_path: Path) -> None:
    pid_file, log = tmp_path / "child.pid", tmp_path / "parent.log"
    # Output to a file, not a pipe: a surviving child would hold a pipe open and stall the run.
    with log.open("w") as out:
        parent = subprocess.run(
            [sys.executable, "-c", PARENT_THAT_IS_KILLED, str(pid_file)], stdout=out, stderr=out, timeout=300
        )
    assert parent.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 15
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), f"measuring child {child} outlived its killed parent"
