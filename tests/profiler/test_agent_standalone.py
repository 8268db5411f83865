from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from profiler.agent.options import AgentOptions, options_from_args
from profiler.agent.standalone import build_parser, main
from profiler.batch import MeasurementKind
from profiler.environment import ALLOCATOR_ENVIRONMENT, DEFAULT_SECONDS_PER_PROCESS, AllocatorPolicy
from profiler.protocol import TimingProtocol
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
    assert contexts[0].environment.allocator_retains_memory is True  # retain, the default policy
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


def test_a_budgeted_profile_times_each_sample_less_precisely_and_a_quick_one_least() -> None:
    unbounded = AgentOptions().protocol()
    budgeted = AgentOptions(budget_minutes=6).protocol()
    quick = AgentOptions(budget_minutes=6, quick_protocol=True).protocol()
    assert budgeted == TimingProtocol.budgeted()
    assert unbounded.target_precision < budgeted.target_precision < quick.target_precision
    assert budgeted.max_seconds < unbounded.max_seconds


def test_both_profiling_commands_read_their_flags_into_the_same_options() -> None:
    from service.cli import build_parser as lpnet_parser

    flags = ["--families", "resnet18, mobilenet_v2", "--kinds", "network,isolated", "--image-size", "64"]
    flags += ["--network-samples", "3", "--seed", "4", "--quick", "--no-progress", "--threads", "2"]
    flags += ["--allocator", "system", "--budget-minutes", "1.5", "--seconds-per-process", "30"]
    standalone = options_from_args(build_parser().parse_args([*flags, "--jsonl", "x.jsonl"]))
    profile = lpnet_parser().parse_args(["profile", "--device", "d", *flags, "--submit", "http://x"])
    assert options_from_args(profile) == standalone
    assert standalone.families == ["resnet18", "mobilenet_v2"]
    assert standalone.kinds == [MeasurementKind.NETWORK, MeasurementKind.ISOLATED]
    assert (standalone.threads, standalone.seed, standalone.image_size) == (2, 4, 64)
    assert standalone.allocator is AllocatorPolicy.SYSTEM and standalone.quick_protocol
    assert not standalone.progress and standalone.budget_minutes == 1.5
    assert standalone.seconds_per_process == 30
    defaults = options_from_args(build_parser().parse_args(["--jsonl", "x.jsonl"]))
    assert defaults == AgentOptions() and defaults.seconds_per_process == DEFAULT_SECONDS_PER_PROCESS
    in_process = build_parser().parse_args(["--jsonl", "x.jsonl", "--seconds-per-process", "0"])
    assert options_from_args(in_process).seconds_per_process is None
    for bad in ("-1", "inf", "nan", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--jsonl", "x.jsonl", "--seconds-per-process", bad])
    for kinds, words in (
        ("network,nope", "unknown kind 'nope'; choose from network, in_context, isolated"),
        (" , ", "no kinds in ' , '"),
    ):
        with pytest.raises(ValueError, match=words):
            options_from_args(build_parser().parse_args(["--kinds", kinds]))


def run_standalone(tmp_path: Path, environ: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """The standalone agent in a fresh process started with `environ` and no other malloc variables."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    return subprocess.run(
        [sys.executable, "-m", "profiler.agent.standalone", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**env, **environ},
    )


def test_the_agent_measures_under_system_when_told_and_refuses_where_it_cannot(tmp_path: Path) -> None:
    out = tmp_path / "cpu.jsonl"
    argv = ["--families", "resnet18", "--image-size", "32", "--network-samples", "1", "--kinds", "network"]
    argv += ["--quick", "--no-progress", "--jsonl", str(out), "--allocator", "system"]
    retaining = run_standalone(tmp_path, dict(ALLOCATOR_ENVIRONMENT[AllocatorPolicy.RETAIN]), *argv)
    assert retaining.returncode == 2, retaining.stderr[-3000:]
    assert "allocator policy is 'system'" in retaining.stderr and not out.exists()

    fresh = run_standalone(tmp_path, {}, *argv)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    contexts, rows = read_jsonl(out)
    assert [m.status for m in rows] == ["ok"] and contexts[0].environment.allocator_retains_memory is False
