"""`lpnet plan`: locally with the device's predictor, with weights, and against a live server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
from safetensors.torch import save_file

from lpnet.arch.groups import channel_layout
from lpnet.gates.options import MAX_SKEW, MIN_KEEP_RATIO, ROUND_TO, ModeName
from lpnet.predictor.artifact import load_predictor
from lpnet.pruning import load_pruned
from service.cli import build_parser
from service.commands.plan import MODES
from service.config import Settings
from service.main import create_app
from service.testing.tiny import TinyProfile, tiny_module
from tests.service.support import Api, api_client
from tests.service.test_cli_commands import run_cli
from tests.service.test_health_api import LiveServer


@pytest.fixture
def cli_with_predictor(
    sqlite_migrated_url: str, tiny_profile: TinyProfile, monkeypatch: pytest.MonkeyPatch
) -> Api:
    monkeypatch.setenv("LPNET_DATABASE_URL", sqlite_migrated_url)
    with api_client(sqlite_migrated_url) as api:
        api.store_predictor(api.device_id, tiny_profile.fitted)
        return api


def _budget(tiny_profile: TinyProfile, share: float) -> float:
    full = load_predictor(tiny_profile.fitted.artifact).predict(tiny_profile.network).total_ms
    return share * full


def test_a_local_plan_prints_the_table_and_writes_plan_json(
    cli_with_predictor: Api, tiny_profile: TinyProfile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arch = tmp_path / "tiny.json"
    arch.write_text(tiny_profile.network.model_dump_json())
    budget = _budget(tiny_profile, 0.7)
    args = ("plan", "--device", "tiny-cpu", "--json", str(arch), "--budget-ms", f"{budget}")
    code, out, err = run_cli(capsys, *args, "--out", str(tmp_path / "out"))
    assert code == 0, err
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    groups = channel_layout(tiny_profile.network).groups
    assert len(plan["widths"]) == len(groups)
    assert plan["predicted"]["total_ms"] <= budget
    assert out.splitlines()[0].split()[:4] == ["GROUP", "CHANNELS", "KEPT", "KEEP"]
    assert f"for a budget of {budget:.3f} ms" in out
    assert "keep ratios" in out  # the allocation band's summary
    policy = cli_with_predictor.get("/v1/devices/tiny-cpu").json()["allocator"]
    assert plan["allocator"]["policy"] == policy
    assert f"allocator policy {policy}" in out

    code, out, err = run_cli(capsys, *args, "--json-output")
    assert code == 0, err
    assert json.loads(out)["widths"] == plan["widths"]


def test_a_plan_with_weights_writes_the_pruned_model(
    cli_with_predictor: Api, tiny_profile: TinyProfile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arch = tmp_path / "tiny.json"
    arch.write_text(tiny_profile.network.model_dump_json())
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_module().state_dict().items()}, weights)
    budget = _budget(tiny_profile, 0.7)
    code, out, err = run_cli(
        capsys, "plan", "--device", "tiny-cpu", "--json", str(arch), "--budget-ms", f"{budget}",
        "--weights", str(weights), "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0, err
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["mode"] == "weights"
    pruned = load_pruned((tmp_path / "out" / "pruned.safetensors").read_bytes())
    assert pruned.widths == plan["widths"]
    assert (tmp_path / "out" / "pruned.onnx").read_bytes()[:2]


def test_bad_plan_arguments_are_one_line_errors(
    cli_with_predictor: Api, tiny_profile: TinyProfile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arch = tmp_path / "tiny.json"
    arch.write_text(tiny_profile.network.model_dump_json())
    base = ("plan", "--device", "tiny-cpu", "--json", str(arch))
    code, _, err = run_cli(capsys, *base, "--budget-ms", "0.000001")
    assert code == 1 and "budget" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, *base, "--budget-ms", "1", "--mode", "weights")
    assert code == 2 and "--weights" in err
    code, _, err = run_cli(capsys, "plan", "--device", "nope", "--json", str(arch), "--budget-ms", "1")
    assert code == 1 and "no device named 'nope'" in err
    code, _, err = run_cli(capsys, *base, "--budget-ms", "1", "--server", "http://127.0.0.1:9")
    assert code == 2 and "API key" in err


def test_a_remote_plan_through_the_client(
    cli_with_predictor: Api,
    sqlite_migrated_url: str,
    tiny_profile: TinyProfile,
    live_server: LiveServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    arch = tmp_path / "tiny.json"
    arch.write_text(tiny_profile.network.model_dump_json())
    budget = _budget(tiny_profile, 0.7)
    app = create_app(Settings(database_url=sqlite_migrated_url))
    with live_server(app) as base_url:
        code, out, err = run_cli(
            capsys, "plan", "--device", "tiny-cpu", "--json", str(arch), "--budget-ms", f"{budget}",
            "--server", base_url, "--key", cli_with_predictor.keys.reader, "--out", str(tmp_path / "out"),
        )  # fmt: skip
    assert code == 0, err
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["predicted"]["total_ms"] <= budget
    assert plan["predictor_id"] > 0
    assert plan["allocator"]["policy"] == cli_with_predictor.get("/v1/devices/tiny-cpu").json()["allocator"]
    assert "GROUP" in out and "succeeded" in err and "allocator policy" in out


def test_plan_flags_take_the_planners_defaults_and_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["plan", "--device", "tiny-cpu", "resnet18", "--budget-ms", "1"]
    args = build_parser().parse_args(base)
    assert (args.round_to, args.max_skew, args.min_keep_ratio) == (
        ROUND_TO.default,
        MAX_SKEW.default,
        MIN_KEEP_RATIO.default,
    )
    args = build_parser().parse_args([*base, "--max-skew", "none", "--round-to", "16"])
    assert (args.max_skew, args.round_to) == (None, 16)
    for flags, words in (
        (["--min-keep-ratio", "0"], "argument --min-keep-ratio: must be in (0, 1], got 0"),
        (["--round-to", "512"], "argument --round-to: must be in [1, 256], got 512"),
        (["--max-skew", "wide"], "argument --max-skew: expected a number, got 'wide'"),
        (["--mode", "train"], "argument --mode: invalid choice: 'train'"),
    ):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([*base, *flags])
        assert exited.value.code == 2 and words in capsys.readouterr().err


def test_plan_modes_are_the_plan_requests_modes(capsys: pytest.CaptureFixture[str]) -> None:
    # The train mode is `lpnet train`; `lpnet plan --mode` offers what a plan request runs.
    assert MODES == get_args(ModeName) == ("architecture", "weights")
    base = ["plan", "--device", "tiny-cpu", "resnet18", "--budget-ms", "1"]
    assert build_parser().parse_args([*base, "--mode", "weights"]).mode == "weights"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--mode", "train"])
    choices = capsys.readouterr().err.partition("choose from")[2]
    assert "architecture" in choices and "weights" in choices and "train" not in choices
