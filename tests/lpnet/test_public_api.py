"""The public API (`import lpnet`): the README's Python blocks and the example of docs/python-api.md
run as written, and each entry point accepts what it documents.

The predictor is the one the README's fit block makes: fitted on real 1-thread measurements of width
variants of the example's network (resnet18 with 10 classes at 64x64), so the example predicts and
plans inside what it was trained on.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import chdir
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import lpnet
from lpnet.arch.from_torch import network_from_module
from lpnet.arch.onnx_io import export_onnx
from lpnet.errors import InvalidArchitecture, InvalidPlanOptions, PruningFailed, UnknownModel
from lpnet.predictor.artifact import ArtifactError

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"
README = DOC.parents[1] / "README.md"
EXAMPLE_INPUT = (1, 3, 64, 64)


def example_model() -> nn.Module:
    """The model of the documented example."""
    return torchvision.models.resnet18(num_classes=10)


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


@dataclass
class ReadmeFit:
    """What the README's fit block left: its predictor file, and its names (`measure`, ...)."""

    path: Path
    namespace: dict[str, Any]


@pytest.fixture(scope="module")
def readme_fit(tmp_path_factory: pytest.TempPathFactory) -> ReadmeFit:
    """The README's first Python block, run as written in a fresh directory: it times width variants
    of the example's network on this CPU and writes predictor.safetensors there."""
    directory = tmp_path_factory.mktemp("predictor")
    namespace: dict[str, Any] = {}
    with chdir(directory):
        exec(compile(python_blocks(README.read_text())[0], str(README), "exec"), namespace)
    return ReadmeFit(directory / "predictor.safetensors", namespace)


@pytest.fixture(scope="module")
def predictor_file(readme_fit: ReadmeFit) -> Path:
    """A predictor artifact fitted on measured width variants of the example's network."""
    return readme_fit.path


@pytest.fixture
def in_predictor_dir(predictor_file: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(predictor_file.parent)
    yield predictor_file


def test_the_documented_example_predicts_plans_and_prunes(
    in_predictor_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = python_blocks(DOC.read_text())
    assert blocks, f"no python code block in {DOC}"
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 25
    namespace: dict[str, Any] = {}
    exec(compile(example, str(DOC), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "unpruned:" in printed and "planned:" in printed and "pruned output (1, 10)" in printed

    net, result, pruned, before = (
        namespace["net"],
        namespace["result"],
        namespace["pruned"],
        namespace["before"],
    )
    assert isinstance(net, lpnet.Network) and isinstance(result, lpnet.PlanResult)
    # The per-layer times and the overhead add up to the total, inside its interval.
    assert sum(layer.ms for layer in before.per_layer) + before.overhead_ms == pytest.approx(
        before.total_ms, rel=1e-4
    )
    assert before.low_ms <= before.total_ms <= before.high_ms
    assert [layer.name for layer in before.per_layer] == [layer.name for layer in net.layers]
    # The plan meets its budget by prediction and actually narrows the network.
    assert result.predicted.total_ms <= result.budget_ms < before.total_ms
    assert result.widths == [group.kept for group in result.groups]
    assert sum(result.widths) < sum(group.channels for group in result.groups)
    # The pruned module, traced again from scratch, is exactly the planned architecture.
    retraced = network_from_module(pruned, EXAMPLE_INPUT)
    assert retraced.content_hash == result.pruned_network.content_hash
    convs = {name: m for name, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    planned = result.pruned_network.by_name
    assert {name: m.out_channels for name, m in convs.items()} == {
        name: planned[name].out_channels for name in convs
    }
    assert namespace["logits"].shape == (1, 10) and torch.isfinite(namespace["logits"]).all()
    # The original module is left whole.
    assert namespace["model"].fc.in_features == 512


def test_the_readme_verify_block_plans_against_measurements(
    readme_fit: ReadmeFit, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's example and verify blocks, run after its fit block as a reader runs them."""
    blocks = python_blocks(README.read_text())
    namespace = dict(readme_fit.namespace)
    with chdir(readme_fit.path.parent):
        for block in blocks[1:3]:
            exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    verified = namespace["verified"]
    assert isinstance(verified, lpnet.PlanResult) and verified.rounds
    assert all(r.measured_ms is not None and r.measured_ms > 0 for r in verified.rounds)
    assert f"budget met: {verified.met_budget}" in printed
    assert printed.count("round ") == len(verified.rounds)


def test_network_reads_every_documented_source(tmp_path: Path) -> None:
    module = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    traced = lpnet.network(module, input_shape=(3, 32, 32), name="small", batch_size=2)
    assert traced.name == "small" and traced.input_shape == (2, 3, 32, 32)
    reference = traced.content_hash

    onnx_bytes = export_onnx(module, (1, 3, 32, 32), dynamic_batch=True)
    onnx_path = tmp_path / "small.onnx"
    onnx_path.write_bytes(onnx_bytes)
    json_path = tmp_path / "small.json"
    json_path.write_text(traced.to_json())
    from_onnx = lpnet.network(onnx_bytes, batch_size=2)
    assert from_onnx.content_hash == reference
    assert lpnet.network(onnx_path, batch_size=2).content_hash == reference
    assert lpnet.network(str(onnx_path), batch_size=2).name == "small"  # the file's stem
    for source in (traced.model_dump(mode="json"), traced.to_json(), traced.to_json().encode(), json_path):
        assert lpnet.network(source).content_hash == reference
    assert lpnet.network(traced, name="renamed").name == "renamed"

    resnet = lpnet.network("resnet18", input_shape=(3, 64, 64))
    assert resnet.name == "resnet18" and resnet.input_shape == (1, 3, 64, 64)
    assert (
        resnet.content_hash == network_from_module(torchvision.models.resnet18(), (1, 3, 64, 64)).content_hash
    )


def test_network_refuses_bad_sources_with_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArchitecture, match="needs input_shape"):
        lpnet.network(nn.Conv2d(3, 8, 3))
    with pytest.raises(InvalidArchitecture, match=r"input_shape must be \(N, C, H, W\)"):
        lpnet.network(nn.Conv2d(3, 8, 3), input_shape=(32, 32))
    with pytest.raises(UnknownModel, match="unknown torchvision model 'resnet_nope'"):
        lpnet.network("resnet_nope")
    with pytest.raises(InvalidArchitecture, match="cannot read network file"):
        lpnet.network(tmp_path / "missing.onnx")
    with pytest.raises(InvalidArchitecture, match="not a readable ONNX model"):
        lpnet.network(b"\x08\x07garbage")
    with pytest.raises(InvalidArchitecture, match="invalid architecture"):
        lpnet.network({"layers": []})
    with pytest.raises(TypeError, match="cannot read a int"):
        lpnet.network(3)  # type: ignore[arg-type]


def test_plan_options_and_mismatched_modules_are_refused(predictor_file: Path) -> None:
    predictor = lpnet.load_predictor(predictor_file)
    model = example_model()
    net = lpnet.network(model, input_shape=EXAMPLE_INPUT)
    budget = 0.7 * lpnet.latency(net, predictor).total_ms
    with pytest.raises(InvalidPlanOptions, match="unknown plan option.*round_too"):
        lpnet.plan(net, predictor, budget, round_too=4)
    with pytest.raises(InvalidPlanOptions, match="unknown plan mode 'fast'"):
        lpnet.plan(net, predictor, budget, mode="fast")
    result = lpnet.plan(net, predictor, budget, mode="architecture", round_to=4, steps=50)
    assert result.mode == "architecture-only" and all(w % 4 == 0 for w in result.widths)
    with pytest.raises(PruningFailed, match="does not compute the network this plan was made for"):
        lpnet.prune(torchvision.models.resnet18(num_classes=7), result)
    with pytest.raises(ArtifactError, match="truncated"):
        lpnet.load_predictor(b"abc")


def test_import_lpnet_does_not_load_torch() -> None:
    code = "import sys, lpnet; error = lpnet.LpnetError; print('torch' in sys.modules, error.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "lpnet.errors"]
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        lpnet.nothing_here  # noqa: B018
