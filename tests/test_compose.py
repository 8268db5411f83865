"""docker-compose.yml: its structure, and its services' commands run outside Docker on a real PostgreSQL.

Docker is not available to the tests, so the file is parsed with PyYAML and checked (services,
healthchecks, start order, environment wiring, variables and their defaults, volumes), then each
service's own command and environment, interpolated the way Compose does it, run as local processes:
the ``postgres`` host becomes the test server at 127.0.0.1:5432 with a fresh database, ``api:8000`` a
free loopback port, and each named volume a temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy.engine import make_url

from lpnet.predictor.artifact import load_predictor
from profiler.agent.cli import config_from_args
from service.auth import generate_api_key
from service.cli import build_parser
from service.config import ADMIN_KEY_PATTERN, Settings
from service.db.models import Job
from service.db.session import make_engine, make_session_factory
from service.predictors import FittedPredictor, store_predictor
from service.testing.tiny import TinyProfile, measure_tiny_profile

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
BIN = Path(sys.executable).parent
LPNET_SERVICES = ("api", "worker", "agent")
# What a user puts in .env: the one variable the compose file has no default for.
ADMIN_KEY = generate_api_key().key

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR and the $$ escape, as
# Compose reads them.
VARIABLE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


# Reading the file -----------------------------------------------------------------------------------


def compose_text() -> str:
    return COMPOSE_FILE.read_text(encoding="utf-8")


def compose_file() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(compose_text())
    return data


def variables_in(text: str) -> list[tuple[str, str | None]]:
    """Every variable the text uses, with its default (None when it has none)."""
    found: list[tuple[str, str | None]] = []
    for match in VARIABLE.finditer(text):
        if match.group(0) == "$$":
            continue
        if match.group("bare"):
            found.append((match.group("bare"), None))
        else:
            default = match.group("default") if match.group("op") == ":-" else None
            found.append((match.group("braced"), default))
    return found


def required_variables(text: str) -> set[str]:
    """Variables used as ``${VAR:?error}``: Compose refuses to start while they are unset or empty."""
    return {match.group("braced") for match in VARIABLE.finditer(text) if match.group("op") == ":?"}


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(value: Any, variables: Mapping[str, str]) -> Any:
    """`value` with ${VAR:-default} and $$ resolved in every string, as `docker compose config` does."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        given = variables.get(name)
        if match.group("op") == ":-":
            return given if given else match.group("default")
        if match.group("op") == ":?" and not given:
            raise KeyError(f"{name}: {match.group('default')}")
        if given is None:
            raise KeyError(f"{name} is unset and has no default")
        return given

    return VARIABLE.sub(replace, value)


def resolved(variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file with its variables resolved: `ADMIN_KEY` and the defaults, unless given."""
    result: dict[str, Any] = interpolate(compose_file(), {"LPNET_ADMIN_KEY": ADMIN_KEY, **(variables or {})})
    return result


def command_of(service: Mapping[str, Any]) -> list[str]:
    command = service["command"]
    return list(command) if isinstance(command, list) else shlex.split(command)


def lpnet_invocations(service: Mapping[str, Any]) -> list[list[str]]:
    """The `lpnet ...` command lines a service runs (a ``sh -c`` script may run several)."""
    command = command_of(service)
    if command[:2] == ["sh", "-c"]:
        lines = [shlex.split(part) for part in re.split(r"&&|;", command[2])]
        return [[word for word in line if word != "exec"] for line in lines if line]
    return [command]


# The file's structure -------------------------------------------------------------------------------


def test_the_services_share_one_image_built_from_the_dockerfile() -> None:
    services = resolved()["services"]
    assert set(services) == {"postgres", "api", "worker", "agent"}
    assert services["postgres"]["image"].startswith("postgres:")
    images = {services[name]["image"] for name in LPNET_SERVICES}
    assert len(images) == 1
    assert all(services[name]["build"] == "." for name in LPNET_SERVICES)
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "torch==2.14.1 torchvision==0.29.1" in dockerfile and "pip install -e '.[server]'" in dockerfile


def test_healthchecks_and_start_order() -> None:
    services = resolved()["services"]
    postgres_check = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in postgres_check
    api_check = services["api"]["healthcheck"]["test"]
    assert api_check[0] == "CMD" and "/readyz" in " ".join(api_check)

    def depends(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    assert depends("api") == {"postgres": "service_healthy"}
    # The api migrates the schema: workers start only once it is healthy.
    assert depends("worker") == {"postgres": "service_healthy", "api": "service_healthy"}
    assert depends("agent") == {"api": "service_healthy"}


def test_the_commands_are_lpnet_commands_that_parse() -> None:
    services = resolved()["services"]
    parser = build_parser()
    api = lpnet_invocations(services["api"])
    assert [line[:3] for line in api] == [["lpnet", "db", "upgrade"], ["lpnet", "serve"]]
    assert lpnet_invocations(services["worker"]) == [["lpnet", "worker"]]
    for name in LPNET_SERVICES:
        for line in lpnet_invocations(services[name]):
            assert line[0] == "lpnet"
            parser.parse_args(line[1:])  # exits (SystemExit) on an unknown flag
    agent = parser.parse_args(command_of(services["agent"])[1:])
    assert agent.server == "http://api:8000" and agent.device == "container-cpu"
    assert agent.token is None and agent.profile_minutes == 30
    # The agent reads the admin key from its environment.
    agent_env = {name: str(value) for name, value in services["agent"]["environment"].items()}
    assert config_from_args(agent, environ=agent_env).token == ADMIN_KEY


def test_the_admin_key_has_no_default_and_never_reaches_a_command_line() -> None:
    assert required_variables(compose_text()) == {"LPNET_ADMIN_KEY"}
    for unset in ({}, {"LPNET_ADMIN_KEY": ""}):
        with pytest.raises(KeyError, match="LPNET_ADMIN_KEY: set LPNET_ADMIN_KEY in .env"):
            interpolate(compose_file(), unset)
    services = resolved()["services"]
    for name in LPNET_SERVICES:
        assert ADMIN_KEY not in " ".join(command_of(services[name])), f"{name}'s command line shows the key"
    assert services["api"]["environment"]["LPNET_ADMIN_KEY"] == ADMIN_KEY
    assert services["agent"]["environment"]["LPNET_API_KEY"] == ADMIN_KEY
    assert "LPNET_ADMIN_KEY" not in services["worker"]["environment"]
    assert "lpn_" not in compose_text() and env_example()["LPNET_ADMIN_KEY"] == ""


def test_the_environment_wires_the_services_together(monkeypatch: pytest.MonkeyPatch) -> None:
    services = resolved()["services"]
    api_env = services["api"]["environment"]
    url = make_url(api_env["LPNET_DATABASE_URL"])
    postgres_env = services["postgres"]["environment"]
    assert url.drivername == "postgresql+psycopg" and url.host == "postgres" and url.port == 5432
    assert (url.username, url.password, url.database) == (
        postgres_env["POSTGRES_USER"],
        postgres_env["POSTGRES_PASSWORD"],
        postgres_env["POSTGRES_DB"],
    )
    assert services["worker"]["environment"]["LPNET_DATABASE_URL"] == api_env["LPNET_DATABASE_URL"]
    assert api_env["LPNET_HOST"] == "0.0.0.0"
    assert ADMIN_KEY_PATTERN.fullmatch(api_env["LPNET_ADMIN_KEY"])
    # The API's environment is valid settings, with the scale-out choices.
    for name in [n for n in os.environ if n.startswith("LPNET_")]:
        monkeypatch.delenv(name)
    for name, value in api_env.items():
        monkeypatch.setenv(name, str(value))
    settings = Settings()
    assert settings.worker.embedded is False and settings.first_run.enabled is False
    assert settings.port == 8000 and settings.admin_key is not None
    assert f"127.0.0.1:{settings.port}/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert make_url(settings.database_url) == url
    agent = build_parser().parse_args(command_of(services["agent"])[1:])
    assert agent.server == f"http://api:{settings.port}"
    # A scaled-out worker has no fixed name and no host port.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]


def test_every_variable_has_a_default_listed_in_env_example() -> None:
    required = required_variables(compose_text())
    used = [(name, default) for name, default in variables_in(compose_text()) if name not in required]
    assert used, "the compose file uses no variables?"
    without_default = sorted({name for name, default in used if default is None})
    assert without_default == [], f"variables without a ${{VAR:-default}}: {without_default}"
    defaults: dict[str, set[str]] = {}
    for name, default in used:
        defaults.setdefault(name, set()).add(str(default))
    differing = {name: values for name, values in defaults.items() if len(values) > 1}
    assert differing == {}, f"one variable, several defaults: {differing}"
    example = env_example()
    assert set(example) == set(defaults) | required, (
        "the variables of .env.example and docker-compose.yml differ"
    )
    # A required variable is listed empty: a copied .env without a value of its own stops Compose.
    assert {name: values.pop() for name, values in defaults.items()} | dict.fromkeys(required, "") == example


def test_named_volumes_are_declared_and_mounted() -> None:
    data = resolved()
    declared = set(data["volumes"])
    assert declared == {"postgres-data", "agent-state"}
    mounts = {
        name: [volume.split(":") for volume in service.get("volumes", [])]
        for name, service in data["services"].items()
    }
    assert mounts["postgres"] == [["postgres-data", "/var/lib/postgresql/data"]]
    assert mounts["agent"] == [
        ["agent-state", data["services"]["agent"]["environment"]["LPNET_AGENT_STATE_DIR"]]
    ]
    for volumes in mounts.values():
        for source, *_ in volumes:
            assert source in declared, f"volume {source} is not declared"


# The services, run outside Docker -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Localized:
    """Maps the compose network onto this machine: service hosts to loopback, volumes to directories."""

    def __init__(self, postgres_url: str, tmp_path: Path) -> None:
        test_url = make_url(postgres_url)
        self.api_port = free_port()
        self.hosts = {
            "postgres:5432": f"{test_url.host}:{test_url.port or 5432}",
            "api:8000": f"127.0.0.1:{self.api_port}",
            "127.0.0.1:8000": f"127.0.0.1:{self.api_port}",
        }
        self.variables = {
            "POSTGRES_USER": test_url.username or "postgres",
            "POSTGRES_PASSWORD": test_url.password or "unused-with-trust-auth",
            "POSTGRES_DB": str(test_url.database),
            # A tiny campaign: the test is about wiring, not measuring.
            "LPNET_AGENT_PROFILE_MINUTES": "0.05",
            "LPNET_LOG_LEVEL": "INFO",
        }
        self.compose = resolved(self.variables)
        self.tmp_path = tmp_path
        self.volumes: dict[str, str] = {}
        for service in self.compose["services"].values():
            for volume in service.get("volumes", []):
                source, target = volume.split(":")[:2]
                self.volumes[target] = str(tmp_path / "volumes" / source)
                Path(self.volumes[target]).mkdir(parents=True, exist_ok=True)

    def text(self, value: str) -> str:
        for remote, local in {**self.hosts, **self.volumes}.items():
            value = value.replace(remote, local)
        return value

    def service(self, name: str) -> dict[str, Any]:
        return dict(self.compose["services"][name])

    def command(self, name: str) -> list[str]:
        return [self.text(word) for word in command_of(self.service(name))]

    def env(self, name: str) -> dict[str, str]:
        """The service's environment, localized, on top of a clean process environment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LPNET_", "POSTGRES_"))}
        # `lpnet` and `python` of this virtualenv, as the image has them on its PATH.
        env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
        # The image's ENV LPNET_DATA_DIR=/data; unused on PostgreSQL, but kept out of the repository.
        env["LPNET_DATA_DIR"] = str(self.tmp_path / f"data-{name}")
        env.update(
            {key: self.text(str(value)) for key, value in self.service(name).get("environment", {}).items()}
        )
        return env


class Started:
    """The processes a test started, with logs; all stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command, env=dict(env), cwd=self.log_dir, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop_all(self, timeout: float = 20.0) -> dict[str, int]:
        """SIGTERM every process, wait for them (SIGKILL after `timeout`); returns their exit codes."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        return {name: int(process.returncode) for name, process in self.processes.items()}


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Started]:
    processes = Started(tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


def wait_for(description: str, check: Any, timeout: float, started: Started, names: list[str]) -> Any:
    """Poll `check()` until it returns something truthy; fail with the processes' logs on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        for name in names:
            process = started.processes[name]
            if process.poll() is not None:
                pytest.fail(
                    f"{name} exited with {process.returncode} while waiting for {description}:\n{started.log(name)}"
                )
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name}\n{started.log(name)}" for name in names)
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {description}\n{logs}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def tiny_profile() -> TinyProfile:
    """Real measurements of the tiny network and a predictor fitted on them (about 10 s)."""
    return measure_tiny_profile()


def store_predictor_for(database_url: str, device_id: int, fitted: FittedPredictor) -> None:
    """Store a fitted predictor for the device, as a finished fit job would."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            store_predictor(session, device_id, fitted)
            session.commit()
    finally:
        engine.dispose()


def job_owner(database_url: str, job_id: int) -> str:
    """The lease owner (``host:pid:random``) of the job's last attempt."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.lease_owner is not None
            return job.lease_owner
    finally:
        engine.dispose()


def http_ok(url: str, key: str | None = None) -> httpx.Response | None:
    try:
        response = httpx.get(url, timeout=2.0, headers={"Authorization": f"Bearer {key}"} if key else None)
    except httpx.TransportError:
        return None
    return response if response.status_code == 200 else None


def check_postgres_healthcheck(local: Localized) -> None:
    """postgres: its healthcheck (pg_isready on 127.0.0.1, the container's own address there) answers."""
    check = local.service("postgres")["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL"
    if (
        subprocess.run(["sh", "-c", "command -v pg_isready"], capture_output=True, check=False).returncode
        == 0
    ):
        env = {**os.environ, **local.service("postgres")["environment"]}
        env["PGPORT"] = local.hosts["postgres:5432"].split(":")[1]
        result = subprocess.run(["sh", "-c", check[1]], env=env, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def start_api(local: Localized, started: Started) -> tuple[str, str]:
    """api: migrate, then serve (on loopback here, not 0.0.0.0); its URL and admin key."""
    api_env = {**local.env("api"), "LPNET_HOST": "127.0.0.1", "LPNET_PORT": str(local.api_port)}
    started.start("api", local.command("api"), api_env)
    base = f"http://127.0.0.1:{local.api_port}"
    wait_for("/readyz", lambda: http_ok(f"{base}/readyz"), 60, started, ["api"])
    assert "upgraded from base (no schema)" in started.log("api")
    healthcheck = [local.text(word) for word in local.service("api")["healthcheck"]["test"][1:]]
    result = subprocess.run(healthcheck, env=api_env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    admin_key = api_env["LPNET_ADMIN_KEY"]
    assert http_ok(f"{base}/v1/devices", admin_key) is not None, "LPNET_ADMIN_KEY is not an admin key"
    return base, admin_key


def check_agent_takes_its_campaign(
    local: Localized, started: Started, base: str, admin_key: str, tmp_path: Path
) -> None:
    """The agent registers its device with the admin key, switches to an agent key of its own kept in
    the (localized) state volume, and leases the campaign of the budget it was given. Measuring for
    that budget is the agent's own test (tests/profiler); here it is stopped once the campaign is its.
    Started after the plan: once it leases its campaign it measures, and would slow everything else."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    agent_command = local.command("agent")
    assert agent_command[agent_command.index("--server") + 1] == base
    started.start("agent", agent_command, local.env("agent"))

    def campaign_leased() -> dict[str, Any] | None:
        answer = http_ok(f"{base}/v1/devices/container-cpu/tasks", admin_key)
        tasks = answer.json()["items"] if answer is not None else []
        return tasks[0] if tasks and tasks[0]["status"] == "leased" else None

    task = wait_for("the agent's campaign", campaign_leased, 60, started, ["api", "agent"])
    assert task["kind"] == "profile_campaign" and task["payload"]["budget_minutes"] == 0.05
    state_dir = Path(local.env("agent")["LPNET_AGENT_STATE_DIR"])
    assert state_dir.is_relative_to(tmp_path)
    state = json.loads((state_dir / "agent.json").read_text())
    assert state["device_name"] == "container-cpu" and state["agent_key"] != admin_key
    assert task["lease_owner"] == state["agent_id"]
    device = httpx.get(f"{base}/v1/devices/container-cpu", headers=headers, timeout=5)
    assert device.status_code == 200 and device.json()["is_local"] is False, device.text


@pytest.mark.postgres
@pytest.mark.slow
def test_the_services_run_against_postgres(
    postgres_url: str, tmp_path: Path, started: Started, tiny_profile: TinyProfile
) -> None:
    local = Localized(postgres_url, tmp_path)
    check_postgres_healthcheck(local)
    base, admin_key = start_api(local, started)

    # Two workers (`--scale worker=2`) and the agent, each with its own command and environment.
    workers = ("worker-1", "worker-2")
    for name in workers:
        started.start(name, local.command("worker"), local.env("worker"))

    # The workers: a plan job runs on one of them.
    headers = {"Authorization": f"Bearer {admin_key}"}
    created = httpx.post(
        f"{base}/v1/devices",
        headers=headers,
        json={"name": "planning-cpu", "hardware": "test-cpu", "backend": "torch-cpu", "threads": 1},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    store_predictor_for(postgres_url, int(created.json()["id"]), tiny_profile.fitted)
    budget_ms = 0.7 * load_predictor(tiny_profile.fitted.artifact).predict(tiny_profile.network).total_ms
    plan = {
        "device": "planning-cpu",
        "architecture": tiny_profile.network.model_dump(mode="json"),
        "budget_ms": budget_ms,
    }
    accepted = httpx.post(f"{base}/v1/plans", headers=headers, json=plan, timeout=10)
    assert accepted.status_code == 202, accepted.text

    def finished() -> dict[str, Any] | None:
        answer = httpx.get(f"{base}{accepted.json()['status_url']}", headers=headers, timeout=5).json()
        return answer if answer["status"] in ("succeeded", "failed") else None

    done = wait_for("the plan", finished, 60, started, ["api", *workers])
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["predicted"]["total_ms"] <= budget_ms
    owner = job_owner(postgres_url, int(accepted.json()["job_id"]))
    assert int(owner.split(":")[-2]) in {started.processes[name].pid for name in workers}

    check_agent_takes_its_campaign(local, started, base, admin_key, tmp_path)

    # Everything stops cleanly on SIGTERM (what `docker compose stop` sends). uvicorn exits by the
    # signal it got once its shutdown completed.
    codes = started.stop_all()
    assert codes["agent"] == 0, started.log("agent")
    assert codes["worker-1"] == codes["worker-2"] == 0, started.log("worker-1") + started.log("worker-2")
    assert codes["api"] in (0, -signal.SIGTERM), started.log("api")
    assert "Application shutdown complete" in started.log("api")
