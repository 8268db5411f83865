"""`lpnet predict` and `lpnet device list` against a live server (`--server`/`--key` or the environment)
print what they print from the local database; a remote `lpnet plan --weights` downloads the pruned
model; `lpnet --version`."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from safetensors.torch import save_file

from lpnet.arch.onnx_io import export_onnx
from lpnet.pruning import load_pruned
from service.testing.tiny import TINY_INPUT_SHAPE, TinyProfile, tiny_module
from tests.service.test_api_plans import budget_at
from tests.service.test_cli_commands import run_cli
from tests.service.test_client import LiveServer, Served, served


@pytest.fixture
def server(
    sqlite_migrated_url: str,
    tiny_profile: TinyProfile,
    live_server: LiveServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Served]:
    """A live server whose database is also the CLI's local one, so both answers can be compared."""
    monkeypatch.setenv("LPNET_DATABASE_URL", sqlite_migrated_url)
    with served(sqlite_migrated_url, tiny_profile, live_server) as running:
        yield running


def test_version_is_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run_cli(capsys, "--version")
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"lpnet {metadata.version('lpnet')}"


def test_predict_and_device_list_read_a_remote_server_as_they_read_the_database(
    server: Served,
    tiny_profile: TinyProfile,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arch = tmp_path / "tiny.json"
    arch.write_text(tiny_profile.network.model_dump_json())
    onnx_file = tmp_path / "tiny.onnx"
    onnx_file.write_bytes(export_onnx(tiny_module().eval(), TINY_INPUT_SHAPE))
    remote = ("--server", server.url, "--key", server.keys["reader"])
    for command in (
        ("predict", "--device", "tiny-cpu", "--json", str(arch)),
        ("predict", "--device", "tiny-cpu", "resnet18", "--input-shape", "1,3,32,32", "--top", "3"),
        ("device", "list"),
    ):
        code, local_out, err = run_cli(capsys, *command)
        assert code == 0, err
        code, remote_out, err = run_cli(capsys, *command, *remote)
        assert code == 0, err
        assert remote_out == local_out
    assert "tiny-cpu" in remote_out and "NETWORKS" in remote_out
    # An ONNX file is uploaded as it is: the server names the network and its layers, the same numbers.
    onnx_command = ("predict", "--device", "tiny-cpu", "--onnx", str(onnx_file))
    code, local_out, err = run_cli(capsys, *onnx_command)
    assert code == 0, err
    code, remote_out, err = run_cli(capsys, *onnx_command, *remote)
    assert code == 0, err
    assert remote_out.startswith("tiny.onnx on tiny-cpu: ")
    assert remote_out.splitlines()[0].split(": ", 1)[1] == local_out.splitlines()[0].split(": ", 1)[1]

    # The server and key may come from the environment; the database is then not read at all.
    monkeypatch.setenv("LPNET_SERVER", server.url)
    monkeypatch.setenv("LPNET_API_KEY", server.keys["reader"])
    monkeypatch.setenv("LPNET_DATABASE_URL", f"sqlite:///{tmp_path / 'absent' / 'none.db'}")
    code, out, err = run_cli(capsys, "predict", "--device", "tiny-cpu", "--json", str(arch))
    assert code == 0, err
    assert out.startswith(f"{tiny_profile.network.name} on tiny-cpu: ")


def test_remote_reads_fail_with_one_line_naming_the_problem(
    server: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "device", "list", "--server", server.url)
    assert code == 2 and "--server needs an API key: --key or $LPNET_API_KEY" in err
    code, _, err = run_cli(capsys, "device", "list", "--server", server.url, "--key", "lpn_not_a_key")
    assert code == 1 and "401 unauthenticated" in err
    reader = ("--server", server.url, "--key", server.keys["reader"])
    code, _, err = run_cli(capsys, "predict", "--device", "no-such-device", "resnet18", *reader)
    assert code == 1 and "404 not_found" in err and "no-such-device" in err
    code, _, err = run_cli(capsys, "predict", "--device", "tiny-cpu", "resnet_nope", *reader)
    assert code == 1 and "422 unknown_model" in err

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    code, _, err = run_cli(capsys, "device", "list", "--server", f"http://127.0.0.1:{port}", "--key", "k")
    assert code == 1 and "no answer" in err
    assert len(err.strip().splitlines()) == 1


def test_a_remote_weights_plan_writes_the_pruned_model_it_downloads(
    server: Served, tiny_profile: TinyProfile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arch = tmp_path / "tiny.json"
    arch.write_text(tiny_profile.network.model_dump_json())
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_module().state_dict().items()}, weights)
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "plan", "--device", "tiny-cpu", "--json", str(arch), "--budget-ms", f"{budget_at(tiny_profile, 0.5)}",
        "--weights", str(weights), "--out", str(out), "--server", server.url, "--key", server.keys["admin"],
    )  # fmt: skip
    assert code == 0, err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["mode"] == "weights"
    pruned = load_pruned((out / "pruned.safetensors").read_bytes())
    assert pruned.widths == plan["widths"]
    assert pruned.kept_indices == [group["kept_indices"] for group in plan["groups"]]
    assert (out / "pruned.onnx").stat().st_size > 0 and "pruned.onnx" in err
