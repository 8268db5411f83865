"""The server traces torchvision names in a child process, over real HTTP on loopback.

torch.fx patches module calls for the whole process while it traces: forward passes that other
threads of the server run meanwhile must not see that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lpnet.arch.from_torch import network_from_torchvision
from lpnet.errors import LpnetError
from service.config import Settings, WorkerSettings
from service.main import create_app
from service.testing.tiny import TINY_INPUT_SHAPE, TinyProfile, tiny_module
from service.tracing import TraceProcess, TracerUnavailable
from tests.service.support import api_client
from tests.service.test_architecture_limits import LiveLatency
from tests.service.test_health_api import LiveServer, assert_error_shape

SHAPE = [1, 3, 64, 64]


@pytest.fixture
def live(
    sqlite_migrated_url: str, live_server: LiveServer, tiny_profile: TinyProfile
) -> Iterator[LiveLatency]:
    """A real server whose device "tiny-cpu" has a predictor."""
    with api_client(sqlite_migrated_url) as api:
        api.store_measurements(api.device_id, tiny_profile.measurements)
        api.store_predictor(api.device_id, tiny_profile.fitted)
        app = create_app(Settings(database_url=sqlite_migrated_url, worker=WorkerSettings(embedded=False)))
        with live_server(app) as base_url:
            yield LiveLatency(api, base_url, app.state.latency)


def latency_of(live: LiveLatency, model: str) -> dict[str, object]:
    response = live.post(
        "/v1/latency", {"device": "tiny-cpu", "architecture": {"torchvision": model, "input_shape": SHAPE}}
    )
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_a_name_traced_in_the_child_is_the_network_traced_in_process(live: LiveLatency) -> None:
    body = latency_of(live, "mobilenet_v2")
    assert body["network_hash"] == network_from_torchvision("mobilenet_v2", SHAPE).content_hash
    assert live.latency.tracer.pid() != os.getpid()


def test_forward_passes_in_the_server_are_unaffected_while_a_model_is_traced(live: LiveLatency) -> None:
    live.latency.tracer.pid()  # the child is ready: the trace starts as soon as the request arrives
    module = tiny_module().eval()
    x = torch.randn(TINY_INPUT_SHAPE)
    with torch.no_grad():
        expected = module(x)
    tracing = threading.Event()
    tracing.set()
    outputs: list[torch.Tensor] = []

    def forward_until_traced() -> None:
        with torch.no_grad():
            while tracing.is_set() or len(outputs) < 200:
                outputs.append(module(x))

    with ThreadPoolExecutor(max_workers=1) as pool:
        forwards = pool.submit(forward_until_traced)
        try:
            latency_of(live, "densenet121")
        finally:
            tracing.clear()
        forwards.result()
    assert len(outputs) >= 200
    for output in outputs:
        torch.testing.assert_close(output, expected)


def test_untraceable_names_are_the_same_422_as_in_process(live: LiveLatency) -> None:
    for model, code in (("resnet19", "unknown_model"), ("maxvit_t", "invalid_architecture")):
        response = live.post(
            "/v1/latency",
            {"device": "tiny-cpu", "architecture": {"torchvision": model, "input_shape": SHAPE}},
        )
        error = assert_error_shape(response, 422, code)
        with pytest.raises(LpnetError) as in_process:
            network_from_torchvision(model, SHAPE)
        assert (error["message"], error["details"]) == (in_process.value.message, in_process.value.details)


def test_a_killed_child_is_replaced(live: LiveLatency) -> None:
    tracer = live.latency.tracer
    killed = tracer.pid()
    os.kill(killed, signal.SIGKILL)
    body = latency_of(live, "resnet18")
    assert body["network_name"] == "resnet18"
    assert tracer.pid() != killed


def test_a_trace_overrunning_its_timeout_is_stopped_and_the_child_replaced() -> None:
    tracer = TraceProcess(timeout_seconds=0.001)
    first = tracer.pid()
    with pytest.raises(TracerUnavailable) as overrun:
        tracer.trace("densenet121", SHAPE)
    assert overrun.value.status_code == 503
    assert overrun.value.details["model"] == "densenet121"
    tracer.timeout_seconds = 60
    assert tracer.trace("resnet18", SHAPE).name == "resnet18"
    assert tracer.pid() != first


def test_the_child_ends_when_its_server_is_killed() -> None:
    # A process standing in for the server: it starts the child, reports the child's pid, then waits.
    script = (
        "import sys, time\n"
        "from service.tracing import TraceProcess\n"
        "tracer = TraceProcess()\n"
        "print(tracer.pid(), flush=True)\n"
        "time.sleep(300)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        child = int(server.stdout.readline())
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.2)
        assert not _alive(child), f"the trace child {child} outlived its killed server"
    finally:
        server.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has ended; only its parent (init, once the server is gone) has yet to reap it.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stopping_kills_a_child_still_starting_and_the_next_trace_starts_another() -> None:
    script = (
        "import multiprocessing, time\n"
        "from service.tracing import TraceProcess\n"
        "tracer = TraceProcess()\n"
        "tracer.start()\n"
        "time.sleep(0.5)\n"  # the child is importing torch now
        "tracer.stop()\n"
        "deadline = time.monotonic() + 10\n"
        "while multiprocessing.active_children() and time.monotonic() < deadline:\n"
        "    time.sleep(0.1)\n"
        "print(len(multiprocessing.active_children()), flush=True)\n"
        "print(tracer.trace('resnet18', (1, 3, 64, 64)).name, flush=True)\n"
        "tracer.stop()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "resnet18"]
