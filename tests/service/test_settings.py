"""Settings: defaults, environment overrides, the derived SQLite URL and the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings, get_settings
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
