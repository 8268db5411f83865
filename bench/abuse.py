"""Hostile input against a real server: what it answers, how long it takes, and whether /healthz stays quick.

The server is `lpnet serve` (uvicorn) in a subprocess on a free loopback port, on an SQLite database in
a temporary directory, with the first run off and a background worker in the process (a single-machine
deployment). Before it starts, this process registers this machine as a local device, times width
variants of a small residual network at 32x32 (quick protocol), fits a predictor on them, and creates
an admin and a reader key. The database also holds a placeholder admin key,
'lpn_change-me-change-me-change-me-change-me', as an active admin key: what `lpnet serve` stores when
LPNET_ADMIN_KEY is left at such a value and the server lets it through.

Then the cases below run one after the other while a separate process polls /healthz every 20 ms:

- a well-formed ONNX upload and torchvision name first, since the server imports onnx and torchvision
  on their first use (what that costs shows apart from the hostile cases);
- ONNX uploads with external data (relative, absolute and ``..`` paths), garbage bytes, a
  100,000-node graph, and a convolution declaring 10**9 output channels;
- an unauthenticated ``{``, an unauthenticated 100 MiB body (declared and chunked), and an
  authenticated JSON body over LPNET_MAX_JSON_BYTES (declared and chunked);
- JSON networks of 4,000 and 40,000 layers, with duplicate layer names, and with 10**400 dimensions;
- torchvision names that are too long, unknown, of the largest models, 32 of them at once, and two
  real ones at once at new input sizes (then each again alone, when both must trace);
- 50 plan requests from one reader key, and a plan with verify=true on the local device from a
  reader key;
- one idempotency key sent with two different profile batches, and NaN or Infinity in timing fields;
- the placeholder admin key, used against this server, and set as LPNET_ADMIN_KEY of a second one.

After the last case the poller keeps going for a few seconds while the worker runs the plans that
were accepted. Each case reports the status codes it got and its slowest answer; the run reports the
5xx count and the /healthz p50/p99/max. Targets: no 5xx, /healthz p99 under 50 ms; the exit status is 1
when one of them, or any case, is not met.

Every loop is bounded by a count and a time limit, and every address is loopback.

Usage:
    python -m bench.abuse                   # a minute or two, most of it measuring and fitting
    python -m bench.abuse --plans 10        # fewer plan requests
The table goes to stdout; the JSON to bench/results/abuse.json unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import select
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import httpx

from bench.reliability import machine
from service.testing.processes import Processes, free_port, lpnet_args, lpnet_env, wait_ready

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "abuse.json"
DEVICE = "abuse-cpu"
INPUT_SHAPE = (1, 3, 32, 32)
MIB = 1024 * 1024
# A placeholder of the kind deployment templates ship as an admin key's value.
PLACEHOLDER_ADMIN_KEY = "lpn_change-me-change-me-change-me-change-me"
# Larger than the default LPNET_MAX_JSON_BYTES (8 MiB), smaller than LPNET_MAX_REQUEST_BYTES (256 MiB).
OVER_JSON_LIMIT_BYTES = 16 * MIB
HEALTH_INTERVAL_S = 0.02
HEALTH_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
CASE_TIME_LIMIT_S = 120.0
TARGETS = {"server_errors": 0, "healthz_p99_ms": 50.0}
# Torchvision models of under 100 MB each, so that even built with real weights they fit in memory at once.
MID_SIZE_MODELS = (
    "resnet18",
    "resnet34",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "squeezenet1_0",
    "squeezenet1_1",
    "mnasnet0_5",
    "mnasnet1_0",
    "efficientnet_b0",
    "efficientnet_b1",
    "regnet_x_400mf",
    "regnet_x_800mf",
    "densenet121",
)
# Input sizes at which two models are traced at once.
PAIR_SIZES = (96, 104, 112, 120, 128, 136)
# The two largest torchvision classification models (632 M and 645 M parameters).
HUGE_MODELS = ("vit_h_14", "regnet_y_128gf")


# Answers and cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One request's outcome: its status, or what happened instead, and its round trip.

    Attributes:
        outcome: The HTTP status ("401"), "no answer", or for a server start "exit 2".
        seconds: From sending the request (or starting the server) to the outcome.
        note: Detail: the error code of a refusal, how much of a large body was sent, ...
    """

    outcome: str
    seconds: float
    note: str = ""

    @property
    def server_error(self) -> bool:
        return self.outcome.isdigit() and int(self.outcome) >= 500


def outcomes(*values: int | str) -> frozenset[str]:
    return frozenset(str(value) for value in values)


@dataclass
class Case:
    """A hostile case: what it sends, which outcomes are right, and what it got.

    Attributes:
        check: A condition on all answers together, on top of each being expected.
    """

    name: str
    sends: str
    expected: frozenset[str]
    run: Callable[[], list[Answer]]
    check: Callable[[list[Answer]], bool] | None = None
    answers: list[Answer] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    def execute(self) -> None:
        """Run the case; a client-side failure (the server gone, a refused connection) is its answer."""
        self.started = time.monotonic()
        try:
            self.answers = self.run()
        except (OSError, httpx.HTTPError, RuntimeError) as exc:
            self.answers = [
                Answer("no answer", time.monotonic() - self.started, f"{type(exc).__name__}: {exc}")
            ]
        finally:
            self.finished = time.monotonic()

    def outcomes(self) -> Counter[str]:
        return Counter(answer.outcome for answer in self.answers)

    def met(self) -> bool:
        expected = bool(self.answers) and all(answer.outcome in self.expected for answer in self.answers)
        return expected and (self.check is None or self.check(self.answers))


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def timed(send: Callable[[], httpx.Response]) -> Answer:
    """Send one request; a transport error is an answer without a status."""
    started = time.perf_counter()
    try:
        response = send()
    except httpx.TransportError as exc:
        return Answer("no answer", time.perf_counter() - started, type(exc).__name__)
    note = "" if response.status_code < 400 else _error_code(response)
    return Answer(str(response.status_code), time.perf_counter() - started, note)


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return response.text[:80]


def post_json(client: httpx.Client, path: str, key: str | None, body: bytes) -> Answer:
    headers = {"Content-Type": "application/json", **bearer(key)}
    return timed(lambda: client.post(path, content=body, headers=headers))


def bounded(
    items: Sequence[Any], send: Callable[[Any], Answer], limit_s: float = CASE_TIME_LIMIT_S
) -> list[Answer]:
    """`send` each item in turn, stopping once `limit_s` has passed."""
    answers: list[Answer] = []
    deadline = time.monotonic() + limit_s
    for item in items:
        if time.monotonic() > deadline:
            break
        answers.append(send(item))
    return answers


def at_once(items: Sequence[Any], send: Callable[[Any], Answer]) -> list[Answer]:
    """`send` every item concurrently, one thread each (at most 64)."""
    with ThreadPoolExecutor(max_workers=min(64, len(items))) as pool:
        return list(pool.map(send, items))


# Large bodies over a raw socket ----------------------------------------------------------------------


def send_large_body(
    port: int, path: str, key: str | None, size: int, *, chunked: bool, timeout_s: float = REQUEST_TIMEOUT_S
) -> Answer:
    """POST `size` bytes of JSON-looking text, declared or chunked, stopping as soon as the server answers.

    The note says how much of the body went out before the answer: a server that refuses early reads
    little of it.
    """
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        "Connection: close",
        *(f"{name}: {value}" for name, value in bearer(key).items()),
        "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}",
    ]
    opening, piece = b'{"pad": "', b"a" * MIB
    started = time.perf_counter()
    deadline = started + timeout_s
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            while sent < size and time.perf_counter() < deadline:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered (or closed) before the whole body
                data = ((opening if sent == 0 else b"") + piece)[: min(MIB, size - sent)]
                sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
                sent += len(data)
            if chunked and sent >= size:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # refused mid-body: read what the server said
        status = _read_status(sock, deadline)
    note = f"{sent / MIB:.0f} of {size / MIB:.0f} MiB sent"
    return Answer("no answer" if status is None else str(status), time.perf_counter() - started, note)


def _read_status(sock: socket.socket, deadline: float) -> int | None:
    """The status code of the answer on `sock`, or None if none arrives before `deadline`."""
    received = b""
    while b"\r\n" not in received and time.perf_counter() < deadline:
        sock.settimeout(max(0.01, deadline - time.perf_counter()))
        try:
            chunk = sock.recv(4096)
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    parts = received.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


# /healthz poller (a process of its own, so this process's work does not delay it) ----------------------


Sample = tuple[float, float, int]  # (monotonic start, milliseconds, status or 0 when no answer came)
POLLER_START_TIMEOUT_S = 60.0


def poll_health(base_url: str, max_seconds: float, stop: Event, out: Connection) -> None:
    """Poll /healthz every HEALTH_INTERVAL_S until `stop` or `max_seconds` (and at most that many polls).

    Sends "polling" after the first answer, then the list of samples at the end.
    """
    samples: list[Sample] = []
    deadline = time.monotonic() + max_seconds
    max_polls = math.ceil(max_seconds / HEALTH_INTERVAL_S)
    with httpx.Client(timeout=HEALTH_TIMEOUT_S) as client:
        while not stop.is_set() and time.monotonic() < deadline and len(samples) < max_polls:
            started = time.monotonic()
            try:
                status = client.get(f"{base_url}/healthz").status_code
            except httpx.TransportError:
                status = 0
            samples.append((started, (time.monotonic() - started) * 1000, status))
            if len(samples) == 1:
                out.send("polling")
            stop.wait(max(0.0, HEALTH_INTERVAL_S - (time.monotonic() - started)))
    out.send(samples)


@contextmanager
def health_poller(base_url: str, max_seconds: float) -> Iterator[list[Sample]]:
    """Poll /healthz from a child process while the block runs; the yielded list gets the samples after.

    The block starts once the child polls, so every case is covered.
    """
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=poll_health, args=(base_url, max_seconds, stop, sender), daemon=True)
    process.start()
    samples: list[Sample] = []
    try:
        if not receiver.poll(POLLER_START_TIMEOUT_S) or receiver.recv() != "polling":
            raise RuntimeError(f"the /healthz poller did not start within {POLLER_START_TIMEOUT_S:.0f} s")
        yield samples
    finally:
        stop.set()
        if receiver.poll(2 * HEALTH_TIMEOUT_S):
            samples.extend(receiver.recv())
        process.join(10)
        if process.is_alive():
            process.kill()


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def health_summary(samples: Sequence[Sample]) -> dict[str, Any]:
    if not samples:
        return {"polls": 0}
    ms = [sample[1] for sample in samples]
    return {
        "polls": len(samples),
        "failures": sum(1 for sample in samples if sample[2] != 200),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(max(ms), 2),
    }


# What the cases send -----------------------------------------------------------------------------------


def onnx_model(weight_dims: Sequence[int], *, external: str | None = None) -> bytes:
    """A one-convolution ONNX model on a 1x3x32x32 input whose weight has `weight_dims`.

    With `external`, the weight's data is declared to live in that file; without, it carries no data
    at all (what a file declaring a huge weight looks like).
    """
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(weight_dims))
    if external is not None:
        weight.data_location = TensorProto.EXTERNAL
        length = 4 * math.prod(weight_dims)
        for key, value in (("location", external), ("offset", "0"), ("length", str(length))):
            weight.external_data.add(key=key, value=value)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [conv],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(INPUT_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def onnx_relu_chain(nodes: int) -> bytes:
    """An ONNX model of `nodes` ReLUs in a row."""
    from onnx import TensorProto, helper

    names = ["x", *(f"r{i}" for i in range(nodes))]
    graph = helper.make_graph(
        [helper.make_node("Relu", [names[i]], [names[i + 1]]) for i in range(nodes)],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(INPUT_SHAPE))],
        [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, list(INPUT_SHAPE))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def chain_network(layers: int, channels: int = 8, hw: int = 8) -> dict[str, Any]:
    """A JSON IR network of `layers` layers in a row: 3x3 convolutions and ReLUs taking turns."""
    items: list[dict[str, Any]] = []
    previous = "input"
    for index in range(layers):
        layer: dict[str, Any] = {
            "name": f"l{index}",
            "op": "relu" if index % 2 else "conv2d",
            "inputs": [previous],
            "in_channels": channels,
            "out_channels": channels,
            "in_hw": [hw, hw],
            "out_hw": [hw, hw],
        }
        if not index % 2:
            layer.update(kernel=[3, 3], padding=[1, 1])
        items.append(layer)
        previous = layer["name"]
    return {
        "name": f"chain-{layers}",
        "input_shape": [1, channels, hw, hw],
        "layers": items,
        "outputs": [previous],
    }


def traceable_alone(names: Sequence[str]) -> dict[str, bool]:
    """Whether each torchvision model traces into the IR here, one at a time."""
    from lpnet.arch.from_torch import network_from_torchvision
    from lpnet.errors import LpnetError

    traceable = {}
    for name in names:
        try:
            network_from_torchvision(name)
        except LpnetError:
            traceable[name] = False
        else:
            traceable[name] = True
    return traceable


def latency_body(architecture: Any) -> bytes:
    return json.dumps({"device": DEVICE, "architecture": architecture}).encode()


def profile_batch(measurements: Sequence[Any], context: Any, key: str) -> dict[str, Any]:
    """A profile batch as JSON data (so fields can be set to anything afterwards)."""
    from profiler.batch import ProfileBatch

    data: dict[str, Any] = json.loads(ProfileBatch.build(key, context, list(measurements)).model_dump_json())
    return data


def with_timing(batch: dict[str, Any], field_name: str, value: float) -> bytes:
    """`batch` with `field_name` of its first network row set to `value` (NaN and Infinity as JSON allows)."""
    changed = json.loads(json.dumps(batch))
    changed["network_measurements"][0][field_name] = value
    return json.dumps(changed).encode()  # json writes NaN and Infinity as bare words


# Preparation: device, measurements, predictor, keys -----------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """What the cases need from the preparation."""

    admin: str
    reader: str
    agent: str
    network: Any  # lpnet.arch.ir.Network
    onnx: bytes  # the same network exported to ONNX
    measurements: list[Any]  # profiler.batch.Measurement
    context: Any  # profiler.batch.RunContext


def prepare(database_url: str, samples: int) -> Prepared:
    """Migrate, register this machine, measure and fit a predictor, create keys (about a minute)."""
    import torch

    from lpnet.arch.from_torch import network_from_module
    from lpnet.arch.onnx_io import export_onnx
    from profiler.batch import MeasurementKind
    from profiler.device import DeviceSpec
    from profiler.environment import AllocatorPolicy, apply_allocator_policy
    from profiler.protocol import TimingProtocol
    from profiler.runner import make_run_context, run_profile
    from profiler.sampling import SamplingConfig, StratifiedSampler
    from service.auth import create_api_key
    from service.config import FitSettings
    from service.db.migrate import upgrade
    from service.db.models import KeyScope
    from service.db.session import make_engine, make_session_factory
    from service.devices import local_device, register_device
    from service.first_run.keys import ensure_configured_key
    from service.predictors import fit_from_samples, store_predictor
    from service.profiling import DatabaseSink
    from service.train.smallnet import SmallResNet, SmallResNetConfig
    from service.training_set import training_samples

    torch.set_num_threads(1)
    upgrade(database_url, "head")
    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    try:
        with factory() as session:
            device, agent = register_device(session, local_device(DEVICE, threads=1))
            admin = create_api_key(session, scope=KeyScope.ADMIN.value, name="abuse admin")[1]
            reader = create_api_key(session, scope=KeyScope.READER.value, name="abuse reader")[1]
            # What `lpnet serve` stores for an LPNET_ADMIN_KEY that its settings let through.
            ensure_configured_key(session, PLACEHOLDER_ADMIN_KEY)
            session.commit()
        spec = DeviceSpec(
            hardware=device.hardware,
            backend=device.backend,
            threads=device.threads,
            batch_size=device.batch_size,
            dtype=device.dtype,
        )
        module = SmallResNet(SmallResNetConfig(in_channels=3, widths=(16, 32, 64)))
        network = network_from_module(module, INPUT_SHAPE, name="small", family="small")
        config = SamplingConfig(
            kinds=(MeasurementKind.NETWORK, MeasurementKind.IN_CONTEXT),
            network_samples=samples,
            in_context_samples=4,
            lhs_block=8,
            min_ratio=0.2,
        )
        protocol = TimingProtocol.quick()
        apply_allocator_policy(AllocatorPolicy(device.allocator))  # the sink refuses another policy
        backend = spec.create_backend()
        context = make_run_context(spec, protocol, backend)
        sink = DatabaseSink(factory, device, context)
        measured: list[Any] = []
        started = time.perf_counter()
        sampler = StratifiedSampler({"small": network}, spec, config)
        run_profile(
            spec, sampler, sink, protocol, progress=False, backend=backend, on_measurement=measured.append
        )
        sink.close()
        print(f"measured {len(measured)} networks in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        with factory() as session:
            training = training_samples(session, device.id)
        started = time.perf_counter()
        fitted = fit_from_samples(training, settings=FitSettings(steps=200, members=3))
        with factory() as session:
            store_predictor(session, device.id, fitted)
            session.commit()
        print(f"fitted in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    finally:
        engine.dispose()
    return Prepared(admin, reader, agent, network, export_onnx(module, INPUT_SHAPE), measured, context)


def feasible_budget_ms(client: httpx.Client, prepared: Prepared) -> float:
    """A budget halfway between the server's least achievable and unpruned latency of the small network.

    Both come from the 422 the server answers to an admin's plan request with a budget far too small
    (an infeasible request queues nothing and counts against no quota).
    """
    body = {"device": DEVICE, "architecture": prepared.network.model_dump(mode="json"), "budget_ms": 1e-9}
    response = client.post("/v1/plans", json=body, headers=bearer(prepared.admin))
    try:
        details = response.json()["error"]["details"]
        low, full = float(details["min_achievable_ms"]), float(details["unpruned_ms"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(
            f"no latency range for the small network: {response.status_code} {response.text}"
        ) from exc
    return low + 0.5 * (full - low)


# The cases ----------------------------------------------------------------------------------------------


def build_cases(
    client: httpx.Client, port: int, prepared: Prepared, plans: int, data_dir: Path
) -> list[Case]:
    """Every hostile case, its payloads built now so that sending them costs this process little."""
    reader, agent = prepared.reader, prepared.agent
    rng = random.Random(0)

    def onnx(data: bytes, key: str | None = reader) -> Callable[[], list[Answer]]:
        def send() -> list[Answer]:
            files = {"file": ("model.onnx", data, "application/octet-stream")}
            form = {"device": DEVICE}
            return [
                timed(lambda: client.post("/v1/latency/onnx", files=files, data=form, headers=bearer(key)))
            ]

        return send

    def json_case(path: str, key: str | None, *bodies: bytes) -> Callable[[], list[Answer]]:
        return lambda: bounded(bodies, lambda body: post_json(client, path, key, body))

    def large(key: str | None, size: int, chunked: bool) -> Callable[[], list[Answer]]:
        return lambda: [send_large_body(port, "/v1/latency", key, size, chunked=chunked)]

    budget = feasible_budget_ms(client, prepared)
    plan = {"device": DEVICE, "architecture": prepared.network.model_dump(mode="json"), "budget_ms": budget}
    plan_body = json.dumps(plan).encode()
    verify_body = json.dumps({**plan, "options": {"verify": True}}).encode()

    chain_4k = latency_body(chain_network(4_000))
    chain_40k = latency_body(chain_network(40_000))
    duplicated = chain_network(4)
    duplicated["layers"][1]["name"] = duplicated["layers"][0]["name"]
    huge_dims = chain_network(2)
    huge_dims["input_shape"] = [1, 8, 10**400, 10**400]
    huge_channels = chain_network(2)
    huge_channels["layers"][0]["out_channels"] = 10**400
    too_many_digits = chain_network(2)
    too_many_digits["input_shape"] = [1, 8, "DIGITS", 8]
    # 5,000 digits: more than Python's int conversion takes (4,300), so written into the text directly.
    too_many_digits_body = latency_body(too_many_digits).replace(b'"DIGITS"', b"1" + b"0" * 5000)

    unknown = [f"no_such_model_{i}" for i in range(20)]
    pair = [name for name, ok in traceable_alone(MID_SIZE_MODELS[:4]).items() if ok][:2]

    def traced(name_and_size: tuple[str, int]) -> Answer:
        name, size = name_and_size
        body = latency_body({"torchvision": name, "input_shape": [1, 3, size, size]})
        return post_json(client, "/v1/latency", reader, body)

    def pairs_then_alone() -> list[Answer]:
        # A new input size each round, so that no answer comes from the server's cache of traces.
        rounds = [[(name, size) for name in pair] for size in PAIR_SIZES]
        together = [answer for pairs in rounds for answer in at_once(pairs, traced)]
        return together + bounded([item for pairs in rounds for item in pairs], traced)

    many = [*MID_SIZE_MODELS, *(f"not_a_model_{i}" for i in range(16))]

    first_rows = [m for m in prepared.measurements if m.status == "ok"][:2]
    profiles_path = f"/v1/devices/{DEVICE}/profiles"
    reused_key = "abuse-reused-key-0001"
    batch_a = json.dumps(profile_batch(first_rows[:1], prepared.context, reused_key)).encode()
    batch_b = json.dumps(profile_batch(first_rows[1:2], prepared.context, reused_key)).encode()
    nan_batch = profile_batch(first_rows[:1], prepared.context, "abuse-nan-batch-0001")
    nan_bodies = [
        with_timing(nan_batch, "median_ms", math.nan),
        with_timing(nan_batch, "p90_ms", math.inf),
        with_timing(nan_batch, "duration_s", -math.inf),
        with_timing(nan_batch, "load_average_1m", math.nan),
    ]

    def plans_from_one_reader() -> list[Answer]:
        return bounded(range(plans), lambda _: post_json(client, "/v1/plans", reader, plan_body))

    def placeholder_as_admin_key() -> list[Answer]:
        return [start_with_placeholder_admin_key(data_dir)]

    refused = outcomes(400, 413, 422)
    return [
        # A server imports onnx and torchvision on their first use: these two show what that costs.
        Case(
            "first_onnx_upload", "the small network as ONNX (well-formed)", outcomes(200), onnx(prepared.onnx)
        ),
        Case(
            "first_torchvision_name",
            "resnet18 by name (well-formed)",
            outcomes(200),
            json_case("/v1/latency", reader, latency_body({"torchvision": "resnet18"})),
        ),
        Case(
            "onnx_external_relative",
            "ONNX, weight data in 'weights.bin'",
            outcomes(422),
            onnx(onnx_model([8, 3, 3, 3], external="weights.bin")),
        ),
        Case(
            "onnx_external_absolute",
            "ONNX, weight data in '/etc/passwd'",
            outcomes(422),
            onnx(onnx_model([8, 3, 3, 3], external="/etc/passwd")),
        ),
        Case(
            "onnx_external_dotdot",
            "ONNX, weight data in '../../../../etc/passwd'",
            outcomes(422),
            onnx(onnx_model([8, 3, 3, 3], external="../../../../etc/passwd")),
        ),
        Case("onnx_garbage", "1 MiB of random bytes as ONNX", refused, onnx(rng.randbytes(MIB))),
        Case("onnx_100k_nodes", "ONNX graph of 100,000 ReLUs", refused, onnx(onnx_relu_chain(100_000))),
        Case(
            "onnx_conv_1e9_channels",
            "ONNX conv weight declared 10**9 x 3 x 3 x 3",
            refused,
            onnx(onnx_model([10**9, 3, 3, 3])),
        ),
        Case("unauth_open_brace", "'{' without a key", outcomes(401), json_case("/v1/latency", None, b"{")),
        Case(
            "unauth_100mib",
            "100 MiB body (Content-Length) without a key",
            outcomes(401),
            large(None, 100 * MIB, chunked=False),
        ),
        Case(
            "unauth_100mib_chunked",
            "100 MiB chunked body without a key",
            outcomes(401),
            large(None, 100 * MIB, chunked=True),
        ),
        Case(
            "auth_over_json_limit",
            "16 MiB JSON body (Content-Length), reader key",
            outcomes(413),
            large(reader, OVER_JSON_LIMIT_BYTES, chunked=False),
        ),
        Case(
            "auth_over_json_limit_chunked",
            "16 MiB chunked JSON body, reader key",
            outcomes(413),
            large(reader, OVER_JSON_LIMIT_BYTES, chunked=True),
        ),
        Case(
            "json_4000_layers",
            "JSON network of 4,000 layers",
            outcomes(200, 413, 422),
            json_case("/v1/latency", reader, chain_4k),
        ),
        Case(
            "json_40000_layers",
            "JSON network of 40,000 layers",
            refused,
            json_case("/v1/latency", reader, chain_40k),
        ),
        Case(
            "json_duplicate_names",
            "JSON network with two layers named alike",
            refused,
            json_case("/v1/latency", reader, latency_body(duplicated)),
        ),
        Case(
            "json_10e400_dimensions",
            "10**400 as input size and as channels; 10**5000 as input size",
            refused,
            json_case(
                "/v1/latency",
                reader,
                latency_body(huge_dims),
                latency_body(huge_channels),
                too_many_digits_body,
            ),
        ),
        Case(
            "torchvision_long_names",
            "torchvision names of 65 characters and of 1 MiB",
            refused,
            json_case(
                "/v1/latency",
                reader,
                latency_body({"torchvision": "a" * 65}),
                latency_body({"torchvision": "a" * MIB}),
            ),
        ),
        Case(
            "torchvision_unknown",
            "20 unknown torchvision names, one after the other",
            refused,
            lambda: bounded(
                unknown,
                lambda name: post_json(client, "/v1/latency", reader, latency_body({"torchvision": name})),
            ),
        ),
        Case(
            "torchvision_huge",
            "vit_h_14 and regnet_y_128gf at 1x3x224x224, at once",
            outcomes(200, 422, 429),
            lambda: at_once(
                HUGE_MODELS,
                lambda name: post_json(client, "/v1/latency", reader, latency_body({"torchvision": name})),
            ),
        ),
        Case(
            "torchvision_many_at_once",
            "32 at once: 16 real models and 16 unknown names",
            outcomes(200, 422, 429),
            lambda: at_once(
                many,
                lambda name: post_json(client, "/v1/latency", reader, latency_body({"torchvision": name})),
            ),
        ),
        Case(
            "torchvision_pairs",
            f"{' and '.join(pair)} at once at {len(PAIR_SIZES)} input sizes, then each again alone",
            outcomes(200, 429),
            pairs_then_alone,
            # At once, either may be told the server is busy; alone, both must trace.
            check=lambda answers: all(a.outcome == "200" for a in answers[len(answers) // 2 :]),
        ),
        Case(
            "idempotency_key_reused",
            "one idempotency key, two different profile batches",
            outcomes(201, 409),
            json_case(profiles_path, agent, batch_a, batch_b),
            check=lambda answers: [a.outcome for a in answers] == ["201", "409"],
        ),
        Case(
            "nan_infinity_timings",
            "NaN/Infinity in median_ms, p90_ms, duration_s, load_average_1m",
            outcomes(400, 422),
            json_case(profiles_path, agent, *nan_bodies),
        ),
        Case(
            "placeholder_admin_key",
            "a placeholder admin key stored in the database",
            outcomes(401),
            lambda: [timed(lambda: client.get("/v1/keys", headers=bearer(PLACEHOLDER_ADMIN_KEY)))],
        ),
        Case(
            "placeholder_as_lpnet_admin_key",
            "a second `lpnet serve` with LPNET_ADMIN_KEY=placeholder",
            outcomes(401, "exit 2"),
            placeholder_as_admin_key,
        ),
        Case(
            "verify_plan_reader",
            "a plan with verify=true on the local device, reader key",
            outcomes(403),
            json_case("/v1/plans", reader, verify_body),
        ),
        Case(
            "plans_one_reader",
            f"{plans} plan requests from one reader key",
            outcomes(202, 429),
            plans_from_one_reader,
            check=lambda answers: any(a.outcome == "429" for a in answers),
        ),
    ]


def start_with_placeholder_admin_key(data_dir: Path) -> Answer:
    """Start `lpnet serve` with LPNET_ADMIN_KEY set to the placeholder on a database of its own.

    The outcome is "exit N" when the server refuses to start; when it starts, the status of GET
    /v1/keys with the placeholder key (then the server is stopped).
    """
    url = f"sqlite:///{(data_dir / 'placeholder.db').as_posix()}"
    port = free_port()
    env = lpnet_env(url, data_dir, {"LPNET_ADMIN_KEY": PLACEHOLDER_ADMIN_KEY, "LPNET_LOG_LEVEL": "WARNING"})
    started = time.perf_counter()
    with Processes(data_dir / "placeholder-logs") as processes:
        process = processes.start(
            "serve", lpnet_args("serve", "--host", "127.0.0.1", "--port", str(port)), env
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base_url, process)
        except RuntimeError:
            code = process.wait(30)
            return Answer(f"exit {code}", time.perf_counter() - started, "refused to start")
        status = httpx.get(
            f"{base_url}/v1/keys", headers=bearer(PLACEHOLDER_ADMIN_KEY), timeout=30
        ).status_code
        return Answer(
            str(status), time.perf_counter() - started, "started; GET /v1/keys with the placeholder"
        )


# Reporting ----------------------------------------------------------------------------------------------


def case_row(case: Case, samples: Sequence[Sample]) -> dict[str, Any]:
    during = [s for s in samples if case.started <= s[0] <= case.finished]
    seconds = [a.seconds for a in case.answers]
    return {
        "case": case.name,
        "sends": case.sends,
        "requests": len(case.answers),
        "outcomes": dict(sorted(case.outcomes().items())),
        "expected": sorted(case.expected),
        "met": case.met(),
        "max_ms": round(1000 * max(seconds), 1) if seconds else None,
        "notes": sorted({answer.note for answer in case.answers if answer.note}),
        "healthz_during": health_summary(during),
        "sequence": [answer.outcome for answer in case.answers],
    }


def print_table(rows: Sequence[dict[str, Any]], overall: dict[str, Any]) -> None:
    header = f"{'case':<32} {'statuses':<22} {'expected':<14} {'max ms':>9} {'hz p99':>7} {'hz max':>7}  ok"
    print(header)
    print("-" * len(header))
    for row in rows:
        statuses = " ".join(f"{outcome}x{count}" for outcome, count in row["outcomes"].items())
        expected = ",".join(row["expected"])
        health = row["healthz_during"]
        max_ms = "-" if row["max_ms"] is None else f"{row['max_ms']:.0f}"
        print(
            f"{row['case']:<32} {statuses:<22} {expected:<14} {max_ms:>9} "
            f"{health.get('p99_ms', '-'):>7} {health.get('max_ms', '-'):>7}  {'yes' if row['met'] else 'NO'}"
        )
    health = overall["healthz"]
    print()
    print(
        f"5xx answers: {overall['server_errors']}   cases as expected: {overall['cases_met']}/{len(rows)}   "
        f"/healthz: {health['polls']} polls, {health.get('failures', 0)} failed, p50 {health.get('p50_ms')} ms, "
        f"p99 {health.get('p99_ms')} ms, max {health.get('max_ms')} ms"
    )


def traceback_endings(log: str) -> list[str]:
    """Each traceback in a server log as the line logged before it and the exception line ending it."""
    endings = []
    chunks = log.split("Traceback (most recent call last):")
    for before, chunk in zip(chunks, chunks[1:], strict=False):
        logged = before.rstrip("\n").rsplit("\n", 1)[-1]
        # Frames are indented; the first line that is not ends the traceback.
        ending = next((line for line in chunk.splitlines()[1:] if line and not line.startswith(" ")), "")
        endings.append(f"{logged[:200]} -> {ending[:200]}")
    return endings


def report(
    cases: Sequence[Case],
    samples: Sequence[Sample],
    settle_started: float,
    server_log: str,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The JSON document of a run: each case, the overall figures, and whether the targets were met."""
    rows = [case_row(case, samples) for case in cases]
    server_errors = sum(1 for case in cases for answer in case.answers if answer.server_error)
    healthz = health_summary(samples)
    overall = {
        "server_errors": server_errors,
        "no_answer": sum(1 for case in cases for answer in case.answers if answer.outcome == "no answer"),
        "cases_met": sum(1 for row in rows if row["met"]),
        "healthz": healthz,
        "healthz_after_last_case": health_summary([s for s in samples if s[0] > settle_started]),
        "server_log_tracebacks": traceback_endings(server_log),
    }
    return {
        "cases": rows,
        "overall": overall,
        "targets": TARGETS,
        "met": {
            "no 5xx": server_errors == TARGETS["server_errors"],
            "healthz p99 under 50 ms": healthz.get("p99_ms", math.inf) < TARGETS["healthz_p99_ms"],
            "every case as expected": overall["cases_met"] == len(rows),
        },
        "settings": settings,
        "machine": machine(),
        "notes": (
            "one `lpnet serve` with an embedded worker on SQLite; client, poller and server share the machine "
            "over loopback. max_ms is the client's round trip; for the large bodies the notes say how much was "
            "sent before the server answered. An outcome 'exit N' is a server that refused to start."
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--plans", type=int, default=50, help="plan requests from one reader key (default: 50)"
    )
    parser.add_argument("--samples", type=int, default=24, help="networks measured for the fit (default: 24)")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds of polling after the last case (default: 10)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if not 1 <= args.plans <= 1000 or not 22 <= args.samples <= 500 or not 0 <= args.settle <= 300:
        parser.error(
            "--plans must be in 1..1000, --samples in 22..500 (a fit holds some out) and --settle in 0..300"
        )

    with tempfile.TemporaryDirectory(prefix="lpnet-abuse-") as scratch:
        data_dir = Path(scratch)
        url = f"sqlite:///{(data_dir / 'abuse.db').as_posix()}"
        prepared = prepare(url, args.samples)
        port = free_port()
        env = lpnet_env(url, data_dir, {"LPNET_WORKER__EMBEDDED": "true", "LPNET_LOG_LEVEL": "WARNING"})
        with Processes(data_dir / "logs") as processes:
            server = processes.start(
                "serve", lpnet_args("serve", "--host", "127.0.0.1", "--port", str(port)), env
            )
            base_url = f"http://127.0.0.1:{port}"
            try:
                wait_ready(base_url, server)
            except RuntimeError as exc:
                raise SystemExit(f"{exc}\n{processes.log('serve')}") from exc
            with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
                cases = build_cases(client, port, prepared, args.plans, data_dir)
                budget_s = CASE_TIME_LIMIT_S * len(cases) + args.settle + 60
                with health_poller(base_url, budget_s) as samples:
                    for case in cases:
                        print(f"{case.name} ...", file=sys.stderr)
                        case.execute()
                    time.sleep(args.settle)
                settle_started = cases[-1].finished
            server_log = processes.log("serve", chars=200_000)

    settings = {"plans": args.plans, "samples": args.samples, "settle_seconds": args.settle}
    result = report(cases, samples, settle_started, server_log, settings)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result["cases"], result["overall"])
    print(f"saved to {args.output}", file=sys.stderr)
    return 0 if all(result["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
