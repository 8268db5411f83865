"""Data-movement and channel-normalising operators: traced, validated, rebuilt, exported and re-read.

LRN, zero padding, channel softmax, channel shuffle, channel slices, nearest and bilinear
upsampling and channels-last layer norm, and the torchvision families that need them (MNASNet,
ShuffleNet v2, ConvNeXt).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lpnet.arch.build import build_module
from lpnet.arch.counting import network_cost
from lpnet.arch.from_torch import network_from_module, network_from_torchvision, torchvision_model
from lpnet.arch.groups import apply_width_vector, channel_layout
from lpnet.arch.ir import Layer, Network, Op
from lpnet.arch.onnx_io import export_onnx, network_from_onnx
from lpnet.errors import InvalidArchitecture, UnsupportedOperator

NEW_OPS = {
    Op.LRN,
    Op.PAD,
    Op.SOFTMAX,
    Op.CHANNEL_SHUFFLE,
    Op.SLICE,
    Op.UPSAMPLE_NEAREST,
    Op.UPSAMPLE_BILINEAR,
    Op.LAYERNORM,
}


class NewOps(nn.Module):
    """Each new operator once, in the forms PyTorch code writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.lrn = nn.LocalResponseNorm(5)
        self.pad = nn.ZeroPad2d(2)
        self.branch = nn.Conv2d(8, 8, 5)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lrn(torch.relu(self.conv(x)))
        kept, branch = x.chunk(2, dim=1)
        x = F.channel_shuffle(torch.cat([kept, self.branch(self.pad(branch))], 1), 4)
        x = F.softmax(x, dim=1)
        x = x + F.interpolate(F.max_pool2d(x, 2), scale_factor=2, mode="nearest")
        x = x + F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="bilinear")
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _new_ops_network(shape: tuple[int, int, int, int] = (1, 3, 32, 32)) -> Network:
    return network_from_module(NewOps().eval(), shape)


def test_every_new_op_traces_with_its_shape_rule() -> None:
    net = _new_ops_network()
    layers = {layer.op: layer for layer in net.layers}
    assert NEW_OPS <= set(layers)
    assert layers[Op.LRN].kernel == (5, 1)
    assert (layers[Op.PAD].padding, layers[Op.PAD].in_hw, layers[Op.PAD].out_hw) == (
        (2, 2),
        (32, 32),
        (36, 36),
    )
    slices = [layer for layer in net.layers if layer.op is Op.SLICE]
    assert [(s.channel_offset, s.out_channels, s.in_channels) for s in slices] == [(0, 8, 16), (8, 8, 16)]
    assert layers[Op.CHANNEL_SHUFFLE].groups == 4
    assert (layers[Op.UPSAMPLE_NEAREST].in_hw, layers[Op.UPSAMPLE_NEAREST].out_hw) == ((16, 16), (32, 32))
    assert (layers[Op.UPSAMPLE_BILINEAR].in_hw, layers[Op.UPSAMPLE_BILINEAR].out_hw) == ((8, 8), (32, 32))
    assert layers[Op.LAYERNORM].in_channels == 16
    assert network_cost(net).params == sum(p.numel() for p in NewOps().parameters())


def test_the_built_module_runs_at_the_ir_shapes_and_retraces_to_the_same_hash() -> None:
    net = _new_ops_network((2, 3, 32, 32))
    module = build_module(net)
    with torch.no_grad():
        assert tuple(module(torch.randn(net.input_shape)).shape) == (2, 10)
    assert network_from_module(module, net.input_shape).content_hash == net.content_hash


@pytest.mark.parametrize("opset", [17, 18, 20])
def test_new_ops_round_trip_through_onnx_to_the_same_hash(opset: int) -> None:
    net = _new_ops_network()
    data = export_onnx(build_module(net), net.input_shape, opset=opset)
    assert network_from_onnx(data).content_hash == net.content_hash


def test_slices_keep_their_offsets_in_the_hash() -> None:
    """Swapping the two halves of a chunk computes something else, so it hashes differently."""

    class Halves(nn.Module):
        def __init__(self, swap: bool) -> None:
            super().__init__()
            self.swap = swap

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            first, second = x.chunk(2, dim=1)
            if self.swap:
                first, second = second, first
            return torch.cat([first, torch.relu(second)], 1)

    swapped = network_from_module(Halves(swap=True), (1, 4, 8, 8))
    straight = network_from_module(Halves(swap=False), (1, 4, 8, 8))
    assert swapped.op_counts() == straight.op_counts() == {"slice": 2, "relu": 1, "concat": 1}
    assert swapped.content_hash != straight.content_hash


def _identity_shape_layer(op: Op, **fields: Any) -> dict[str, Any]:
    return (
        {"name": "x1", "op": op, "inputs": ["input"], "in_channels": 8, "out_channels": 8}
        | {
            "in_hw": (8, 8),
            "out_hw": (8, 8),
        }
        | fields
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (_identity_shape_layer(Op.PAD, padding=(1, 1)), "padding=(1, 1) gives (10, 10)"),
        (_identity_shape_layer(Op.UPSAMPLE_NEAREST, out_hw=(12, 12)), "integer multiple of in_hw"),
        (_identity_shape_layer(Op.SLICE, out_channels=4, channel_offset=6), "channels 6 to 10 are beyond"),
        (_identity_shape_layer(Op.CHANNEL_SHUFFLE, groups=3), "groups=3 must divide in_channels=8"),
        (_identity_shape_layer(Op.LRN, kernel=(5, 5)), "kernel must be (size, 1)"),
        (_identity_shape_layer(Op.SOFTMAX, out_hw=(4, 4)), "must equal in_hw"),
        (_identity_shape_layer(Op.LAYERNORM, out_channels=4), "must equal out_channels"),
        (_identity_shape_layer(Op.RELU, channel_offset=2), "channel_offset is only meaningful for slice"),
        (_identity_shape_layer(Op.SOFTMAX, padding=(1, 1)), "padding is only meaningful"),
    ],
)
def test_each_new_op_validates_its_fields(fields: dict[str, Any], message: str) -> None:
    doc = {"input_shape": (1, 8, 8, 8), "layers": [fields], "outputs": ["x1"]}
    with pytest.raises(InvalidArchitecture, match=message.replace("(", r"\(").replace(")", r"\)")):
        Network.from_dict(doc)


def _refusal(fn: Callable[[torch.Tensor], torch.Tensor]) -> UnsupportedOperator:
    class Wrapped(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fn(x)

    with pytest.raises(UnsupportedOperator) as info:
        network_from_module(Wrapped(), (1, 4, 8, 8))
    return info.value


@pytest.mark.parametrize(
    ("fn", "op", "hint"),
    [
        (lambda x: F.pad(x, (1, 0, 1, 1)), "pad", "same non-negative padding on both sides"),
        (lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"), "pad", "only zero padding"),
        (lambda x: F.softmax(x, dim=2), "softmax", "over channels (dim=1)"),
        (lambda x: F.interpolate(x, scale_factor=2, mode="bicubic"), "upsample", "nearest and bilinear"),
        (lambda x: F.interpolate(x, scale_factor=1.5), "upsample", "integer scale factors"),
        (lambda x: x.mean(1), "mean", "over H and W"),
        (lambda x: x.chunk(2, dim=2)[0], "chunk", "along channels (dim=1)"),
        (lambda x: x[:, ::2], "getitem", "contiguous slice of the channels"),
        (lambda x: x[:, :, 1:-1], "getitem", "contiguous slice of the channels"),
        (lambda x: x.permute(0, 1, 3, 2), "permute", "(N, C, H, W) <-> (N, H, W, C)"),
        (lambda x: F.layer_norm(x, (8,)), "layer_norm", "over the channels"),
        (
            lambda x: F.max_pool2d(x.permute(0, 2, 3, 1), 2),
            "channels-last tensor",
            "permuted to (N, H, W, C)",
        ),
    ],
)
def test_unsupported_variants_are_refused_naming_the_operator(
    fn: Callable[[torch.Tensor], torch.Tensor], op: str, hint: str
) -> None:
    error = _refusal(fn)
    assert error.op == op
    assert hint in error.message


@pytest.mark.parametrize("keepdim", [False, True])
def test_a_mean_over_height_and_width_is_global_pooling(keepdim: bool) -> None:
    class Mean(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean([2, 3], keepdim=keepdim)

    class Pool(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = F.adaptive_avg_pool2d(x, 1)
            return pooled if keepdim else torch.flatten(pooled, 1)

    mean = network_from_module(Mean(), (1, 4, 8, 8))
    assert mean.content_hash == network_from_module(Pool(), (1, 4, 8, 8)).content_hash
    assert [layer.op for layer in mean.layers] == [Op.ADAPTIVE_AVGPOOL2D] + ([] if keepdim else [Op.FLATTEN])


@pytest.mark.parametrize("name", ["mnasnet0_5", "shufflenet_v2_x0_5", "convnext_tiny"])
def test_new_torchvision_families_trace_with_their_parameters(name: str) -> None:
    net = network_from_torchvision(name, (1, 3, 64, 64))
    model = torchvision_model(name, meta=True)
    params = sum(p.numel() for p in model.parameters())
    counts = net.op_counts()
    if name.startswith("convnext"):
        # ConvNeXt's layer scale (C weights per block) is an IR batchnorm2d, counted with 2 C.
        layer_scales = sum(p.numel() for n, p in model.named_parameters() if n.endswith("layer_scale"))
        assert network_cost(net).params == params + layer_scales
        assert counts["layernorm"] == sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    else:
        assert network_cost(net).params == params
    if name.startswith("shufflenet"):
        assert counts["channel_shuffle"] == 16 and counts["slice"] == 2 * 13
    with torch.device("meta"):
        assert tuple(build_module(net)(torch.zeros(net.input_shape, device="meta")).shape) == (1, 1000)


def test_shufflenet_groups_keep_the_channels_its_slices_and_shuffles_read() -> None:
    net = network_from_torchvision("shufflenet_v2_x0_5", (1, 3, 64, 64))
    layout = channel_layout(net)
    assert layout.groups, "the branches' inner convolutions stay prunable"
    fixed = {layer.name for layer in net.layers if layer.op in (Op.SLICE, Op.CHANNEL_SHUFFLE)}
    for name in fixed:
        assert not layout.in_expr[name].terms
    widths = [g.divisor * max(1, g.channels // (2 * g.divisor)) for g in layout.groups]
    pruned = apply_width_vector(net, widths)
    assert network_cost(pruned).macs < network_cost(net).macs
    with torch.device("meta"):
        assert tuple(build_module(pruned)(torch.zeros(net.input_shape, device="meta")).shape) == (1, 1000)


def _onnx_model(nodes: list[onnx.NodeProto], out_shape: list[int], opset: int = 17, **inits: Any) -> bytes:
    initializers = [numpy_helper.from_array(value, name) for name, value in inits.items()]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def test_onnx_split_becomes_one_slice_per_part() -> None:
    import numpy as np

    nodes = [
        helper.make_node("Split", ["x", "sizes"], ["a", "b"], name="split", axis=1),
        helper.make_node("Concat", ["b", "a"], ["y"], name="cat", axis=1),
    ]
    net = network_from_onnx(_onnx_model(nodes, [1, 8, 8, 8], sizes=np.array([3, 5], dtype=np.int64)))
    slices = [(layer.channel_offset, layer.out_channels) for layer in net.layers if layer.op is Op.SLICE]
    assert slices == [(0, 3), (3, 5)]


@pytest.mark.parametrize(
    ("node", "inits", "out_shape", "hint"),
    [
        (
            helper.make_node("Pad", ["x", "pads"], ["y"], name="p"),
            {"pads": [0, 0, 1, 1, 0, 0, 0, 1]},
            [1, 8, 9, 10],
            "same padding on both sides",
        ),
        (
            helper.make_node("Pad", ["x", "pads"], ["y"], name="p", mode="reflect"),
            {"pads": [0, 0, 1, 1, 0, 0, 1, 1]},
            [1, 8, 10, 10],
            "only zero padding",
        ),
        (
            helper.make_node("Softmax", ["x"], ["y"], name="p", axis=2),
            {},
            [1, 8, 8, 8],
            "over channels (axis 1)",
        ),
        (
            helper.make_node("Split", ["x"], ["y", "z"], name="p", axis=2),
            {},
            [1, 8, 4, 8],
            "along channels (axis 1)",
        ),
        (
            helper.make_node("Transpose", ["x"], ["y"], name="p", perm=[0, 1, 3, 2]),
            {},
            [1, 8, 8, 8],
            "transposes and channel shuffles",
        ),
        (
            helper.make_node("Resize", ["x", "", "scales"], ["y"], name="p", mode="cubic"),
            {"scales": [1.0, 1.0, 2.0, 2.0]},
            [1, 8, 16, 16],
            "nearest and linear",
        ),
    ],
)
def test_unsupported_onnx_variants_are_refused_naming_the_node(
    node: onnx.NodeProto, inits: dict[str, list[Any]], out_shape: list[int], hint: str
) -> None:
    import numpy as np

    arrays = {
        name: np.array(values, dtype=np.float32 if name == "scales" else np.int64)
        for name, values in inits.items()
    }
    with pytest.raises(UnsupportedOperator) as info:
        network_from_onnx(_onnx_model([node], out_shape, **arrays))
    assert (info.value.op, info.value.layer) == (node.op_type, "p")
    assert hint in info.value.message


def test_a_layer_norm_over_features_and_a_classifier_softmax_are_channel_ops() -> None:
    head = nn.Sequential(nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 4), nn.Softmax(dim=1))
    net = network_from_module(head, (1, 8, 1, 1))
    assert [layer.op for layer in net.layers] == [Op.FLATTEN, Op.LAYERNORM, Op.LINEAR, Op.SOFTMAX]
    data = export_onnx(build_module(net), net.input_shape)
    assert network_from_onnx(data).content_hash == net.content_hash


def test_a_layer_built_by_hand_for_each_new_op_is_accepted() -> None:
    layers = [
        Layer(
            name="pad",
            op=Op.PAD,
            inputs=["input"],
            in_channels=4,
            out_channels=4,
            in_hw=(8, 8),
            out_hw=(10, 12),
            padding=(1, 2),
        ),
        Layer(
            name="up",
            op=Op.UPSAMPLE_BILINEAR,
            inputs=["pad"],
            in_channels=4,
            out_channels=4,
            in_hw=(10, 12),
            out_hw=(20, 36),
        ),
        Layer(
            name="half",
            op=Op.SLICE,
            inputs=["up"],
            in_channels=4,
            out_channels=2,
            in_hw=(20, 36),
            out_hw=(20, 36),
            channel_offset=2,
        ),
    ]
    net = Network(input_shape=(1, 4, 8, 8), layers=layers, outputs=["half"])
    with torch.no_grad():
        assert tuple(build_module(net)(torch.zeros(1, 4, 8, 8)).shape) == (1, 2, 20, 36)


@pytest.mark.parametrize(
    ("name", "opset"), [("shufflenet_v2_x0_5", 11), ("shufflenet_v2_x0_5", 17), ("mnasnet0_5", 13)]
)
def test_torchvision_exports_of_the_new_families_read_back_to_the_traced_hash(name: str, opset: int) -> None:
    """ShuffleNet's chunks export as Splits whose sizes come from folded shapes, its shuffles as
    Reshape-Transpose-Reshape; MNASNet's mean as ReduceMean; ConvNeXt's linears as MatMul and Add on
    channels-last tensors, its GELU (before opset 20) as Div, Erf, Add, Mul, Mul."""
    net = network_from_torchvision(name, (1, 3, 64, 64))
    data = export_onnx(torchvision_model(name), net.input_shape, opset=opset)
    assert network_from_onnx(data).content_hash == net.content_hash


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_a_channel_softmax_reads_back_at_every_opset(opset: int) -> None:
    """Before opset 13 a softmax runs over every axis from its own: exporters swap C with W around it."""
    net = network_from_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Softmax(dim=1)), (1, 3, 16, 16))
    data = export_onnx(build_module(net), net.input_shape, opset=opset)
    assert network_from_onnx(data).content_hash == net.content_hash


def _gelu_nodes(last_factor: float) -> tuple[list[onnx.NodeProto], dict[str, Any]]:
    import numpy as np

    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"], name="div"),
        helper.make_node("Erf", ["d"], ["e"], name="erf"),
        helper.make_node("Add", ["one", "e"], ["a"], name="add"),
        helper.make_node("Mul", ["a", "x"], ["m"], name="mul"),
        helper.make_node("Mul", ["m", "half"], ["y"], name="p"),
    ]
    constants = {
        "sqrt2": np.array(2**0.5, dtype=np.float32),
        "one": np.array(1.0, dtype=np.float32),
        "half": np.array(last_factor, dtype=np.float32),
    }
    return nodes, constants


def test_a_decomposed_gelu_is_one_gelu_layer() -> None:
    nodes, constants = _gelu_nodes(0.5)
    net = network_from_onnx(_onnx_model(nodes, [1, 8, 8, 8], **constants))
    assert [(layer.op, layer.inputs) for layer in net.layers] == [(Op.GELU, ["input"])]


def test_a_gelu_that_does_not_finish_is_refused_naming_the_node() -> None:
    nodes, constants = _gelu_nodes(0.25)
    with pytest.raises(UnsupportedOperator) as info:
        network_from_onnx(_onnx_model(nodes, [1, 8, 8, 8], **constants))
    assert (info.value.op, info.value.layer) == ("Mul", "p")
    assert "part of a GELU" in info.value.message


def test_a_mul_by_a_per_channel_constant_is_a_scale_and_other_constants_are_refused() -> None:
    import numpy as np

    node = helper.make_node("Mul", ["x", "scale"], ["y"], name="p")
    net = network_from_onnx(_onnx_model([node], [1, 8, 8, 8], scale=np.ones((8, 1, 1), dtype=np.float32)))
    assert [layer.op for layer in net.layers] == [Op.BATCHNORM2D]
    with pytest.raises(UnsupportedOperator) as info:
        network_from_onnx(_onnx_model([node], [1, 8, 8, 8], scale=np.ones((1, 8, 8), dtype=np.float32)))
    assert (info.value.op, info.value.layer) == ("Mul", "p")
