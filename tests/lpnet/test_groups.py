"""Channel groups come from torch-pruning; width vectors give pruned IR and runnable modules."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch_pruning as tp
from torch import nn

from lpnet.arch.build import build_module
from lpnet.arch.counting import network_cost
from lpnet.arch.from_torch import network_from_module, network_from_torchvision, torchvision_model
from lpnet.arch.groups import apply_width_vector, channel_groups, channel_layout
from lpnet.arch.ir import Network, Op
from lpnet.errors import InvalidWidthVector
from service.testing.tiny import TinyResNet


def _torch_pruning_group_count(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(input_shape))
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return len(
        list(graph.get_all_groups(ignored_layers=[classifier], root_module_types=(nn.Conv2d, nn.Linear)))
    )


@pytest.mark.parametrize(("name", "expected"), [("resnet18", 12), ("resnet50", 37), ("mobilenet_v2", 25)])
def test_group_count_equals_torch_pruning_on_the_original_model(name: str, expected: int) -> None:
    net = network_from_torchvision(name)
    groups = channel_groups(net)
    assert len(groups) == expected
    assert len(groups) == _torch_pruning_group_count(torchvision_model(name), net.input_shape)


def test_residual_coupled_convs_share_a_group(resnet18_ir: Network) -> None:
    groups = channel_groups(resnet18_ir)
    stem = next(g for g in groups if "conv1" in g.out_layers)
    # conv1 feeds layer1's identity shortcuts: its channels are coupled with layer1's second convs.
    assert {"layer1.0.conv2", "layer1.1.conv2"} <= set(stem.out_layers)
    assert stem.channels == 64
    assert "fc" not in {name for g in groups for name in g.out_layers}, "the classifier's outputs stay"


def _half_widths(net: Network) -> list[int]:
    return [max(g.divisor, g.channels // 2 // g.divisor * g.divisor) for g in channel_groups(net)]


def test_width_vector_on_resnet18_gives_a_runnable_module_with_those_channels(resnet18_ir: Network) -> None:
    groups = channel_groups(resnet18_ir)
    widths = [max(1, g.channels * (i % 3 + 1) // 4) for i, g in enumerate(groups)]
    pruned = apply_width_vector(resnet18_ir, widths)
    module = build_module(pruned)
    with torch.no_grad():
        out = module(torch.randn(pruned.input_shape))
    assert out.shape == (1, 1000)
    convs = {name: m for name, m in module.named_modules() if isinstance(m, nn.Conv2d)}
    for group, width in zip(groups, widths, strict=True):
        for layer_name in group.out_layers:
            assert convs[layer_name.replace(".", "_")].out_channels == width
    assert pruned.content_hash != resnet18_ir.content_hash


def test_ir_pruning_matches_torch_pruning_physical_pruning() -> None:
    net = network_from_torchvision("mobilenet_v2")
    widths = _half_widths(net)
    ir_params = network_cost(apply_width_vector(net, widths)).params
    model = torchvision_model("mobilenet_v2")
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(net.input_shape))
    modules = dict(model.named_modules())
    for group, width in zip(channel_groups(net), widths, strict=True):
        root = modules[group.out_layers[0]]
        idxs = list(range(width, group.channels))
        if idxs:
            graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs).prune()
    assert ir_params == sum(p.numel() for p in model.parameters())


def test_full_widths_reproduce_the_network(resnet18_ir: Network) -> None:
    layout = channel_layout(resnet18_ir)
    assert apply_width_vector(resnet18_ir, layout.full_widths).content_hash == resnet18_ir.content_hash


def test_depthwise_convs_follow_their_group() -> None:
    net = network_from_torchvision("mobilenet_v2")
    pruned = apply_width_vector(net, _half_widths(net))
    for layer in pruned.layers:
        if layer.op is Op.CONV2D and net.by_name[layer.name].is_depthwise:
            assert layer.groups == layer.in_channels == layer.out_channels


def test_grouped_convs_constrain_widths() -> None:
    net = network_from_torchvision("resnext50_32x4d")
    groups = channel_groups(net)
    grouped = next(g for g in groups if g.divisor > 1)
    widths = [g.channels for g in groups]
    widths[grouped.index] = grouped.divisor + 1
    with pytest.raises(InvalidWidthVector, match=f"multiple of {grouped.divisor}"):
        apply_width_vector(net, widths)
    widths[grouped.index] = grouped.divisor * 2
    module = build_module(apply_width_vector(net, widths))
    with torch.no_grad():
        assert module(torch.randn(net.input_shape)).shape == (1, 1000)


@pytest.mark.parametrize(
    ("widths", "message"),
    [([64] * 3, "has 3 entries but the network has 12"), ([0] + [64] * 11, "between 1 and 64")],
)
def test_bad_width_vectors_are_rejected(resnet18_ir: Network, widths: list[int], message: str) -> None:
    with pytest.raises(InvalidWidthVector, match=message):
        apply_width_vector(resnet18_ir, widths)


class _FlattenHead(nn.Module):
    """Flattens a feature map straight into a linear layer: torch-pruning maps each channel to H*W features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (N, 6, 4, 4)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))  # (N, 4)


def _reference_groups(model: nn.Module, input_shape: tuple[int, ...]) -> set[tuple[int, frozenset[str]]]:
    """torch-pruning's groups of the real module after a real forward pass: (channels, pruned conv/linear)."""
    names = {module: name for name, module in model.named_modules()}
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(input_shape))
    groups = set()
    for group in graph.get_all_groups(ignored_layers=[classifier], root_module_types=(nn.Conv2d, nn.Linear)):
        pruned = [
            (names[dep.target.module], len(idxs))
            for dep, idxs in group
            if dep.handler.__name__ == "prune_out_channels"
            and isinstance(dep.target.module, nn.Conv2d | nn.Linear)
            and not (
                isinstance(dep.target.module, nn.Conv2d)
                and 1 < dep.target.module.groups == dep.target.module.in_channels
            )
        ]
        if pruned:
            groups.add((max(count for _, count in pruned), frozenset(name for name, _ in pruned)))
    return groups


@pytest.mark.parametrize(
    ("model", "input_shape"),
    [
        pytest.param(lambda: torchvision_model("resnet18"), (1, 3, 224, 224), id="resnet18"),
        pytest.param(lambda: torchvision_model("resnet50"), (1, 3, 224, 224), id="resnet50"),
        pytest.param(lambda: torchvision_model("mobilenet_v2"), (1, 3, 224, 224), id="mobilenet_v2"),
        pytest.param(lambda: TinyResNet(width=16), (1, 3, 32, 32), id="tiny-resnet"),
        pytest.param(_FlattenHead, (2, 3, 8, 8), id="flatten-head"),
    ],
)
def test_groups_analysed_on_the_meta_device_equal_those_of_the_real_module(
    model: Callable[[], nn.Module], input_shape: tuple[int, int, int, int]
) -> None:
    module = model()
    net = network_from_module(module, input_shape)
    groups = {(g.channels, frozenset(g.out_layers)) for g in channel_groups(net)}
    assert groups == _reference_groups(module, input_shape)
    assert len(groups) == len(channel_groups(net))


_ANALYSE_UNDER_MEMORY_LIMIT = """
import json, resource, sys

from lpnet.arch.groups import channel_layout
from lpnet.arch.ir import Network

small, large = (Network.model_validate(doc) for doc in json.load(sys.stdin))
channel_layout(small)  # loads every module the analysis uses
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024
limit = size + 2 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
print(json.dumps([[g.channels, list(g.out_layers)] for g in channel_layout(large).groups]))
"""


def _conv(name: str, source: str, channels: tuple[int, int], side: int, kernel: int) -> dict[str, Any]:
    return {
        "name": name,
        "op": "conv2d",
        "inputs": [source],
        "in_channels": channels[0],
        "out_channels": channels[1],
        "in_hw": [side, side],
        "out_hw": [side, side],
        "kernel": [kernel, kernel],
        "padding": [kernel // 2, kernel // 2],
    }


def test_channel_groups_are_analysed_without_allocating_the_networks_tensors() -> None:
    """A network whose input alone is 2.4 GB is analysed in a process that may allocate 2 GiB more."""

    def two_convs(channels: int, side: int) -> dict[str, Any]:
        layers = [
            _conv("c1", "input", (channels, channels), side, 3),
            _conv("c2", "c1", (channels, 16), side, 1),
        ]
        return {"input_shape": [1, channels, side, side], "layers": layers, "outputs": ["c2"]}

    documents = json.dumps([two_convs(8, 8), two_convs(256, 1536)])
    result = subprocess.run(
        [sys.executable, "-c", _ANALYSE_UNDER_MEMORY_LIMIT],
        input=documents,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == [[256, ["c1"]]]
