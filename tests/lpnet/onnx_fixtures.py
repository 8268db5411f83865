"""ONNX files written the way other toolchains write them, built with onnx.helper.

Each builder returns a ModelProto; the torch modules beside them compute the same thing, so a test can
compare what the reader makes of a file with what `network_from_module` makes of the module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper
from torch import nn

IMAGE_SHAPE = (1, 3, 16, 16)
STEM_CHANNELS = 64  # conv weight 64x3x7x7: above the reader's MAX_FOLDED_ELEMENTS, so kept as a shape
CLASSES = 80  # fc weight 80x64: also above it


def stem_and_classifier() -> nn.Module:
    """The network both `caffe2_style_model` and `plain_weights_model` describe."""
    return nn.Sequential(
        nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=3),
        nn.BatchNorm2d(STEM_CHANNELS),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(STEM_CHANNELS, CLASSES),
    )


def _array(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(values, name)


def _model(
    nodes: Sequence[NodeProto],
    initializers: Sequence[TensorProto],
    opset: int,
    input_shape: Sequence[int | str] = ("batch", *IMAGE_SHAPE[1:]),
) -> ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _network_nodes() -> list[NodeProto]:
    """Conv -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm, on named weights."""
    return [
        helper.make_node(
            "Conv",
            ["x", "conv.weight", "conv.bias"],
            ["c"],
            name="conv",
            kernel_shape=[7, 7],
            strides=[2, 2],
            pads=[3, 3, 3, 3],
        ),
        helper.make_node(
            "BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"], name="bn"
        ),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]


def plain_weights_model(opset: int) -> ModelProto:
    """`stem_and_classifier` with every weight a float initializer, as a folding exporter writes it."""
    c, k = STEM_CHANNELS, CLASSES
    weights = {
        "conv.weight": np.full((c, 3, 7, 7), 0.01, np.float32),
        "conv.bias": np.ones(c, np.float32),
        "bn.scale": np.ones(c, np.float32),
        "bn.bias": np.zeros(c, np.float32),
        "bn.mean": np.zeros(c, np.float32),
        "bn.var": np.ones(c, np.float32),
        "fc.weight": np.full((k, c), 0.5, np.float32),
        "fc.bias": np.zeros(k, np.float32),
    }
    return _model(_network_nodes(), [_array(name, value) for name, value in weights.items()], opset)


def caffe2_style_model(opset: int) -> ModelProto:
    """`plain_weights_model` with each weight computed from constants, as older exporters write them.

    The conv weight is a ConstantOfShape, the other weights Cast, Identity or Reshape of initializers
    and Constant nodes, one of them a chain of two. Needs opset 9 or later (ConstantOfShape).
    """
    c, k = STEM_CHANNELS, CLASSES
    fill = helper.make_tensor("fill", TensorProto.FLOAT, [1], [0.01])
    weight_nodes = [
        helper.make_node("ConstantOfShape", ["conv.weight.shape"], ["conv.weight"], value=fill),
        helper.make_node("Cast", ["conv.bias.int"], ["conv.bias"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["bn.scale.init"], ["bn.scale"]),
        helper.make_node("Reshape", ["bn.bias.row", "bn.bias.shape"], ["bn.bias"]),
        helper.make_node(
            "ConstantOfShape",
            ["bn.mean.shape"],
            ["bn.mean"],
            value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
        ),
        helper.make_node(
            "Constant",
            [],
            ["bn.var.half"],
            value=_array("bn.var.half", np.ones(c, np.float16)),
        ),
        helper.make_node("Cast", ["bn.var.half"], ["bn.var"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["fc.weight.shape"], value=_array("s", np.array([k, c], np.int64))),
        helper.make_node("Reshape", ["fc.weight.flat", "fc.weight.shape"], ["fc.weight"]),
        helper.make_node("Cast", ["fc.bias.double"], ["fc.bias.float"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["fc.bias.float"], ["fc.bias"]),
    ]
    initializers = [
        _array("conv.weight.shape", np.array([c, 3, 7, 7], np.int64)),
        _array("conv.bias.int", np.ones(c, np.int32)),
        _array("bn.scale.init", np.ones(c, np.float32)),
        _array("bn.bias.row", np.zeros((1, c), np.float32)),
        _array("bn.bias.shape", np.array([c], np.int64)),
        _array("bn.mean.shape", np.array([c], np.int64)),
        _array("fc.weight.flat", np.full(k * c, 0.5, np.float32)),
        _array("fc.bias.double", np.zeros(k, np.float64)),
    ]
    return _model([*weight_nodes, *_network_nodes()], initializers, opset)


def constant_of_shape_model(dims: Sequence[int]) -> ModelProto:
    """A 1x1 conv network beside a ConstantOfShape node whose result (never used) would have `dims`."""
    nodes = [
        helper.make_node("ConstantOfShape", ["huge.shape"], ["huge"], name="huge"),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[1, 1]),
    ]
    initializers = [
        _array("huge.shape", np.array(dims, np.int64)),
        _array("w", np.ones((4, 3, 1, 1), np.float32)),
    ]
    return _model(nodes, initializers, 17)


def constant_nodes_model(*nodes: NodeProto, initializers: Sequence[TensorProto] = ()) -> ModelProto:
    """A 1x1 conv network (x -> "conv" -> y) beside `nodes`, which compute only on constants."""
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[1, 1])
    weight = _array("w", np.ones((4, 3, 1, 1), np.float32))
    return _model([*nodes, conv], [weight, *initializers], 17)


def pooled_classifier() -> nn.Module:
    """The network `reduce_mean_model` and `global_pool_model` describe."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    )


def _pooled_classifier_weights() -> list[TensorProto]:
    return [
        _array("w", np.ones((8, 3, 3, 3), np.float32)),
        _array("b", np.zeros(8, np.float32)),
        _array("fc.weight", np.ones((5, 8), np.float32)),
        _array("fc.bias", np.zeros(5, np.float32)),
    ]


def _pooled_classifier_nodes(pool: Sequence[NodeProto]) -> list[NodeProto]:
    """conv (to "c") -> `pool` (from "c" to "f", an (N, 8) tensor) -> Gemm."""
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1] * 4)
    fc = helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1)
    return [conv, *pool, fc]


def reduce_mean_model(opset: int, axes: Sequence[int], *, keepdims: bool) -> ModelProto:
    """`pooled_classifier` with its pooling a ReduceMean over `axes`, then a Flatten when keepdims.

    From opset 18 the axes are an input (a Constant node), before it an attribute.
    """
    reduced = "p" if keepdims else "f"
    if opset >= 18:
        axes_value = _array("axes", np.array(axes, np.int64))
        pool = [
            helper.make_node("Constant", [], ["axes"], value=axes_value),
            helper.make_node("ReduceMean", ["c", "axes"], [reduced], name="mean", keepdims=int(keepdims)),
        ]
    else:
        pool = [
            helper.make_node(
                "ReduceMean", ["c"], [reduced], name="mean", axes=list(axes), keepdims=int(keepdims)
            )
        ]
    if keepdims:
        pool.append(helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1))
    return _model(_pooled_classifier_nodes(pool), _pooled_classifier_weights(), opset, (1, 3, 8, 8))


def mean_output_model(axes: Sequence[int] | None) -> ModelProto:
    """A 3x3 conv, then a ReduceMean over `axes` (None: no axes attribute, so all axes), the output."""
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1] * 4)
    axes_attribute = {} if axes is None else {"axes": list(axes)}
    mean = helper.make_node("ReduceMean", ["c"], ["y"], name="mean", keepdims=0, **axes_attribute)
    return _model([conv, mean], _pooled_classifier_weights(), 13, (1, 3, 8, 8))


def global_pool_model(opset: int) -> ModelProto:
    """`pooled_classifier` with GlobalAveragePool and Flatten."""
    pool = [
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
    ]
    return _model(_pooled_classifier_nodes(pool), _pooled_classifier_weights(), opset, (1, 3, 8, 8))


def sum_model(*addends: str, op_type: str = "Sum") -> ModelProto:
    """Three 1x1 convs "a", "b", "c" of x, then `op_type` ("total") of `addends`: names of those, or "k", a constant."""
    convs = [
        helper.make_node("Conv", ["x", f"w{name}"], [name], name=f"conv_{name}", kernel_shape=[1, 1])
        for name in "abc"
    ]
    initializers = [_array(f"w{name}", np.ones((4, 3, 1, 1), np.float32)) for name in "abc"]
    initializers.append(_array("k", np.ones((1, 4, 16, 16), np.float32)))
    total = helper.make_node(op_type, list(addends), ["y"], name="total")
    return _model([*convs, total], initializers, 17)


class FlattenByView(nn.Module):
    """Conv, BatchNorm, clamp to [0, 6], then `x.view(x.size(0), -1)` and a classifier.

    Exported with a dynamic batch, the view becomes Shape -> Gather -> Unsqueeze -> Concat -> Reshape.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(self.bn(self.conv(x)), 0, 6)  # (N, 8, 4, 4)
        return self.fc(x.view(x.size(0), -1))  # (N, 10)


class FlattenByFunction(FlattenByView):
    """`FlattenByView` with torch.flatten and ReLU6, which the module tracer reads."""

    def __init__(self) -> None:
        super().__init__()
        self.relu6 = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu6(self.bn(self.conv(x))), 1))


class MeanPooled(nn.Module):
    """Two heads on one conv: `x.mean((2, 3))` and `x.mean((2, 3), keepdim=True).flatten(1)`, added."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.fc(x.mean((2, 3))) + self.fc2(x.mean((2, 3), keepdim=True).flatten(1))


class AdaptivePooled(MeanPooled):
    """`MeanPooled` with adaptive average pooling and flatten, which the module tracer reads."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pool2 = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.fc(torch.flatten(self.pool(x), 1)) + self.fc2(torch.flatten(self.pool2(x), 1))
