"""Physical pruning through torch-pruning: shapes equal the plan, weights follow, save/load/ONNX."""

from __future__ import annotations

import pytest
import torch

from lpnet.arch.from_torch import network_from_torchvision, torchvision_model
from lpnet.arch.groups import apply_width_vector, channel_groups
from lpnet.arch.ir import Network
from lpnet.arch.onnx_io import network_from_onnx
from lpnet.errors import PruningFailed, WeightsMismatch
from lpnet.pruning import (
    check_channels,
    dump_pruned,
    export_pruned_onnx,
    group_l1_scores,
    ir_state_dict,
    kept_indices_for,
    layer_modules,
    load_ir_state_dict,
    load_pruned,
    module_with_weights,
    prune_module,
)

SMALL = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet18_small() -> Network:
    return network_from_torchvision("resnet18", SMALL)


def _half_widths(network: Network) -> list[int]:
    return [max(8, (g.channels // 2) // 8 * 8) for g in channel_groups(network)]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_pruned_torchvision_module_has_the_planned_channels(name: str, resnet18_small: Network) -> None:
    network = resnet18_small if name == "resnet18" else network_from_torchvision(name, SMALL)
    module = torchvision_model(name)
    widths = _half_widths(network)
    pruned = prune_module(module, network, widths)
    planned = apply_width_vector(network, widths)
    assert pruned.network == planned
    modules = layer_modules(pruned.module, planned)
    for layer in planned.layers:
        sub = modules.get(layer.name)
        if isinstance(sub, torch.nn.Conv2d):
            assert (sub.in_channels, sub.out_channels, sub.groups) == (
                layer.in_channels,
                layer.out_channels,
                layer.groups,
            )
    with torch.no_grad():
        assert pruned.module(torch.randn(SMALL)).shape == (1, 1000)
    # The original is untouched.
    assert sum(p.numel() for p in module.parameters()) > sum(p.numel() for p in pruned.module.parameters())
    assert layer_modules(module, network).keys() == modules.keys()
    check_channels(module, network)


def test_kept_filters_carry_their_weights(resnet18_small: Network) -> None:
    network = resnet18_small
    module = torchvision_model("resnet18")
    widths = _half_widths(network)
    kept = kept_indices_for(module, network, widths, "l1")
    scores = group_l1_scores(module, network)
    for s, keep, width in zip(scores, kept, widths, strict=True):
        assert len(keep) == width
        assert float(s[keep].min()) >= float(s[[i for i in range(len(s)) if i not in keep]].max())
    pruned = prune_module(module, network, widths, kept)
    torch.testing.assert_close(pruned.module.conv1.weight, module.conv1.weight[kept[0]])
    torch.testing.assert_close(pruned.module.bn1.running_var, module.bn1.running_var[kept[0]])
    # layer1.0.conv1 reads group 0 and writes group 1
    torch.testing.assert_close(
        pruned.module.layer1[0].conv1.weight, module.layer1[0].conv1.weight[kept[1]][:, kept[0]]
    )


def test_save_load_and_onnx_round_trip(resnet18_small: Network) -> None:
    network = resnet18_small
    module = torchvision_model("resnet18")
    pruned = prune_module(module, network, _half_widths(network), selection="first")
    restored = load_pruned(dump_pruned(pruned))
    assert restored.network == pruned.network
    assert restored.widths == pruned.widths and restored.kept_indices == pruned.kept_indices
    x = torch.randn(SMALL)
    with torch.no_grad():
        torch.testing.assert_close(restored.module(x), pruned.module(x))
    onnx_net = network_from_onnx(export_pruned_onnx(pruned))
    assert onnx_net.content_hash == pruned.network.content_hash


def test_ir_state_dict_round_trips_between_torchvision_and_built_modules(resnet18_small: Network) -> None:
    network = resnet18_small
    module = torchvision_model("resnet18")
    weights = ir_state_dict(module, network)
    assert "layer1.0.conv1.weight" in weights and "fc.weight" in weights
    assert set(weights) <= set(module.state_dict())
    built = module_with_weights(network, weights)
    x = torch.randn(SMALL)
    with torch.no_grad():
        torch.testing.assert_close(built(x), module(x))
    weights["fc.weight"] = torch.zeros(10, 512)
    with pytest.raises(WeightsMismatch) as info:
        load_ir_state_dict(built, network, weights)
    assert info.value.tensor == "fc.weight"
    weights.pop("fc.weight")
    weights["head.weight"] = torch.zeros(3)
    with pytest.raises(WeightsMismatch, match="does not belong"):
        load_ir_state_dict(built, network, weights)


def test_bad_kept_indices_and_shape_drift_are_reported(resnet18_small: Network) -> None:
    network = resnet18_small
    module = torchvision_model("resnet18")
    widths = _half_widths(network)
    kept = [list(range(w)) for w in widths]
    kept[0] = kept[0][:-1]
    with pytest.raises(PruningFailed, match="group 0"):
        prune_module(module, network, widths, kept)
    with pytest.raises(PruningFailed, match="conv1"):
        check_channels(module, apply_width_vector(network, widths))
