"""Settings: defaults, environment overrides, the derived SQLite URL and the cache."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.auth import generate_api_key
from service.config import ADMIN_KEY_RANDOM_CHARS, Settings, get_settings
from service.db.session import is_sqlite, parse_database_url
from service.errors import InvalidInput


def test_defaults_put_an_sqlite_file_in_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LPNET_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.data_dir == tmp_path.resolve() / ".lpnet-data"
    assert (
        settings.database_url == f"sqlite:///{(tmp_path.resolve() / '.lpnet-data' / 'lpnet.db').as_posix()}"
    )
    assert (settings.host, settings.port, settings.log_level) == ("127.0.0.1", 8000, "INFO")
    assert settings.max_request_bytes > 100 * 1024 * 1024


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LPNET_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("LPNET_PORT", "9001")
    monkeypatch.setenv("LPNET_LOG_LEVEL", "debug")
    monkeypatch.setenv("LPNET_MAX_REQUEST_BYTES", "1024")
    settings = Settings()
    assert settings.port == 9001 and settings.log_level == "DEBUG" and settings.max_request_bytes == 1024
    assert settings.database_url.endswith("/d/lpnet.db")

    monkeypatch.setenv("LPNET_DATABASE_URL", "postgresql+psycopg://lpnet@db:5432/lpnet")
    assert Settings().database_url == "postgresql+psycopg://lpnet@db:5432/lpnet"


def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LPNET_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        Settings()
    monkeypatch.delenv("LPNET_PORT")
    monkeypatch.setenv("LPNET_LOG_LEVEL", "chatty")
    with pytest.raises(ValidationError, match="log_level"):
        Settings()


def test_get_settings_is_cached_until_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    monkeypatch.setenv("LPNET_PORT", "9002")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().port == 9002


def test_database_urls_are_normalised_and_checked() -> None:
    assert parse_database_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert parse_database_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert is_sqlite("sqlite:///x.db") and not is_sqlite("postgresql+psycopg://u@h/db")
    with pytest.raises(InvalidInput, match="unsupported database backend 'mysql'"):
        parse_database_url("mysql://u@h/db")
    with pytest.raises(InvalidInput, match="not a valid SQLAlchemy URL"):
        parse_database_url("not a url")


# LPNET_ADMIN_KEY ------------------------------------------------------------------------------------------

WEAK_ADMIN_KEYS = {
    # The placeholder docker-compose.yml once defaulted to.
    "old-compose-default": (
        "lpn_change-me-change-me-change-me-change-me",
        "must look like the keys lpnet makes",
    ),
    "placeholder": ("lpn_" + secrets.token_urlsafe(24) + "-Change_Me-1234", "placeholder"),
    "short": ("lpn_" + secrets.token_urlsafe(24), "at least 43"),
    "one-character": ("lpn_" + "k" * 43, "1 distinct characters"),
    "few-characters": ("lpn_" + "abcdefghijklmnopqrs" * 3, "19 distinct characters"),
    "repeated": ("lpn_" + "abcdefghijklmnopqrstuvwxyz" * 2, "repeats a run of 8 characters"),
}


def test_admin_keys_are_as_long_as_generated_ones() -> None:
    assert len(generate_api_key().key) == len("lpn_") + ADMIN_KEY_RANDOM_CHARS


@pytest.mark.parametrize(("key", "reason"), WEAK_ADMIN_KEYS.values(), ids=WEAK_ADMIN_KEYS.keys())
def test_a_placeholder_short_or_patterned_admin_key_is_refused(
    monkeypatch: pytest.MonkeyPatch, key: str, reason: str
) -> None:
    monkeypatch.setenv("LPNET_ADMIN_KEY", key)
    with pytest.raises(ValidationError) as info:
        Settings()
    [error] = info.value.errors()
    assert error["loc"] == ("admin_key",)
    assert error["msg"].startswith("Value error, LPNET_ADMIN_KEY ") and reason in error["msg"]
    assert key not in error["msg"] and "os.urandom(32)" in error["msg"]


def test_generated_admin_keys_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(200):
        key = generate_api_key().key
        monkeypatch.setenv("LPNET_ADMIN_KEY", key)
        admin_key = Settings().admin_key
        assert admin_key is not None and admin_key.get_secret_value() == key
    longer = "lpn_" + secrets.token_urlsafe(64)
    monkeypatch.setenv("LPNET_ADMIN_KEY", longer)
    assert Settings().admin_key is not None


def test_lpnet_serve_does_not_start_with_a_placeholder_admin_key(tmp_path: Path) -> None:
    placeholder = "lpn_change-me-change-me-change-me-change-me-change-me"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {name: value for name, value in os.environ.items() if not name.startswith("LPNET_")}
    env.update({"LPNET_DATA_DIR": str(tmp_path / "data"), "LPNET_ADMIN_KEY": placeholder})
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "LPNET_ADMIN_KEY is a placeholder" in result.stderr and "Traceback" not in result.stderr
    assert placeholder not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists()  # refused before touching the database
