"""`.env`: the CLI reads it for the LPNET_* variables not set, and never lets it override the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.cli import main
from service.config import load_env_file


@pytest.fixture
def env_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run in an empty directory on a copy of the environment, restored after the test."""
    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.delenv("LPNET_ENV_FILE")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_dot_env_fills_unset_variables_and_the_environment_wins(env_copy: Path) -> None:
    (env_copy / ".env").write_text(
        "# as in .env.example\nLPNET_PORT=9123\nLPNET_LOG_LEVEL=debug\nLPNET_ADMIN_KEY=\nPOSTGRES_DB=lpnet\n"
    )
    os.environ["LPNET_LOG_LEVEL"] = "warning"
    assert load_env_file() == Path(".env")
    assert os.environ["LPNET_PORT"] == "9123"
    assert os.environ["LPNET_LOG_LEVEL"] == "warning"
    assert os.environ["POSTGRES_DB"] == "lpnet"


def test_without_a_dot_env_nothing_changes(env_copy: Path) -> None:
    before = dict(os.environ)
    assert load_env_file() is None
    assert dict(os.environ) == before


def test_lpnet_env_file_names_another_file_or_none(env_copy: Path) -> None:
    (env_copy / ".env").write_text("LPNET_PORT=9123\n")
    (env_copy / "staging.env").write_text("LPNET_PORT=9456\n")
    os.environ["LPNET_ENV_FILE"] = ""
    assert load_env_file() is None and "LPNET_PORT" not in os.environ
    os.environ["LPNET_ENV_FILE"] = str(env_copy / "staging.env")
    assert load_env_file() == env_copy / "staging.env" and os.environ["LPNET_PORT"] == "9456"


def test_the_cli_reads_dot_env_and_names_a_missing_env_file(
    env_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = env_copy / "from-dot-env"
    # The empty admin key is how .env.example leaves it: unset, not an invalid key.
    (env_copy / ".env").write_text(f"LPNET_DATA_DIR={data_dir}\nLPNET_ADMIN_KEY=\n")
    os.environ.pop("LPNET_DATA_DIR", None)
    os.environ.pop("LPNET_DATABASE_URL", None)
    assert main(["db", "upgrade"]) == 0
    assert (data_dir / "lpnet.db").is_file()

    os.environ["LPNET_ENV_FILE"] = str(env_copy / "missing.env")
    assert main(["db", "current"]) == 2
    err = capsys.readouterr().err
    assert "LPNET_ENV_FILE names" in err and "missing.env" in err and "Traceback" not in err
