from __future__ import annotations

from pathlib import Path

import pytest

from profiler.agent.options import AgentOptions
from profiler.agent.standalone import main
from profiler.batch import MeasurementKind
from profiler.sinks import read_jsonl


def test_agent_profiles_a_torchvision_family_into_jsonl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cpu.jsonl"
    argv = [
        "--families",
        "resnet18",
        "--image-size",
        "32",
        "--network-samples",
        "2",
        "--isolated-samples",
        "2",
        "--kinds",
        "network,isolated",
        "--quick",
        "--no-progress",
        "--jsonl",
        str(out),
    ]
    assert main(argv) == 0
    contexts, rows = read_jsonl(out)
    assert len(contexts) == 1 and contexts[0].device.backend == "torch-cpu"
    assert sorted(m.kind.value for m in rows) == ["isolated", "isolated", "network", "network"]
    assert all(m.status == "ok" and m.family == "resnet18" for m in rows)
    assert "network" in capsys.readouterr().out
    assert main(argv) == 0  # a rerun finds everything done
    assert len(read_jsonl(out)[1]) == 4


def test_agent_reports_an_unknown_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--families", "resnet_nope", "--jsonl", str(tmp_path / "x.jsonl"), "--no-progress"])
    assert code == 2
    assert "unknown torchvision model 'resnet_nope'" in capsys.readouterr().err


def test_budget_mode_lifts_the_count_caps() -> None:
    options = AgentOptions(budget_minutes=10, network_samples=5, kinds=[MeasurementKind.NETWORK])
    config = options.sampling_config()
    assert config.network_samples == 5
    assert config.isolated_samples >= 10_000
    assert config.kinds == (MeasurementKind.NETWORK,)
