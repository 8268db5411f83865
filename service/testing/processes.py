"""`lpnet serve` and `lpnet worker` as real subprocesses on loopback, on a database of the caller's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from profiler.batch import RunContext
from service.auth import create_api_key
from service.db.migrate import upgrade
from service.db.models import KeyScope
from service.db.session import make_engine, make_session_factory

# The directory holding the `service` package: the subprocesses' working directory and import path.
SOURCE_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def lpnet_env(database_url: str, data_dir: Path, settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an `lpnet` subprocess: this one's without LPNET_* settings, plus the given ones.

    Scale-out defaults: no embedded worker, no first-run bootstrap.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPNET_") or k.startswith("LPNET_TEST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    env.update(
        {
            "LPNET_DATABASE_URL": database_url,
            "LPNET_DATA_DIR": str(data_dir),
            "LPNET_WORKER__EMBEDDED": "false",
            "LPNET_FIRST_RUN__ENABLED": "false",
        }
    )
    env.update(settings or {})
    return env


def lpnet_args(*args: str) -> list[str]:
    """The `lpnet` command line run with this interpreter."""
    return [sys.executable, "-m", "service", *args]


class Processes:
    """Subprocesses with their output in log files; every one still running is stopped on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start `args` as `name`; stdout and stderr go to ``<log_dir>/<name>.log``."""
        log = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        process = subprocess.Popen(
            list(args), env=dict(env), cwd=SOURCE_ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        self.running[name] = process
        return process

    def log(self, name: str, chars: int = 4000) -> str:
        """The end of a process's log, for failure messages."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, name: str, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        process = self.running.pop(name)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        return int(process.returncode)

    def close(self) -> None:
        for name in list(self.running):
            self.stop(name)
        for log in self._logs:
            log.close()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_ready(base_url: str, process: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT_S) -> float:
    """Wait for ``/readyz`` to answer 200; returns the seconds waited.

    Raises:
        RuntimeError: The process exited, or it was not ready within `timeout`.
    """
    started = time.monotonic()
    with httpx.Client(timeout=2.0) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
            try:
                if client.get(f"{base_url}/readyz").status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"{base_url}/readyz did not answer 200 within {timeout:.0f} s")
            time.sleep(0.1)


@dataclass
class ServedApi:
    """A running `lpnet serve` on a migrated PostgreSQL database, with an admin key."""

    base_url: str
    database_url: str
    admin_key: str
    process: subprocess.Popen[bytes]

    def client(self, key: str | None = None, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {key or self.admin_key}"},
        )

    def register_device(self, name: str, context: RunContext, *, local: bool = False) -> tuple[int, str]:
        """Register a device with the spec `context` was measured with; returns its id and agent key."""
        spec = context.device
        body = {"name": name, **spec.to_dict(), "is_local": local}
        with self.client() as client:
            response = client.post("/v1/devices", json=body)
        if response.status_code != 201:
            raise RuntimeError(f"registering {name} failed: {response.status_code} {response.text}")
        created = response.json()
        return int(created["id"]), str(created["agent_key"])


def admin_key_for(database_url: str) -> str:
    """Create an admin key directly in the database (as `lpnet keys create --scope admin` would)."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            key = create_api_key(session, scope=KeyScope.ADMIN.value, name="served-api")[1]
            session.commit()
    finally:
        engine.dispose()
    return key


@contextmanager
def running_api(
    processes: Processes, database_url: str, data_dir: Path, settings: Mapping[str, str] | None = None
) -> Iterator[ServedApi]:
    """Migrate the database, create an admin key and run `lpnet serve` on a free loopback port."""
    upgrade(database_url, "head")
    admin = admin_key_for(database_url)
    port = free_port()
    env = lpnet_env(database_url, data_dir, {"LPNET_LOG_LEVEL": "WARNING", **(settings or {})})
    process = processes.start("serve", lpnet_args("serve", "--host", "127.0.0.1", "--port", str(port)), env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, process)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{processes.log('serve')}") from exc
    try:
        yield ServedApi(base_url, database_url, admin, process)
    finally:
        if "serve" in processes.running:
            processes.stop("serve")
