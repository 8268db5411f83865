"""Load benchmark of POST /v1/latency: a real `lpnet serve` on loopback, resnet50 by name, 16 in flight.

The pipeline is real and runs through the CLI on a temporary SQLite database: register this machine
as a device, profile width variants of resnet18 at 64x64 (quick protocol; a few with per-layer
times), fit a predictor (fewer steps than the default), create a reader key, start `lpnet serve`
and warm it up (the first request traces resnet50). Then two bounded runs:

- closed loop: 16 connections, each sending its next request when the last is answered; gives
  the throughput (latency there is queueing: 16 / throughput);
- open loop: requests on a fixed schedule (200/s by default) over at most 16 connections; gives
  the latency a client sees at that load, timed from each request's scheduled start.

Client and server share the machine's cores, so the figures are a floor of what the server does
alone; other work on the machine lowers them further (the JSON records the load average).

Usage:
    python bench/api_load.py                     # 2000 requests per run (~2 minutes, most of it the fit)
    python bench/api_load.py --requests 500      # shorter
    python bench/api_load.py --data-dir /tmp/x   # keep the prepared database for the next run
The JSON goes to bench/results/api_load.json unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "api_load.json"
TARGETS = {"p50_ms": 10.0, "p99_ms": 30.0, "requests_per_second": 200.0}
DEVICE = "bench-cpu"


def lpnet(env: dict[str, str], *args: str) -> str:
    """Run an `lpnet` command; return its stdout, failing loudly with its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "service", *args], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"lpnet {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prepare(env: dict[str, str], samples: int) -> str:
    """Device, measurements, predictor and a reader key; returns the key."""
    lpnet(env, "device", "add", DEVICE, "--threads", "1")
    started = time.perf_counter()
    lpnet(
        env,
        "profile",
        "--device",
        DEVICE,
        "--families",
        "resnet18",
        "--image-size",
        "64",
        "--kinds",
        "network,in_context",
        "--network-samples",
        str(samples),
        "--in-context-samples",
        "4",
        "--quick",
        "--no-progress",
    )
    print(f"profiled {samples} resnet18 variants in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    started = time.perf_counter()
    lpnet(env, "fit", "--device", DEVICE, "--no-progress")
    print(f"fitted in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return lpnet(env, "keys", "create", "--scope", "reader", "--name", "bench").strip()


def latency_request(port: int, key: str) -> bytes:
    """The raw HTTP/1.1 request, built once."""
    body = json.dumps(
        {"device": DEVICE, "architecture": {"torchvision": "resnet50", "input_shape": [1, 3, 224, 224]}}
    ).encode()
    head = (
        f"POST /v1/latency HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    """A keep-alive connection of a minimal HTTP/1.1 client (like wrk's): little CPU per request, so
    the load generator takes little from the server it shares the machine with."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send `request`, read the whole answer, return its status and body."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await self.reader.readexactly(length)
        return int(head.split(b" ", 2)[1]), body

    def close(self) -> None:
        self.writer.close()


async def closed_loop(port: int, key: str, requests: int, concurrency: int) -> tuple[list[float], float, int]:
    """`concurrency` clients each sending their next request as soon as the last one is answered.

    Returns per-request ms, wall seconds and failures. This finds the throughput; latency here is
    mostly queueing (concurrency / throughput), not service time.
    """
    request = latency_request(port, key)
    latencies: list[float] = []
    failures = 0
    remaining = iter(range(requests))

    async def client() -> None:
        nonlocal failures
        connection = await Connection.open(port)
        try:
            for _ in remaining:
                t0 = time.perf_counter()
                status, _ = await connection.send(request)
                latencies.append((time.perf_counter() - t0) * 1000)
                failures += status != 200
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, failures


async def open_loop(
    port: int, key: str, requests: int, concurrency: int, rate: float
) -> tuple[list[float], float, int]:
    """Requests sent on a fixed schedule (`rate` per second) over at most `concurrency` connections.

    Latency runs from each request's scheduled time, so a stall also counts for the requests it
    delays (no coordinated omission): this is what a client sees at that load.
    """
    request = latency_request(port, key)
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(concurrency):
        pool.put_nowait(await Connection.open(port))
    latencies: list[float] = []
    failures = 0
    started = time.perf_counter()

    async def one(index: int) -> None:
        nonlocal failures
        scheduled = started + index / rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        connection = await pool.get()
        try:
            status, _ = await connection.send(request)
        finally:
            pool.put_nowait(connection)
        latencies.append((time.perf_counter() - scheduled) * 1000)
        failures += status != 200

    await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - started
    while not pool.empty():
        pool.get_nowait().close()
    return latencies, wall, failures


async def first_request(port: int, key: str) -> tuple[float, int, bytes]:
    connection = await Connection.open(port)
    try:
        t0 = time.perf_counter()
        status, body = await connection.send(latency_request(port, key))
        return (time.perf_counter() - t0) * 1000, status, body
    finally:
        connection.close()


def summary(latencies: list[float], wall: float, failures: int) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "failures": failures,
        "p50_ms": round(statistics.median(latencies), 2),
        "p90_ms": round(percentile(latencies, 0.90), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2),
        "requests_per_second": round(len(latencies) / wall, 1),
    }


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests to time (default: 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    parser.add_argument(
        "--samples", type=int, default=34, help="networks to profile for the fit (default: 34)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="offered requests per second of the open loop (default: 200)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--data-dir", type=Path, help="keep the prepared database here and reuse it on the next run"
    )
    args = parser.parse_args()
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 256 or not 0 < args.rate <= 10_000:
        parser.error("--requests must be in 1..100000, --concurrency in 1..256 and --rate in (0, 10000]")

    with tempfile.TemporaryDirectory(prefix="lpnet-api-load-") as scratch:
        tmp = str(args.data_dir.resolve()) if args.data_dir else scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "LPNET_DATA_DIR": tmp,
            "LPNET_DATABASE_URL": f"sqlite:///{tmp}/bench.db",
            "LPNET_FIT__STEPS": "300",
            # The bench registers its own device; no first-run profiling in the background.
            "LPNET_FIRST_RUN__ENABLED": "false",
            "LPNET_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
        }
        key_file = Path(tmp) / "reader.key"
        if key_file.exists():
            key = key_file.read_text().strip()
        else:
            key = prepare(env, args.samples)
            key_file.write_text(key)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"lpnet serve did not come up:\n{server.stderr.read().decode() if server.stderr else ''}"
                    )
                time.sleep(0.2)
            first_ms, status, answer = asyncio.run(first_request(port, key))
            if status != 200:
                raise SystemExit(f"the first request failed with {status}: {answer.decode(errors='replace')}")
            print(f"first request (traces resnet50): {first_ms:.0f} ms", file=sys.stderr)
            asyncio.run(closed_loop(port, key, 200, args.concurrency))  # warm the server's caches
            load_before = os.getloadavg()[0]
            closed = summary(*asyncio.run(closed_loop(port, key, args.requests, args.concurrency)))
            opened = summary(*asyncio.run(open_loop(port, key, args.requests, args.concurrency, args.rate)))
        finally:
            server.terminate()
            server.wait(30)

    result: dict[str, Any] = {
        "endpoint": "POST /v1/latency",
        "architecture": "torchvision resnet50 by name, input 1x3x224x224",
        "concurrency": args.concurrency,
        "closed_loop": closed,
        "open_loop": {"offered_rate_per_second": args.rate, **opened},
        "first_request_ms": round(first_ms, 1),
        "targets": TARGETS,
        "met": {
            "requests_per_second (closed loop)": closed["requests_per_second"]
            >= TARGETS["requests_per_second"],
            f"p50_ms at {args.rate:g}/s (open loop)": opened["p50_ms"] < TARGETS["p50_ms"],
            f"p99_ms at {args.rate:g}/s (open loop)": opened["p99_ms"] < TARGETS["p99_ms"],
            "p50_ms (closed loop)": closed["p50_ms"] < TARGETS["p50_ms"],
            "p99_ms (closed loop)": closed["p99_ms"] < TARGETS["p99_ms"],
        },
        "load_average_1m_before": round(load_before, 2),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "notes": (
            "client and server share the machine over loopback; SQLite; one uvicorn process. In the closed "
            "loop latency is concurrency / throughput (queueing), so p50 < 10 ms at 16 in flight would need "
            "> 1600 requests/s; the open loop at the target rate shows the latency a client sees there."
        ),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"closed_loop": closed, "open_loop": opened, "met": result["met"]}, indent=2))
    print(f"saved to {args.output}", file=sys.stderr)
    return 0 if closed["failures"] == opened["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
