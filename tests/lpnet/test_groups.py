"""Channel groups come from torch-pruning; width vectors give pruned IR and runnable modules."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from lpnet.arch.build import build_module
from lpnet.arch.counting import network_cost
from lpnet.arch.from_torch import network_from_torchvision, torchvision_model
from lpnet.arch.groups import apply_width_vector, channel_groups, channel_layout
from lpnet.arch.ir import Network, Op
from lpnet.errors import InvalidWidthVector


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
