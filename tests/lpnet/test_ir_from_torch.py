"""The IR traced from torchvision models agrees with the models themselves."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from lpnet.arch.build import build_module
from lpnet.arch.counting import network_cost
from lpnet.arch.from_torch import (
    DEFAULT_INPUT_SHAPE,
    network_from_module,
    network_from_torchvision,
    torchvision_model,
)
from lpnet.arch.ir import (
    MAX_ACTIVATION_BYTES,
    MAX_BATCH,
    MAX_LAYER_INPUTS,
    MAX_LAYERS,
    MAX_MACS,
    MAX_PARAMS,
    MAX_SPATIAL,
    MAX_TENSOR_BYTES,
    Op,
    activation_bytes,
)
from lpnet.errors import ArchitectureTooLarge, InvalidArchitecture, UnknownModel, UnsupportedOperator

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"]


def _hook_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Count conv and linear MACs with forward hooks on the real module (independent of the IR)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.no_grad():
        model(torch.zeros(input_shape))
    return total


@pytest.mark.parametrize("name", MODELS)
def test_ir_matches_torchvision_module(name: str) -> None:
    model = torchvision_model(name)
    net = network_from_torchvision(name)
    counts = net.op_counts()
    assert counts["conv2d"] == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert counts["linear"] == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert counts.get("batchnorm2d", 0) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    cost = network_cost(net)
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.macs == _hook_macs(model, net.input_shape)


def test_known_layer_counts() -> None:
    assert len(network_from_torchvision("resnet18").layers) == 69
    assert network_from_torchvision("resnet50").op_counts()["add"] == 16
    assert network_from_torchvision("mobilenet_v2").op_counts()["relu6"] == 35


def test_built_module_computes_the_same_shapes_and_retraces_to_the_same_hash() -> None:
    net = network_from_torchvision("mobilenet_v2", (2, 3, 160, 160))
    module = build_module(net)
    with torch.no_grad():
        out = module(torch.randn(net.input_shape))
    assert out.shape == (2, 1000)
    assert network_from_module(module, net.input_shape).content_hash == net.content_hash


def test_layers_named_like_python_keywords_build() -> None:
    # torch.fx generates Python from the module's attribute names: a layer called `class` or `lambda`
    # must not become an attribute of that name.
    net = network_from_torchvision("resnet18", (1, 3, 32, 32))
    renamed = {"conv1": "class", "bn1": "lambda", "layer1.0.conv1": "import"}
    layers = [
        layer.model_copy(
            update={
                "name": renamed.get(layer.name, layer.name),
                "inputs": [renamed.get(i, i) for i in layer.inputs],
            }
        )
        for layer in net.layers
    ]
    keyworded = net.model_copy(update={"layers": layers})
    module = build_module(keyworded)
    with torch.no_grad():
        assert module(torch.randn(keyworded.input_shape)).shape == (1, 1000)


def test_input_shape_changes_spatial_sizes() -> None:
    small = network_from_torchvision("resnet18", (1, 3, 112, 112))
    assert small.by_name["conv1"].out_hw == (56, 56)
    assert network_cost(small).macs < network_cost(network_from_torchvision("resnet18")).macs


def test_unknown_torchvision_name_lists_choices() -> None:
    with pytest.raises(UnknownModel, match="resnet18"):
        network_from_torchvision("resnet19")


class _Rolls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(self.conv(x), shifts=1, dims=2)


class _LSTMish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pixel = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel(self.conv(x))


def test_unsupported_function_is_named_with_its_layer() -> None:
    with pytest.raises(UnsupportedOperator) as info:
        network_from_module(_Rolls(), (1, 3, 16, 16))
    assert info.value.op == "roll"
    assert info.value.layer == "roll"
    assert "roll" in str(info.value)


def test_unsupported_module_is_named_with_its_layer() -> None:
    with pytest.raises(UnsupportedOperator) as info:
        network_from_module(_LSTMish(), (1, 3, 16, 16))
    assert info.value.op == "PixelShuffle"
    assert info.value.layer == "pixel"


def test_depthwise_and_concat_networks_trace() -> None:
    googlenet = network_from_torchvision("googlenet")
    assert googlenet.op_counts()["concat"] == 9
    mbv2 = network_from_torchvision("mobilenet_v2")
    assert any(layer.is_depthwise for layer in mbv2.layers)
    assert all(layer.op is not Op.CONCAT for layer in mbv2.layers)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "googlenet", "regnet_x_400mf"])
def test_torchvision_models_are_traced_on_the_meta_device_into_the_same_ir(name: str) -> None:
    meta = torchvision_model(name, meta=True)
    assert all(p.is_meta for p in meta.parameters()), "nothing of the model is allocated"
    traced_for_real = network_from_module(
        torchvision_model(name), DEFAULT_INPUT_SHAPE, name=name, family=name
    )
    assert network_from_torchvision(name) == traced_for_real


@pytest.mark.parametrize(
    ("name", "standard_side"),
    # The most activation memory, the most parameters and work, the most inputs to one layer.
    [("efficientnet_b7", 600), ("regnet_y_128gf", 384), ("densenet201", 224)],
)
def test_the_largest_torchvision_models_fit_the_bounds_at_three_times_their_input(
    name: str, standard_side: int
) -> None:
    side = 3 * standard_side
    net = network_from_torchvision(name, (1, 3, side, side))
    cost = network_cost(net)
    largest, peak = activation_bytes(net)
    assert net.input_shape == (1, 3, side, side)
    assert (
        len(net.layers) <= MAX_LAYERS and max(len(layer.inputs) for layer in net.layers) <= MAX_LAYER_INPUTS
    )
    assert cost.params <= MAX_PARAMS and cost.macs <= MAX_MACS
    assert largest <= MAX_TENSOR_BYTES and peak <= MAX_ACTIVATION_BYTES


def test_an_input_shape_beyond_the_bounds_is_refused_before_any_tensor_is_made() -> None:
    with pytest.raises(InvalidArchitecture) as info:
        network_from_module(_Rolls(), (1, 3, 10**6, 16))
    assert [e["field"] for e in info.value.details["errors"]] == ["input_shape.2"]
    assert f"less than or equal to {MAX_SPATIAL}" in str(info.value)
    with pytest.raises(ArchitectureTooLarge, match="MAX_TENSOR_BYTES"):
        network_from_module(_Rolls(), (MAX_BATCH, 3, MAX_SPATIAL, MAX_SPATIAL))


def test_traces_in_several_threads_at_once_give_the_serial_answers() -> None:
    names = ["resnet18", "mobilenet_v2", "squeezenet1_1", "densenet121"] * 2
    serial = {name: network_from_torchvision(name, (1, 3, 64, 64)).content_hash for name in set(names)}
    start = threading.Barrier(len(names))

    def trace(name: str) -> str:
        start.wait()
        return network_from_torchvision(name, (1, 3, 64, 64)).content_hash

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        hashes = list(pool.map(trace, names))
    assert hashes == [serial[name] for name in names]
