"""ONNX in and out: read an ONNX graph into the IR (onnx shape inference), export a module to ONNX."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

import onnx
import torch
from onnx import helper, numpy_helper, shape_inference
from pydantic import ValidationError
from torch import nn

from lpnet.arch.ir import NETWORK_INPUT, Layer, Network, Op
from lpnet.errors import InvalidArchitecture, UnsupportedOperator

ONNX_OPSET = 17

_UNARY: dict[str, Op] = {
    "Relu": Op.RELU,
    "Sigmoid": Op.SIGMOID,
    "Tanh": Op.TANH,
    "HardSwish": Op.HARDSWISH,
    "HardSigmoid": Op.HARDSIGMOID,
    "Gelu": Op.GELU,
    "BatchNormalization": Op.BATCHNORM2D,
}
_PASS_THROUGH = frozenset({"Identity", "Dropout"})


def export_onnx(module: nn.Module, input_shape: Sequence[int]) -> bytes:
    """Export a module to ONNX bytes, keeping BatchNorm as its own node (no conv folding)."""
    buffer = io.BytesIO()
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.zeros(tuple(input_shape)),),
                buffer,  # type: ignore[arg-type]  # file-like objects are accepted
                dynamo=False,
                do_constant_folding=False,
                opset_version=ONNX_OPSET,
                input_names=["input"],
                output_names=["output"],
            )
    finally:
        module.train(was_training)
    return buffer.getvalue()


def network_from_onnx(data: bytes, name: str | None = None, family: str | None = None) -> Network:
    """Read an ONNX model (bytes) into the IR.

    A symbolic batch dimension is fixed to 1. Raises UnsupportedOperator naming the first node
    the IR cannot represent, and InvalidArchitecture for files that are not a usable ONNX graph.
    """
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InvalidArchitecture(f"not a readable ONNX model: {exc}") from exc
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    real_inputs = [value for value in graph.input if value.name not in initializers]
    if len(real_inputs) != 1:
        raise InvalidArchitecture(
            f"the ONNX graph must have exactly one input tensor, found {[v.name for v in real_inputs]}"
        )
    _fix_batch_dimension(real_inputs[0])
    try:
        model = shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        raise InvalidArchitecture(f"ONNX shape inference failed: {exc}") from exc
    return _OnnxConverter(model, initializers).convert(name, family)


def _fix_batch_dimension(value: onnx.ValueInfoProto) -> None:
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise InvalidArchitecture(f"the ONNX input must be (N, C, H, W); {value.name!r} has rank {len(dims)}")
    if not dims[0].HasField("dim_value"):
        dims[0].dim_value = 1
    for i, dim in enumerate(dims):
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            raise InvalidArchitecture(
                f"ONNX input {value.name!r} has a dynamic dimension at axis {i}; export it with a fixed C, H and W"
            )


class _OnnxConverter:
    def __init__(self, model: onnx.ModelProto, initializers: set[str]) -> None:
        self.graph = model.graph
        self.constants: dict[str, Any] = {
            init.name: numpy_helper.to_array(init) for init in self.graph.initializer
        }
        self.initializers = initializers
        self.shapes: dict[str, tuple[int, ...]] = {}
        for value in [*self.graph.input, *self.graph.value_info, *self.graph.output]:
            dims = value.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                self.shapes[value.name] = tuple(d.dim_value for d in dims)
        self.alias: dict[str, str] = {}
        self.layers: list[Layer] = []
        self.layer_by_name: dict[str, Layer] = {}
        self.used: set[str] = set()

    def convert(self, name: str | None, family: str | None) -> Network:
        (graph_input,) = [v for v in self.graph.input if v.name not in self.initializers]
        self.alias[graph_input.name] = NETWORK_INPUT
        input_shape = self.shapes[graph_input.name]
        for node in self.graph.node:
            self._convert_node(node)
        self._drop_unused_sigmoids()
        outputs = []
        for value in self.graph.output:
            if value.name not in self.alias:
                raise InvalidArchitecture(f"ONNX output {value.name!r} is not produced by a supported layer")
            outputs.append(self.alias[value.name])
        return Network(
            name=name or self.graph.name or None,
            family=family,
            input_shape=(input_shape[0], input_shape[1], input_shape[2], input_shape[3]),
            layers=self.layers,
            outputs=outputs,
        )

    def _drop_unused_sigmoids(self) -> None:
        # A sigmoid folded into a SiLU above has no consumer left.
        used = {ref for layer in self.layers for ref in layer.inputs}
        used |= {self.alias[v.name] for v in self.graph.output if v.name in self.alias}
        self.layers = [lay for lay in self.layers if lay.op is not Op.SIGMOID or lay.name in used]

    def _is_tensor(self, value: str) -> bool:
        return value in self.alias

    def _shape(self, value: str, node: onnx.NodeProto) -> tuple[int, ...]:
        if value not in self.shapes:
            raise UnsupportedOperator(
                node.op_type, self._node_name(node), f"no static shape for tensor {value!r}"
            )
        return self.shapes[value]

    @staticmethod
    def _node_name(node: onnx.NodeProto) -> str:
        return node.name or node.output[0]

    def _convert_node(self, node: onnx.NodeProto) -> None:
        op_type = node.op_type
        where = self._node_name(node)
        if op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
            return
        if op_type in _PASS_THROUGH:
            if self._is_tensor(node.input[0]):
                self.alias[node.output[0]] = self.alias[node.input[0]]
            elif node.input[0] in self.constants:
                self.constants[node.output[0]] = self.constants[node.input[0]]
            return
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        data_inputs = [v for v in node.input if v and self._is_tensor(v)]
        if not data_inputs:
            raise UnsupportedOperator(op_type, where, "a node computing only on constants")
        fields: dict[str, Any] = {}
        if op_type == "Conv":
            op = Op.CONV2D
            fields = self._window_fields(attrs, where, op_type)
            fields["groups"] = int(attrs.get("group", 1))
            fields["bias"] = len(node.input) > 2 and bool(node.input[2])
        elif op_type in _UNARY:
            op = _UNARY[op_type]
        elif op_type == "Clip":
            low, high = self._clip_bounds(node, attrs)
            if (low, high) != (0.0, 6.0):
                raise UnsupportedOperator(
                    "Clip", where, f"only Clip(0, 6) (relu6) is supported, got ({low}, {high})"
                )
            op = Op.RELU6
        elif op_type in ("Add", "Mul"):
            if len(data_inputs) != 2:
                raise UnsupportedOperator(
                    op_type, where, "only tensor-tensor operations are supported, not constants"
                )
            op = Op.ADD if op_type == "Add" else Op.MUL
            data_inputs.sort(key=lambda v: -_numel(self._shape(v, node)))
            if op is Op.MUL and self._is_silu(data_inputs):
                op = Op.SILU  # exporters write SiLU as x * sigmoid(x)
                data_inputs = (
                    [data_inputs[0]]
                    if self._is_sigmoid_of(data_inputs[1], data_inputs[0])
                    else [data_inputs[1]]
                )
        elif op_type == "Concat" and len(data_inputs) == 1:
            self.alias[node.output[0]] = self.alias[data_inputs[0]]
            return
        elif op_type == "Concat":
            if int(attrs.get("axis", 0)) != 1:
                raise UnsupportedOperator(
                    "Concat", where, f"only axis=1 is supported, got {attrs.get('axis')}"
                )
            op = Op.CONCAT
            fields["in_channels"] = sum(self._shape(v, node)[1] for v in data_inputs)
        elif op_type in ("MaxPool", "AveragePool"):
            op = Op.MAXPOOL2D if op_type == "MaxPool" else Op.AVGPOOL2D
            fields = self._window_fields(attrs, where, op_type)
            fields["ceil_mode"] = bool(attrs.get("ceil_mode", 0))
            if op is Op.AVGPOOL2D:
                fields.pop("dilation")
        elif op_type == "GlobalAveragePool":
            op = Op.ADAPTIVE_AVGPOOL2D
        elif op_type == "Flatten":
            if int(attrs.get("axis", 1)) != 1:
                raise UnsupportedOperator("Flatten", where, "only axis=1 is supported")
            op = Op.FLATTEN
        elif op_type == "Reshape" and len(self._shape(node.output[0], node)) == 2:
            op = Op.FLATTEN
        elif op_type == "Gemm":
            if int(attrs.get("transA", 0)) or not int(attrs.get("transB", 0)):
                raise UnsupportedOperator(
                    "Gemm", where, "only Gemm(transA=0, transB=1) as exported for nn.Linear"
                )
            if float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0:
                raise UnsupportedOperator("Gemm", where, "only alpha=beta=1 is supported")
            op = Op.LINEAR
            fields["bias"] = len(node.input) > 2 and bool(node.input[2])
        else:
            raise UnsupportedOperator(op_type, where)
        in_shape = self._shape(data_inputs[0], node)
        out_shape = self._shape(node.output[0], node)
        layer_name = where
        k = 1
        while layer_name in self.used:
            layer_name = f"{where}:{k}"
            k += 1
        self.used.add(layer_name)
        in_channels = fields.pop("in_channels", in_shape[1])
        try:
            layer = Layer(
                name=layer_name,
                op=op,
                inputs=[self.alias[v] for v in data_inputs],
                in_channels=in_channels,
                out_channels=out_shape[1],
                in_hw=_hw(in_shape, where),
                out_hw=_hw(out_shape, where),
                **fields,
            )
        except ValidationError as exc:
            raise InvalidArchitecture.from_validation_error(exc) from exc
        self.layers.append(layer)
        self.layer_by_name[layer_name] = layer
        self.alias[node.output[0]] = layer_name

    def _is_sigmoid_of(self, candidate: str, source: str) -> bool:
        layer = self.layer_by_name.get(self.alias[candidate])
        return layer is not None and layer.op is Op.SIGMOID and layer.inputs == [self.alias[source]]

    def _is_silu(self, inputs: list[str]) -> bool:
        return self._is_sigmoid_of(inputs[1], inputs[0]) or self._is_sigmoid_of(inputs[0], inputs[1])

    @staticmethod
    def _window_fields(attrs: dict[str, Any], where: str, op_type: str) -> dict[str, Any]:
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        if auto_pad not in ("NOTSET", "VALID"):
            raise UnsupportedOperator(
                op_type, where, f"auto_pad={auto_pad} is not supported; export explicit pads"
            )
        kernel = tuple(attrs["kernel_shape"])
        pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
        if len(kernel) != 2:
            raise UnsupportedOperator(op_type, where, f"only 2-D windows are supported, got kernel {kernel}")
        if pads[:2] != pads[2:]:
            raise UnsupportedOperator(op_type, where, f"asymmetric padding {pads} is not supported")
        return {
            "kernel": kernel,
            "stride": tuple(attrs.get("strides", (1, 1))),
            "padding": pads[:2],
            "dilation": tuple(attrs.get("dilations", (1, 1))),
        }

    def _clip_bounds(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[float, float]:
        if "min" in attrs or "max" in attrs:  # opset < 11
            return float(attrs.get("min", float("-inf"))), float(attrs.get("max", float("inf")))
        bounds = []
        for i, default in ((1, float("-inf")), (2, float("inf"))):
            if len(node.input) > i and node.input[i]:
                if node.input[i] not in self.constants:
                    raise UnsupportedOperator("Clip", self._node_name(node), "clip bounds must be constants")
                bounds.append(float(self.constants[node.input[i]]))
            else:
                bounds.append(default)
        return bounds[0], bounds[1]


def _hw(shape: tuple[int, ...], where: str) -> tuple[int, int]:
    if len(shape) == 4:
        return shape[2], shape[3]
    if len(shape) == 2:
        return 1, 1
    raise UnsupportedOperator(
        "tensor rank", where, f"only (N, C, H, W) and (N, F) tensors are supported, got {shape}"
    )


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total
