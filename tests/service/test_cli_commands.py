"""The `lpnet` command line, run in-process (and once as a real process for `serve`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from service.auth import hash_api_key, verify_api_key
from service.cli import main
from service.db import migrate
from service.db.models import ApiKey, Device
from service.db.session import make_engine, make_session_factory


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    exit_code = main(list(argv))
    captured = capsys.readouterr()
    return exit_code, captured.out, captured.err


@pytest.fixture
def cli_db(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the CLI at a fresh SQLite file."""
    monkeypatch.setenv("LPNET_DATABASE_URL", sqlite_url)
    return sqlite_url


def stored_keys(url: str) -> list[ApiKey]:
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(ApiKey)))
    finally:
        engine.dispose()


def all_values(url: str) -> list[str]:
    """Every value in every table, as text."""
    engine = make_engine(url)
    values: list[str] = []
    try:
        with engine.connect() as connection:
            for table in inspect(connection).get_table_names():
                for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                    values.extend(str(value) for value in row)
    finally:
        engine.dispose()
    return values


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "worker", "db", "device", "keys", "profile", "fit", "predict", "plan", "train"):
        assert f"    {command} " in out


def test_help_works_as_a_program() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "keys" in result.stdout and "serve" in result.stdout


def test_a_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_db_upgrade_then_current(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "db", "current")
    assert code == 0 and out.strip() == "base (no schema)"

    code, out, _ = run_cli(capsys, "db", "upgrade")
    assert code == 0
    assert f"to {migrate.head()} (head)" in out

    code, out, _ = run_cli(capsys, "db", "current")
    assert code == 0 and out.strip() == f"{migrate.head()} (head)"

    code, out, _ = run_cli(capsys, "db", "upgrade")
    assert code == 0 and "already at" in out


def test_db_downgrade_to_base_and_unknown_revision(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "db", "upgrade")[0] == 0
    code, out, _ = run_cli(capsys, "db", "downgrade", "base")
    assert code == 0 and "to base" in out
    assert migrate.current(cli_db) is None

    code, out, err = run_cli(capsys, "db", "downgrade", "zzz")
    assert code == 1
    assert err.startswith("lpnet: error: cannot migrate to revision 'zzz'")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_db_upgrade_uses_the_default_sqlite_file_in_the_data_dir(
    isolated_settings: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "db", "upgrade")[0] == 0
    assert (isolated_settings / "lpnet.db").is_file()


def test_keys_create_prints_a_key_that_only_exists_as_a_hash(
    cli_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "keys", "create", "--scope", "reader", "--name", "dashboard")
    assert code == 0
    key = out.strip()
    assert key.startswith("lpn_") and len(key) > 40 and "\n" not in key
    assert "not shown again" in err

    [row] = stored_keys(cli_db)
    assert (row.name, row.scope, row.prefix) == ("dashboard", "reader", key[:12])
    assert row.key_hash == hash_api_key(key)
    assert verify_api_key(key, row.key_hash)
    assert not verify_api_key(key + "x", row.key_hash)

    assert not any(key in value for value in all_values(cli_db))
    # Nor in the files, including the WAL not yet checkpointed.
    database_file = Path(cli_db.removeprefix("sqlite:///"))
    for path in database_file.parent.glob(database_file.name + "*"):
        assert key.encode() not in path.read_bytes(), path


def test_agent_keys_belong_to_a_device(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "keys", "create", "--scope", "agent")
    assert code == 1 and "one device" in err

    code, _, err = run_cli(capsys, "keys", "create", "--scope", "agent", "--device", "pi4")
    assert code == 1 and "no device named 'pi4'" in err and "Traceback" not in err

    assert run_cli(capsys, "device", "add", "pi4", "--remote", "--hardware", "Raspberry Pi 4")[0] == 0
    code, out, _ = run_cli(capsys, "keys", "create", "--scope", "agent", "--device", "pi4")
    assert code == 0
    [row] = stored_keys(cli_db)
    assert row.scope == "agent" and row.device_id is not None and row.name == "agent@pi4"


def test_keys_list_and_revoke(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "keys", "list")
    assert code == 0 and out == "" and "no API keys" in err

    key = run_cli(capsys, "keys", "create", "--scope", "admin", "--name", "ops")[1].strip()
    code, out, _ = run_cli(capsys, "keys", "list")
    assert code == 0
    assert key[:12] in out and "ops" in out and "active" in out
    assert key not in out and hash_api_key(key) not in out

    code, out, _ = run_cli(capsys, "keys", "revoke", key[:12])
    assert code == 0 and f"revoked key {key[:12]}" in out
    [row] = stored_keys(cli_db)
    assert row.revoked_at is not None

    code, _, err = run_cli(capsys, "keys", "revoke", key[:12])
    assert code == 1 and "already revoked" in err
    code, _, err = run_cli(capsys, "keys", "revoke", "lpn_zzzzzzzz")
    assert code == 1 and "no active API key" in err
    assert run_cli(capsys, "keys", "list", "--active")[1] == ""


def test_device_add_and_list(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "device", "add", "laptop-4t", "--threads", "4")
    assert code == 0 and "added device 'laptop-4t'" in out

    code, _, err = run_cli(capsys, "device", "add", "laptop-4t")
    assert code == 1 and "exists already" in err

    code, _, err = run_cli(capsys, "device", "add", "bad name")
    assert code == 2 and "invalid device: name" in err

    code, _, err = run_cli(capsys, "device", "add", "pi", "--remote")
    assert code == 2 and "--hardware" in err

    code, _, err = run_cli(capsys, "device", "add", "gpu", "--backend", "tpu-magic")
    assert code == 2 and "unknown backend 'tpu-magic'" in err

    code, _, err = run_cli(
        capsys, "device", "add", "pi", "--remote", "--hardware", "RPi 4", "--dtype", "int3"
    )
    assert code == 2 and "dtype" in err and "int3" in err

    code, out, _ = run_cli(capsys, "device", "add", "pi", "--remote", "--hardware", "RPi 4", "--threads", "4")
    assert code == 0 and out.strip().endswith("remote")

    code, out, _ = run_cli(capsys, "device", "list")
    assert code == 0
    header, *rows = out.strip().splitlines()
    assert header.split()[:3] == ["NAME", "BACKEND", "THREADS"]
    assert [row.split()[:6] for row in rows] == [
        ["laptop-4t", "torch-cpu", "4", "1", "float32", "local"],
        ["pi", "torch-cpu", "4", "1", "float32", "remote"],
    ]

    engine = make_engine(cli_db)
    with Session(engine) as session:
        laptop, pi = session.scalars(select(Device).order_by(Device.name)).all()
        assert laptop.is_local and not pi.is_local
        # A local device carries the profiler's fingerprint of this machine; a remote one waits for its agent.
        assert laptop.environment["logical_cores"] == os.cpu_count()
        assert laptop.environment["cpu_model"].startswith(laptop.hardware)
        assert pi.environment == {} and pi.hardware == "RPi 4"
    engine.dispose()


def test_bad_settings_are_one_line_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LPNET_PORT", "eighty")
    code, _, err = run_cli(capsys, "db", "current")
    assert code == 2 and "port" in err and len(err.strip().splitlines()) == 1


def test_unreachable_database_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("LPNET_DATABASE_URL", f"postgresql+psycopg://postgres@127.0.0.1:{port}/lpnet")
    code, _, err = run_cli(capsys, "keys", "list")
    assert code == 1
    assert err.startswith("lpnet: error: database error:") and "Traceback" not in err


@pytest.mark.postgres
def test_serve_refuses_an_unmigrated_postgres_database(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LPNET_DATABASE_URL", postgres_url)
    code, _, err = run_cli(capsys, "serve", "--port", "1")
    assert code == 1
    assert "run `lpnet db upgrade`" in err
    assert migrate.current(postgres_url) is None


@pytest.mark.postgres
def test_db_upgrade_on_postgres(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LPNET_DATABASE_URL", postgres_url)
    assert run_cli(capsys, "db", "upgrade")[0] == 0
    code, out, _ = run_cli(capsys, "keys", "create", "--scope", "reader")
    assert code == 0
    assert verify_api_key(out.strip(), stored_keys(postgres_url)[0].key_hash)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.slow
def test_serve_migrates_sqlite_and_answers(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "LPNET_DATA_DIR": str(tmp_path / "served"), "LPNET_LOG_LEVEL": "warning"}
    env.pop("LPNET_DATABASE_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready is not None, (
            f"server did not answer; stderr: {process.stderr.read() if process.stderr else ''}"
        )
        assert ready.status_code == 200 and ready.json()["database"] == "sqlite"
        assert migrate.current(f"sqlite:///{tmp_path / 'served' / 'lpnet.db'}") == migrate.head()
    finally:
        process.terminate()
        process.communicate(timeout=30)
