"""ONNX in and out: read an ONNX graph into the IR (onnx shape inference), export a module to ONNX.

A file given to `network_from_onnx` is untrusted. Before anything else reads it, one pass over the whole
model refuses tensors that keep their data in external files (onnx would read those from this
machine's disk) and models above the size limits below, opening no file; then the opsets and the
input are checked, and only then does shape inference run. Every problem with a file comes out as
an `lpnet.errors` error.

Reading runs in four steps: the data of large constants (weights) is dropped, keeping their type and
shape, which is all the IR needs of them; shape inference runs on what is left; nodes computing only on
constants (weights stored as ConstantOfShape or Cast of an initializer, shape arithmetic on the
static input shape) are folded into constants; and the remaining graph is converted node by node.
"""

from __future__ import annotations

import io
import itertools
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import AttributeProto, TensorProto, helper, numpy_helper, shape_inference
from onnx.defs import SchemaError
from onnx.reference import ReferenceEvaluator
from onnx.shape_inference import InferenceError
from pydantic import ValidationError
from torch import nn

from lpnet.arch.ir import (
    ACTIVATIONS,
    MAX_BATCH,
    MAX_CHANNELS,
    MAX_SPATIAL,
    NETWORK_INPUT,
    Layer,
    Network,
    Op,
    architecture_error,
    conv_output_hw,
)
from lpnet.errors import (
    ExternalDataRefused,
    InvalidArchitecture,
    OnnxLimitExceeded,
    UnsupportedOperator,
    UnsupportedOpset,
)

ONNX_OPSET = 17

# Versions of the default ONNX operator set the reader accepts; other domains are refused.
MIN_OPSET = 7
MAX_OPSET = 21

# Limits on a model, far above what an image CNN exports to. Counts run over all graphs of a model
# (main graph, subgraphs of If/Loop/Scan, training graphs, function bodies) and are checked before
# shape inference, so a file declaring a huge graph is refused without inferring it.
MAX_NODES = 20_000  # nodes
MAX_TENSORS = 50_000  # initializers and tensors held in node attributes
MAX_VALUES = 200_000  # node inputs and outputs, graph inputs, outputs and value_info entries
MAX_ATTRIBUTES = 200_000  # node attributes
MAX_GRAPHS = 1_000  # graphs and functions besides the main graph
MAX_SUBGRAPH_DEPTH = 8  # subgraphs nested inside subgraphs
# Limits on one tensor: the input, every constant, and every tensor shape inference finds. Dimension 1
# of an (N, C, H, W) tensor is bounded by the IR's MAX_CHANNELS, dimensions 2 and 3 by its MAX_SPATIAL.
MAX_RANK = 32  # dimensions
MAX_TENSOR_ELEMENTS = 2**31  # elements, and so also any single dimension
# Constants of up to this many elements keep their values: shape arithmetic, clip bounds, reduction
# axes. Larger ones (weights) keep only their type and shape, so shape inference never copies them and
# folding never computes them.
MAX_FOLDED_ELEMENTS = 4096
# Nodes computing only on constants; each is inferred and evaluated on its own (about 0.3 ms). A
# Caffe2-style export of densenet201 computes about 1,000 weights this way.
MAX_FOLDED_NODES = 5_000
# Folding passes, each followed by shape inference: a pass can make the shapes static that the next
# one folds on (the split sizes of a chunk computed from a shape the first pass folded).
MAX_FOLD_PASSES = 3

# The counted limits by name, with what they count as an error message says it.
_COUNT_LIMITS = {
    "nodes": (MAX_NODES, "nodes"),
    "tensors": (MAX_TENSORS, "constant tensors (initializers and tensors in attributes)"),
    "values": (MAX_VALUES, "value names (node inputs and outputs, graph inputs, outputs, value_info)"),
    "attributes": (MAX_ATTRIBUTES, "node attributes"),
    "graphs": (MAX_GRAPHS, "subgraphs and functions"),
}
_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})

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
# x * gate(x) is the activation on the right: SiLU as exporters write it, and HardSwish before opset 14.
_GATED: dict[Op, Op] = {Op.SIGMOID: Op.SILU, Op.HARDSIGMOID: Op.HARDSWISH}
# Every operator the converter has a rule for.
_SUPPORTED_OPS = frozenset(
    {*_UNARY, *_PASS_THROUGH, "Conv", "Clip", "Add", "Sum", "Mul", "Concat", "MaxPool", "AveragePool"}
    | {"GlobalAveragePool", "ReduceMean", "Flatten", "Reshape", "Gemm", "LRN", "Pad", "Softmax"}
    | {"Transpose", "Split", "Slice", "Resize", "Upsample", "LayerNormalization", "MatMul", "Div", "Erf"}
)
# GELU as exporters write it before opset 20: x * ((erf(x / sqrt(2)) + 1) * 0.5), in any operand order.
# Each step is (operator, the constant operand it takes, or None for the Mul by x itself).
_GELU_STEPS: tuple[tuple[str, float | None], ...] = (
    ("Div", 2**0.5),
    ("Erf", None),
    ("Add", 1.0),
    ("Mul", None),
    ("Mul", 0.5),
)
_RESIZE_MODES = {
    "nearest": Op.UPSAMPLE_NEAREST,
    "linear": Op.UPSAMPLE_BILINEAR,
    "bilinear": Op.UPSAMPLE_BILINEAR,
}
_TO_CHANNELS_LAST = (0, 2, 3, 1)
_TO_CHANNELS_FIRST = (0, 3, 1, 2)
_SWAP_CHANNEL_GROUPS = (0, 2, 1, 3, 4)
# Channels swapped with W: how exporters before opset 13 put the channels last for a Softmax.
_SWAP_CHANNELS_AND_WIDTH = (0, 3, 2, 1)
# Operators folded into a constant when every input is a constant: what exporters use to prepare
# weights and to compute shapes. Shape and Size also fold on a tensor whose shape is static. Anything
# else computing only on constants is refused by name.
_FOLDABLE_OPS = frozenset(
    {"Constant", "ConstantOfShape", "Identity", "Dropout", "Cast", "CastLike", "Reshape", "Flatten"}
    | {"Squeeze", "Unsqueeze", "Transpose", "Expand", "Tile", "Concat", "Split", "Slice", "Gather"}
    | {"Shape", "Size", "Range", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Floor", "Ceil", "Sqrt"}
    | {"Reciprocal", "Pow", "Min", "Max", "Sum", "Equal", "Less", "Greater", "Not", "Where", "ReduceProd"}
)
_SHAPE_OPS = frozenset({"Shape", "Size"})
# Operators taking several tensors, none of which may be a constant.
_MULTI_INPUT = frozenset({"Add", "Mul", "Sum", "Concat"})


def export_onnx(
    module: nn.Module, input_shape: Sequence[int], *, opset: int = ONNX_OPSET, dynamic_batch: bool = False
) -> bytes:
    """Export a module to ONNX bytes, keeping BatchNorm as its own node (no conv folding).

    Args:
        module: The module to export; it is exported in eval mode and left in the mode it was in.
        input_shape: The (N, C, H, W) shape of the example input.
        opset: The version of the default ONNX operator set to export with.
        dynamic_batch: Export the batch dimension of the input as symbolic.
    """
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
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}} if dynamic_batch else None,
            )
    finally:
        module.train(was_training)
    return buffer.getvalue()


def network_from_onnx(
    data: bytes, name: str | None = None, family: str | None = None, batch_size: int = 1
) -> Network:
    """Read an ONNX model (bytes) into the IR.

    Args:
        data: The serialised ModelProto, with every tensor inside it.
        name: The network's name; the graph's name when not given.
        family: The network's family.
        batch_size: The batch a symbolic batch dimension is fixed to; a fixed batch in the file is kept.

    Raises:
        ExternalDataRefused: A tensor anywhere in the model keeps its data in an external file.
        OnnxLimitExceeded: The model, or a constant it computes, is above one of this module's limits
            (MAX_NODES, MAX_TENSOR_ELEMENTS, ...).
        UnsupportedOpset: It imports an operator set other than the default domain at versions
            MIN_OPSET to MAX_OPSET.
        UnsupportedOperator: Naming the first node the IR cannot represent.
        InvalidArchitecture: The file is not a usable ONNX graph with one image input
            (ArchitectureTooLarge when the network is beyond one of the IR's cost bounds).
    """
    if not 1 <= batch_size <= MAX_BATCH:
        raise InvalidArchitecture(
            f"batch_size must be from 1 to {MAX_BATCH}, got {batch_size}", {"batch_size": batch_size}
        )
    try:
        # Parses the bytes and nothing else: unlike onnx.load with a path, it follows no external data.
        model = onnx.load_from_string(data)
    except DecodeError as exc:
        raise InvalidArchitecture(f"not a readable ONNX model: {exc}") from exc
    _ModelScan().model(model)
    if not model.HasField("graph"):
        raise InvalidArchitecture("not an ONNX model: the file holds no graph")
    opset = _check_opsets(model)
    _check_image_input(model.graph, _constant_names(model.graph), batch_size)
    _check_operators(model.graph)
    _drop_weight_data(model.graph)
    model = _infer_shapes(model)
    for _ in range(MAX_FOLD_PASSES):
        if not _ConstantFolder(model, opset).fold():
            break
        del model.graph.value_info[:]
        model = _infer_shapes(model)
    for value in itertools.chain(model.graph.value_info, model.graph.output):
        _check_tensor_shape(value)
    return _OnnxConverter(model, opset).convert(name, family)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every value's type and shape, propagating shape arithmetic on static shapes."""
    try:
        return shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except (InferenceError, ValueError, IndexError, OverflowError, RuntimeError) as exc:
        # InferenceError names what is wrong with the graph; the others are C++ standard exceptions
        # (length_error, out_of_range, ...) that onnx's inference code lets out on malformed nodes.
        raise InvalidArchitecture(f"ONNX shape inference failed: {exc}") from exc


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    return names | {s.values.name for s in graph.sparse_initializer}


def _drop_weight_data(graph: onnx.GraphProto) -> None:
    """Keep only the type and shape of initializers and Constant values above MAX_FOLDED_ELEMENTS."""
    tensors = list(graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            tensors.extend(attr.t for attr in node.attribute if attr.HasField("t"))
    for tensor in tensors:
        if _numel(tuple(tensor.dims)) > MAX_FOLDED_ELEMENTS:
            tensor.CopyFrom(TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims))


class _ModelScan:
    """One pass over every graph, node, attribute and tensor of a model, before anything else reads it.

    Refuses a tensor with external data wherever it is, and counts what the model declares against
    the limits, checking each container's length before walking into it. Opens no file. Also refuses
    names that are not UTF-8 (protobuf hands those over as bytes, which no error message can carry).
    """

    def __init__(self) -> None:
        self.totals = dict.fromkeys(_COUNT_LIMITS, 0)

    def model(self, model: onnx.ModelProto) -> None:
        self.count("graphs", 2 * len(model.training_info) + len(model.functions))
        _require_text((opset.domain for opset in model.opset_import), "opset imports")
        self.graph(model.graph, 0)
        for info in model.training_info:
            self.graph(info.initialization, 0)
            self.graph(info.algorithm, 0)
        for function in model.functions:
            owner = f"function {function.name!r}"
            _require_text((function.name, function.domain), owner)
            self.count("nodes", len(function.node))
            self.count("attributes", len(function.attribute_proto))
            for attr in function.attribute_proto:
                self.attribute(attr, f"default of attribute {attr.name!r} of {owner}", 0)
            self.nodes(function.node, owner, 0)

    def count(self, limit: str, amount: int) -> None:
        total = self.totals[limit] + amount
        maximum, counted = _COUNT_LIMITS[limit]
        _check_limit(limit, total, maximum, f"the number of {counted}")
        self.totals[limit] = total

    def graph(self, graph: onnx.GraphProto, depth: int) -> None:
        _check_limit("subgraph_depth", depth, MAX_SUBGRAPH_DEPTH, "the nesting depth of subgraphs")
        self.count("nodes", len(graph.node))
        self.count("tensors", len(graph.initializer) + len(graph.sparse_initializer))
        self.count("values", len(graph.input) + len(graph.output) + len(graph.value_info))
        owner = f"graph {graph.name!r}"
        _require_text([graph.name], owner)
        values = itertools.chain(graph.input, graph.output, graph.value_info)
        _require_text((value.name for value in values), owner)
        for tensor in graph.initializer:
            self.tensor(tensor, f"initializer of {owner}")
        for sparse in graph.sparse_initializer:
            self.sparse_tensor(sparse, f"sparse initializer of {owner}")
        self.nodes(graph.node, owner, depth)

    def nodes(self, nodes: Iterable[onnx.NodeProto], owner: str, depth: int) -> None:
        for node in nodes:
            self.count("values", len(node.input) + len(node.output))
            self.count("attributes", len(node.attribute))
            label = node.name or (node.output[0] if node.output else node.op_type)
            where = f"node {label!r} in {owner}"
            _require_text(
                itertools.chain((node.name, node.op_type, node.domain), node.input, node.output), where
            )
            _require_text((attr.name for attr in node.attribute), where)
            for attr in node.attribute:
                self.attribute(attr, f"attribute {attr.name!r} of {where}", depth)

    def attribute(self, attr: AttributeProto, where: str, depth: int) -> None:
        # Every field is walked whatever the attribute's declared type says.
        single_tensors = int(attr.HasField("t")) + int(attr.HasField("sparse_tensor"))
        self.count("tensors", single_tensors + len(attr.tensors) + len(attr.sparse_tensors))
        self.count("graphs", int(attr.HasField("g")) + len(attr.graphs))
        if attr.HasField("t"):
            self.tensor(attr.t, where)
        for tensor in attr.tensors:
            self.tensor(tensor, where)
        if attr.HasField("sparse_tensor"):
            self.sparse_tensor(attr.sparse_tensor, where)
        for sparse in attr.sparse_tensors:
            self.sparse_tensor(sparse, where)
        if attr.HasField("g"):
            self.graph(attr.g, depth + 1)
        for graph in attr.graphs:
            self.graph(graph, depth + 1)

    def tensor(self, tensor: TensorProto, where: str) -> None:
        _require_text([tensor.name], where)
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0:
            raise ExternalDataRefused(tensor.name, where)
        subject = f"tensor {tensor.name!r} ({where})"
        _check_rank(len(tensor.dims), subject)
        _check_elements(tensor.dims, subject)

    def sparse_tensor(self, sparse: onnx.SparseTensorProto, where: str) -> None:
        self.tensor(sparse.values, f"values of a {where}")
        self.tensor(sparse.indices, f"indices of a {where}")
        subject = f"sparse tensor {sparse.values.name!r} ({where})"
        _check_rank(len(sparse.dims), subject)
        _check_elements(sparse.dims, subject)


def _require_text(names: Iterable[str | bytes], where: str) -> None:
    for name in names:
        if isinstance(name, bytes):
            raise InvalidArchitecture(
                f"the ONNX {where} has a name that is not UTF-8 text: {name!r}", {"where": where}
            )


def _check_limit(limit: str, found: int | None, maximum: int, subject: str) -> None:
    if found is not None and found > maximum:
        raise OnnxLimitExceeded(limit, found, maximum, subject)


def _check_rank(rank: int, subject: str) -> None:
    _check_limit("rank", rank, MAX_RANK, f"the rank of {subject}")


def _check_elements(sizes: Iterable[int], subject: str) -> None:
    total = 1
    for size in sizes:
        _check_limit("tensor_elements", size, MAX_TENSOR_ELEMENTS, f"a dimension of {subject}")
        total *= size
    _check_limit("tensor_elements", total, MAX_TENSOR_ELEMENTS, f"the number of elements of {subject}")


def _check_tensor_shape(value: onnx.ValueInfoProto) -> None:
    """Refuse a tensor value above the rank, channel, spatial or element limits; unknown sizes pass."""
    if value.type.WhichOneof("value") != "tensor_type":
        return
    dims = value.type.tensor_type.shape.dim
    subject = f"tensor {value.name!r}"
    _check_rank(len(dims), subject)
    sizes = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(sizes) == 4:
        _check_limit("channels", sizes[1], MAX_CHANNELS, f"the channel count (dimension 1) of {subject}")
        for axis in (2, 3):
            _check_limit("spatial_size", sizes[axis], MAX_SPATIAL, f"dimension {axis} of {subject}")
    _check_elements([size for size in sizes if size is not None], subject)


def _check_opsets(model: onnx.ModelProto) -> int:
    """The version of the default operator set the model imports, refusing any other domain or version."""
    default: int | None = None
    for opset in model.opset_import:
        if opset.domain not in _DEFAULT_DOMAINS:
            raise UnsupportedOpset(
                opset.domain, opset.version, "only the default ONNX domain (ai.onnx) is supported"
            )
        if default is not None:
            raise UnsupportedOpset(opset.domain, opset.version, "the default domain is imported twice")
        default = opset.version
    supported = f"export with an opset from {MIN_OPSET} to {MAX_OPSET}"
    if default is None:
        raise UnsupportedOpset("", None, f"the model imports no version of it; {supported}")
    if not MIN_OPSET <= default <= MAX_OPSET:
        raise UnsupportedOpset("", default, supported)
    return default


def _check_operators(graph: onnx.GraphProto) -> None:
    """Refuse the first node that is neither converted nor folded, so shape inference never runs on it.

    Attention is refused by name first, whatever operators its export uses around it.
    """
    _refuse_attention(graph)
    for node in graph.node:
        if not node.output or not node.output[0]:
            raise InvalidArchitecture(
                f"ONNX {node.op_type} node {node.name!r} has no output",
                {"node": node.name, "op": node.op_type},
            )
        if node.domain not in _DEFAULT_DOMAINS:
            raise UnsupportedOperator(
                f"{node.domain}.{node.op_type}",
                _node_name(node),
                "only operators of the default ONNX domain are supported",
            )
        if node.op_type not in _SUPPORTED_OPS and node.op_type not in _FOLDABLE_OPS:
            raise UnsupportedOperator(node.op_type, _node_name(node))


def _refuse_attention(graph: onnx.GraphProto) -> None:
    """A Softmax and a MatMul or Einsum of two tensors computed from the input are attention."""
    if not any(node.op_type == "Softmax" for node in graph.node):
        return
    constants = {t.name for t in graph.initializer}
    for node in graph.node:  # values computed from constants alone (a transposed weight) are constants
        if all(value in constants for value in node.input if value):
            constants.update(node.output)
    for node in graph.node:
        if node.op_type in ("MatMul", "Einsum") and not constants.intersection(node.input):
            raise UnsupportedOperator(
                "attention",
                _node_name(node),
                f"a {node.op_type} of two computed tensors (attention) is not read from ONNX files; "
                "trace the PyTorch model instead (its IR has `attention` layers)",
            )


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _check_image_input(graph: onnx.GraphProto, initializers: set[str], batch_size: int) -> None:
    """Check that the graph has one float (N, C, H, W) input within the limits; fix a symbolic N to `batch_size`."""
    real_inputs = [value for value in graph.input if value.name not in initializers]
    if len(real_inputs) != 1:
        names = [value.name for value in real_inputs[:10]]
        raise InvalidArchitecture(
            f"the ONNX graph must have exactly one input tensor (the image), found {len(real_inputs)}: {names}",
            {"inputs": names, "count": len(real_inputs)},
        )
    (value,) = real_inputs
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise InvalidArchitecture(
            f"the ONNX input {value.name!r} must be an image tensor, not {kind or 'a value without type'}",
            {"input": value.name, "type": kind},
        )
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type not in _FLOAT_TYPES:
        elem_type = _enum_name(TensorProto.DataType, tensor_type.elem_type)
        raise InvalidArchitecture(
            f"the ONNX input {value.name!r} must be a float image tensor, got elements of type {elem_type}",
            {"input": value.name, "elem_type": elem_type},
        )
    dims = tensor_type.shape.dim
    if len(dims) != 4:
        raise InvalidArchitecture(
            f"the ONNX input must be (N, C, H, W); {value.name!r} has rank {len(dims)}",
            {"input": value.name, "rank": len(dims)},
        )
    if not dims[0].HasField("dim_value"):
        dims[0].dim_value = batch_size
    for i, dim in enumerate(dims):
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            raise InvalidArchitecture(
                f"ONNX input {value.name!r} has a dynamic dimension at axis {i}; export it with a fixed C, H and W",
                {"input": value.name, "axis": i},
            )
    _check_tensor_shape(value)


def _enum_name(enum: Any, number: int) -> str:
    """The name of a protobuf enum value, or its number when this onnx version does not know it."""
    try:
        return str(enum.Name(number))
    except ValueError:
        return str(number)


class _ConstantFolder:
    """Replaces every node that computes only on constants by its results, kept as initializers.

    Each node's outputs are typed first, by onnx's shape inference of that node given its inputs'
    values, and checked against the tensor limits, so nothing is allocated for a result above them.
    Results of at most MAX_FOLDED_ELEMENTS elements computed from inputs with values are evaluated by
    onnx's reference evaluator; the others (weights cast, reshaped or filled in by ConstantOfShape)
    keep their type and shape only. Shape and Size of a tensor whose shape is static read that shape.
    """

    def __init__(self, model: onnx.ModelProto, opset: int) -> None:
        self.graph = model.graph
        self.opset = opset
        self.constants: dict[str, TensorProto] = {t.name: t for t in self.graph.initializer}
        # The constants that hold their data: initializers within MAX_FOLDED_ELEMENTS (larger ones had
        # theirs dropped) and evaluated results.
        self.with_values = {
            name
            for name, tensor in self.constants.items()
            if _numel(tuple(tensor.dims)) <= MAX_FOLDED_ELEMENTS
        }
        # The element type and dimensions of every tensor with a static shape.
        self.static_shapes: dict[str, tuple[int, tuple[int, ...]]] = {}
        for value in itertools.chain(self.graph.input, self.graph.value_info):
            dims = _static_dims(value.type)
            if dims is not None:
                self.static_shapes[value.name] = (value.type.tensor_type.elem_type, dims)

    def fold(self) -> bool:
        """Fold the graph in place; True when at least one node was folded."""
        kept: list[onnx.NodeProto] = []
        folded: list[TensorProto] = []
        for count, node in enumerate(self.graph.node, start=1):
            if not self._is_foldable(node):
                kept.append(node)
                continue
            subject = "the number of nodes computing only on constants"
            _check_limit("folded_nodes", count - len(kept), MAX_FOLDED_NODES, subject)
            for tensor in self._fold(node):
                self.constants[tensor.name] = tensor
                folded.append(tensor)
        if len(kept) == len(self.graph.node):
            return False
        del self.graph.node[:]
        self.graph.node.extend(kept)
        self.graph.initializer.extend(folded)
        return True

    def _is_foldable(self, node: onnx.NodeProto) -> bool:
        if node.domain not in _DEFAULT_DOMAINS or node.op_type not in _FOLDABLE_OPS:
            return False
        inputs = [value for value in node.input if value]
        if node.op_type in _SHAPE_OPS:
            return bool(inputs) and (inputs[0] in self.constants or inputs[0] in self.static_shapes)
        return all(value in self.constants for value in inputs)

    def _fold(self, node: onnx.NodeProto) -> list[TensorProto]:
        inputs = [value for value in node.input if value]
        valued = {value: self.constants[value] for value in inputs if value in self.with_values}
        types = {value: helper.make_tensor_type_proto(*self._signature(value)) for value in inputs}
        outputs = self._output_types(node, types, valued)
        computable = node.op_type in _SHAPE_OPS or all(value in valued for value in inputs)
        if computable and all(_numel(dims) <= MAX_FOLDED_ELEMENTS for _, dims in outputs.values()):
            results = self._evaluate(node, outputs, valued)
            self.with_values.update(tensor.name for tensor in results)
            return results
        return [TensorProto(name=out, data_type=elem, dims=dims) for out, (elem, dims) in outputs.items()]

    def _signature(self, value: str) -> tuple[int, tuple[int, ...]]:
        """The element type and dimensions of a constant or of a tensor with a static shape."""
        if value in self.constants:
            tensor = self.constants[value]
            return tensor.data_type, tuple(tensor.dims)
        return self.static_shapes[value]

    def _output_types(
        self, node: onnx.NodeProto, types: dict[str, onnx.TypeProto], valued: dict[str, TensorProto]
    ) -> dict[str, tuple[int, tuple[int, ...]]]:
        """The element type and static shape of each output of `node`, checked against the limits."""
        where = _node_name(node)
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, "")
        except SchemaError as exc:
            raise UnsupportedOperator(
                node.op_type, where, f"the operator is not part of opset {self.opset}"
            ) from exc
        try:
            inferred = shape_inference.infer_node_outputs(
                schema, node, types, valued, opset_imports=[helper.make_opsetid("", self.opset)]
            )
        except (InferenceError, ValueError, IndexError, OverflowError, RuntimeError) as exc:
            raise InvalidArchitecture(
                f"ONNX shape inference failed on constant node {where!r} ({node.op_type}): {exc}",
                {"node": where, "op": node.op_type},
            ) from exc
        outputs = {}
        for out in filter(None, node.output):
            dims = _static_dims(inferred[out]) if out in inferred else None
            if dims is None or not inferred[out].tensor_type.elem_type:
                raise UnsupportedOperator(
                    node.op_type, where, f"the shape of the constant {out!r} it computes cannot be inferred"
                )
            subject = f"constant {out!r} computed by node {where!r}"
            _check_rank(len(dims), subject)
            _check_elements(dims, subject)
            outputs[out] = (inferred[out].tensor_type.elem_type, dims)
        return outputs

    def _evaluate(
        self,
        node: onnx.NodeProto,
        outputs: dict[str, tuple[int, tuple[int, ...]]],
        valued: dict[str, TensorProto],
    ) -> list[TensorProto]:
        """Run `node` with onnx's reference evaluator; every output is within MAX_FOLDED_ELEMENTS."""
        where = _node_name(node)
        inputs = [value for value in node.input if value]
        untyped = onnx.TypeProto()
        graph = helper.make_graph(
            [node],
            "fold",
            [helper.make_value_info(value, untyped) for value in inputs],
            [helper.make_value_info(out, untyped) for out in outputs],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        try:
            feeds = {value: self._feed(value, valued) for value in inputs}
            # Overflow or division by zero is the file's arithmetic, not an error of the reader: a
            # folded weight's values are never used, and a folded shape is checked where it is used.
            with np.errstate(all="ignore"):
                results = ReferenceEvaluator(model).run(None, feeds)
            tensors = []
            for (out, (elem, dims)), result in zip(outputs.items(), results, strict=True):
                array = np.asarray(result, dtype=helper.tensor_dtype_to_np_dtype(elem))
                if array.shape != dims:
                    raise ValueError(f"{out!r} came out with shape {array.shape}, inferred {dims}")
                tensors.append(numpy_helper.from_array(array, out))
        except Exception as exc:  # numpy code running on the file's data: report what failed, not a traceback
            raise InvalidArchitecture(
                f"ONNX constant node {where!r} ({node.op_type}) could not be evaluated: {exc}",
                {"node": where, "op": node.op_type},
            ) from exc
        return tensors

    def _feed(self, value: str, valued: dict[str, TensorProto]) -> np.ndarray:
        if value in valued:
            return numpy_helper.to_array(valued[value])
        # The tensor a Shape or Size node reads, as a view of one element: its shape without its memory.
        elem, dims = self._signature(value)
        return np.broadcast_to(np.zeros((), helper.tensor_dtype_to_np_dtype(elem)), dims)


def _static_dims(value_type: onnx.TypeProto) -> tuple[int, ...] | None:
    """The dimensions of a tensor type when every one of them is a known size, else None."""
    if value_type.WhichOneof("value") != "tensor_type" or not value_type.tensor_type.HasField("shape"):
        return None
    dims = value_type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


class _Attributes:
    """A node's attributes by name, each read as the type its operator defines for it."""

    def __init__(self, node: onnx.NodeProto, where: str) -> None:
        self.by_name = {attr.name: attr for attr in node.attribute}
        self.op_type = node.op_type
        self.where = where

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def get_int(self, name: str, default: int) -> int:
        attr = self._typed(name, AttributeProto.INT)
        return default if attr is None else int(attr.i)

    def get_float(self, name: str, default: float) -> float:
        attr = self._typed(name, AttributeProto.FLOAT)
        return default if attr is None else float(attr.f)

    def get_string(self, name: str, default: str) -> str:
        attr = self._typed(name, AttributeProto.STRING)
        return default if attr is None else attr.s.decode(errors="replace")

    def get_ints(self, name: str, default: tuple[int, ...], length: int) -> tuple[int, ...]:
        """An INTS attribute of a 2-D window (`length` values), checked before it is copied."""
        attr = self._typed(name, AttributeProto.INTS)
        if attr is None:
            return default
        if len(attr.ints) != length:
            raise UnsupportedOperator(
                self.op_type,
                self.where,
                f"only 2-D windows are supported: {name} has {len(attr.ints)} values, expected {length}",
            )
        return tuple(attr.ints)

    def get_axes(self, name: str) -> tuple[int, ...]:
        """An INTS attribute listing tensor axes, at most MAX_RANK of them."""
        attr = self._typed(name, AttributeProto.INTS)
        if attr is None or len(attr.ints) > MAX_RANK:
            raise UnsupportedOperator(self.op_type, self.where, f"{name} must list at most {MAX_RANK} axes")
        return tuple(attr.ints)

    def _typed(self, name: str, expected: int) -> AttributeProto | None:
        attr = self.by_name.get(name)
        if attr is not None and attr.type != expected:
            found = _enum_name(AttributeProto.AttributeType, attr.type)
            wanted = _enum_name(AttributeProto.AttributeType, expected)
            raise InvalidArchitecture(
                f"attribute {name!r} of {self.op_type} node {self.where!r} must be {wanted}, got {found}",
                {"node": self.where, "attribute": name},
            )
        return attr


class _OnnxConverter:
    """Converts a folded, shape-inferred graph node by node into IR layers."""

    def __init__(self, model: onnx.ModelProto, opset: int) -> None:
        self.graph = model.graph
        self.opset = opset
        # Constant tensors by value name, read into numbers only where an operator needs their values.
        self.constants: dict[str, TensorProto] = {init.name: init for init in self.graph.initializer}
        self.initializers = _constant_names(self.graph)
        self.shapes: dict[str, tuple[int, ...]] = {}
        for value in [*self.graph.input, *self.graph.value_info, *self.graph.output]:
            dims = _static_dims(value.type)
            if dims is not None:
                self.shapes[value.name] = dims
        self.alias: dict[str, str] = {}
        # Values that view an IR tensor without being (N, C, H, W): the channels-last permutation of
        # their alias, and the (N, groups, C / groups, H, W) views of a channel shuffle.
        self.channels_last: set[str] = set()
        self.channels_swapped: set[str] = set()  # (N, W, H, C) views, for a softmax over the last axis
        # Values partway through a decomposed GELU: value -> (the GELU's input, steps done).
        self.gelu: dict[str, tuple[str, int]] = {}
        # Outputs of MatMul layers, by layer name, that the Add of a bias may complete.
        self.biasable: dict[str, str] = {}
        self.consumers = Counter(v for n in self.graph.node for v in n.input if v)
        self.consumers.update(v.name for v in self.graph.output)
        self.grouped: dict[str, tuple[str, int, bool]] = {}  # value -> (IR tensor, groups, transposed)
        self.layers: list[Layer] = []
        self.layer_by_name: dict[str, Layer] = {}
        self.used: set[str] = set()

    def convert(self, name: str | None, family: str | None) -> Network:
        (graph_input,) = [v for v in self.graph.input if v.name not in self.initializers]
        self.alias[graph_input.name] = NETWORK_INPUT
        input_shape = self.shapes[graph_input.name]
        self._refuse_attention()
        for node in self.graph.node:
            self._convert_node(node)
        self._drop_unused_gates()
        outputs = []
        for value in self.graph.output:
            if value.name not in self.alias:
                raise InvalidArchitecture(f"ONNX output {value.name!r} is not produced by a supported layer")
            outputs.append(self.alias[value.name])
        try:
            return Network(
                name=name or self.graph.name or None,
                family=family,
                input_shape=(input_shape[0], input_shape[1], input_shape[2], input_shape[3]),
                layers=self.layers,
                outputs=outputs,
            )
        except ValidationError as exc:
            raise architecture_error(exc) from exc

    def _refuse_attention(self) -> None:
        """Refuse attention by name: a MatMul of two computed tensors (scores, or their weighted sum).

        The IR's `attention` layer is read from PyTorch models only; a linear layer's MatMul, whose
        weight is a constant, is not attention.
        """
        for node in self.graph.node:
            if node.op_type == "MatMul" and all(value not in self.constants for value in node.input):
                raise UnsupportedOperator(
                    "attention",
                    _node_name(node),
                    "a MatMul of two computed tensors (attention) is not read from ONNX files; "
                    "trace the PyTorch model instead (its IR has `attention` layers)",
                )

    def _drop_unused_gates(self) -> None:
        # A gate merged into a SiLU or HardSwish above has no consumer left.
        used = {ref for layer in self.layers for ref in layer.inputs}
        used |= {self.alias[v.name] for v in self.graph.output if v.name in self.alias}
        self.layers = [lay for lay in self.layers if lay.op not in _GATED or lay.name in used]

    def _is_tensor(self, value: str) -> bool:
        return value in self.alias or value in self.grouped or value in self.gelu

    def _shape(self, value: str, node: onnx.NodeProto) -> tuple[int, ...]:
        if value not in self.shapes:
            raise UnsupportedOperator(node.op_type, _node_name(node), f"no static shape for tensor {value!r}")
        return self.shapes[value]

    def _layer_shape(self, value: str, node: onnx.NodeProto) -> tuple[int, ...]:
        """The static shape of a layer's input or output: (N, C, H, W) or (N, F)."""
        shape = self._shape(value, node)
        _hw(shape, _node_name(node))
        return shape

    def _convert_node(self, node: onnx.NodeProto) -> None:
        op_type = node.op_type
        where = _node_name(node)
        attrs = _Attributes(node, where)
        inputs = [v for v in node.input if v]
        data_inputs = [v for v in inputs if self._is_tensor(v)]
        if not data_inputs:
            raise UnsupportedOperator(op_type, where, "a node computing only on constants")
        if self._convert_affine(node, attrs, inputs, data_inputs):
            return
        if op_type in _MULTI_INPUT and len(data_inputs) != len(inputs):
            raise UnsupportedOperator(
                op_type, where, "only tensor-tensor operations are supported, not constants"
            )
        if op_type in _PASS_THROUGH or (op_type in _MULTI_INPUT and len(inputs) == 1):
            self._view(node.output[0], data_inputs[0])
            return
        if self._convert_view(node, attrs, data_inputs[0]):
            return
        for value in data_inputs:
            if value in self.grouped or value in self.channels_last or value in self.channels_swapped:
                layout = "a 5-D view of the channels" if value in self.grouped else "a channels-last tensor"
                raise UnsupportedOperator(
                    op_type,
                    where,
                    f"its input {value!r} is {layout}; only channel shuffles and channels-last layer "
                    "normalisations are supported",
                )
        if op_type == "ReduceMean":
            self._reduce_mean(node, attrs, data_inputs[0])
            return
        if op_type == "Split":
            self._split(node, attrs, data_inputs[0])
            return
        fields: dict[str, Any] = {}
        if op_type == "Conv":
            op = Op.CONV2D
            fields = self._window_fields(attrs)
            _require_symmetric(fields, attrs)
            fields["groups"] = attrs.get_int("group", 1)
            fields["bias"] = len(node.input) > 2 and bool(node.input[2])
        elif op_type in _UNARY:
            op = _UNARY[op_type]
            if op_type == "BatchNormalization" and attrs.get_int("spatial", 1) != 1:
                raise UnsupportedOperator(
                    op_type,
                    where,
                    f"spatial=0 (one statistic per activation, opset {self.opset}) is not supported",
                )
        elif op_type == "Clip":
            low, high = self._clip_bounds(node, attrs)
            if (low, high) != (0.0, 6.0):
                raise UnsupportedOperator(
                    "Clip", where, f"only Clip(0, 6) (relu6) is supported, got ({low}, {high})"
                )
            op = Op.RELU6
        elif op_type in ("Add", "Mul", "Sum"):
            op = Op.MUL if op_type == "Mul" else Op.ADD
            data_inputs.sort(key=lambda v: -_numel(self._shape(v, node)))
            if op is Op.MUL and len(data_inputs) == 2:
                for source, gate in (data_inputs, data_inputs[::-1]):
                    gated = self._gated(gate, source)
                    if gated is not None:
                        op, data_inputs = gated, [source]
                        break
        elif op_type == "Concat":
            axis = attrs.get_int("axis", 0)
            if axis != 1:
                raise UnsupportedOperator("Concat", where, f"only axis=1 is supported, got {axis}")
            op = Op.CONCAT
            fields["in_channels"] = sum(self._layer_shape(v, node)[1] for v in data_inputs)
        elif op_type in ("MaxPool", "AveragePool"):
            op = Op.MAXPOOL2D if op_type == "MaxPool" else Op.AVGPOOL2D
            fields = self._pool_fields(node, attrs, op)
        elif op_type == "GlobalAveragePool":
            op = Op.ADAPTIVE_AVGPOOL2D
        elif op_type == "Flatten":
            if attrs.get_int("axis", 1) != 1:
                raise UnsupportedOperator("Flatten", where, "only axis=1 is supported")
            op = Op.FLATTEN
        elif op_type == "Reshape" and len(self._shape(node.output[0], node)) == 2:
            op = Op.FLATTEN
        elif op_type == "LRN":
            op = Op.LRN
            fields["kernel"] = (attrs.get_int("size", 0), 1)
        elif op_type == "Pad":
            op = Op.PAD
            fields["padding"] = self._pad_amounts(node, attrs)
        elif op_type == "Softmax":
            op = Op.SOFTMAX
            self._check_softmax(node, attrs, data_inputs[0])
        elif op_type == "Slice":
            op = Op.SLICE
            fields["channel_offset"] = self._slice_offset(node, attrs, data_inputs[0])
        elif op_type in ("Resize", "Upsample"):
            op = self._resize_op(node, attrs, data_inputs[0])
        elif op_type == "Gemm":
            if attrs.get_int("transA", 0) or not attrs.get_int("transB", 0):
                raise UnsupportedOperator(
                    "Gemm", where, "only Gemm(transA=0, transB=1) as exported for nn.Linear"
                )
            if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
                raise UnsupportedOperator("Gemm", where, "only alpha=beta=1 is supported")
            op = Op.LINEAR
            fields["bias"] = len(node.input) > 2 and bool(node.input[2])
        else:
            raise UnsupportedOperator(op_type, where)
        in_shape = self._layer_shape(data_inputs[0], node)
        out_shape = self._layer_shape(node.output[0], node)
        refs = [self.alias[v] for v in data_inputs]
        self.alias[node.output[0]] = self._add_layer(where, op, refs, in_shape, out_shape, fields)

    def _convert_affine(
        self, node: onnx.NodeProto, attrs: _Attributes, inputs: list[str], data_inputs: list[str]
    ) -> bool:
        """The steps of a decomposed GELU, MatMuls by weights and their bias Adds, per-channel scales."""
        op_type, where, out = node.op_type, _node_name(node), node.output[0]
        step = self._gelu_step(node, attrs, inputs, data_inputs)
        if step is not None:
            source, done = step
            if done < len(_GELU_STEPS):
                self.gelu[out] = (source, done)
            else:
                shape = self._ir_layer_shape(source, node)
                self.alias[out] = self._add_layer(where, Op.GELU, [self.alias[source]], shape, shape, {})
                if source in self.channels_last:
                    self.channels_last.add(out)
            return True
        for value in data_inputs:
            if value in self.gelu:
                raise UnsupportedOperator(
                    op_type, where, f"its input {value!r} is part of a GELU; only a whole GELU is supported"
                )
        if op_type == "Erf":
            raise UnsupportedOperator("Erf", where, "Erf is only supported as part of a GELU")
        if op_type in _UNARY and _UNARY[op_type] in ACTIVATIONS and data_inputs[0] in self.channels_last:
            shape = self._ir_layer_shape(data_inputs[0], node)
            self.alias[out] = self._add_layer(
                where, _UNARY[op_type], [self.alias[data_inputs[0]]], shape, shape, {}
            )
            self.channels_last.add(out)
            return True
        if len(inputs) != 2 or len(data_inputs) != 1:
            return False
        (source,) = data_inputs
        constant = next(v for v in inputs if v != source)
        if constant not in self.constants:
            return False
        dims = tuple(self.constants[constant].dims)
        if op_type == "MatMul" and inputs[0] == source and len(dims) == 2:
            shape = self._shape(source, node)
            if source in self.channels_last or len(shape) == 2:
                op = Op.CONV2D if source in self.channels_last else Op.LINEAR
                in_shape = self._ir_layer_shape(source, node)
                out_shape = (in_shape[0], dims[1], *in_shape[2:])
                name = self._add_layer(where, op, [self.alias[source]], in_shape, out_shape, {})
                self.alias[out] = name
                if source in self.channels_last:
                    self.channels_last.add(out)
                if self.consumers[out] == 1:
                    self.biasable[out] = name
                return True
        per_channel = self._per_channel(source, dims, node)
        if op_type == "Add" and source in self.biasable and per_channel:
            name = self.biasable.pop(source)
            layer = self.layer_by_name[name].model_copy(update={"bias": True})
            self.layers[self.layers.index(self.layer_by_name[name])] = layer
            self.layer_by_name[name] = layer
            self._view(out, source)
            return True
        if op_type == "Mul" and per_channel:  # a layer scale: one factor per channel
            shape = self._ir_layer_shape(source, node)
            self.alias[out] = self._add_layer(where, Op.BATCHNORM2D, [self.alias[source]], shape, shape, {})
            if source in self.channels_last:
                self.channels_last.add(out)
            return True
        return False

    def _gelu_step(
        self, node: onnx.NodeProto, attrs: _Attributes, inputs: list[str], data_inputs: list[str]
    ) -> tuple[str, int] | None:
        """(the GELU's input, steps done) when `node` is the next step of a decomposed GELU, else None."""
        op_type = node.op_type
        if op_type not in ("Div", "Erf", "Add", "Mul") or not 1 <= len(data_inputs) <= 2:
            return None
        partial = [v for v in data_inputs if v in self.gelu]
        if len(partial) != 1:
            if op_type == "Div" and len(data_inputs) == 1 and inputs[0] == data_inputs[0]:
                source = data_inputs[0]
                if source in self.alias and self._constant_operand_is(inputs[1], _GELU_STEPS[0][1], attrs):
                    return source, 1
            return None
        (value,) = partial
        source, done = self.gelu[value]
        if done >= len(_GELU_STEPS) or _GELU_STEPS[done][0] != op_type:
            return None
        expected = _GELU_STEPS[done][1]
        others = [v for v in inputs if v != value]
        if expected is None:
            if op_type == "Erf" or others == [source]:
                return source, done + 1
            return None
        if len(others) == 1 and self._constant_operand_is(others[0], expected, attrs):
            return source, done + 1
        return None

    def _constant_operand_is(self, value: str, expected: float | None, attrs: _Attributes) -> bool:
        if expected is None or value not in self.constants or _numel(tuple(self.constants[value].dims)) != 1:
            return False
        return abs(_constant_number(self.constants[value], attrs) - expected) < 1e-3

    def _per_channel(self, source: str, dims: tuple[int, ...], node: onnx.NodeProto) -> bool:
        """A constant of `dims` broadcasts one value per channel over `source`."""
        if source not in self.alias:
            return False
        channels = self._ir_layer_shape(source, node)[1]
        if source in self.channels_last:
            return dims in ((channels,), (1, 1, 1, channels))
        return len(self._shape(source, node)) == 4 and dims in ((channels, 1, 1), (1, channels, 1, 1))

    def _ir_layer_shape(self, value: str, node: onnx.NodeProto) -> tuple[int, ...]:
        """The (N, C, H, W) or (N, F) shape of a value, its channels-last layout put back."""
        shape = self._shape(value, node)
        if value in self.channels_last:
            return shape[0], shape[3], shape[1], shape[2]
        return self._layer_shape(value, node)

    def _view(self, value: str, source: str) -> None:
        """`value` holds what `source` holds, in the same layout."""
        if source in self.grouped:
            self.grouped[value] = self.grouped[source]
            return
        self.alias[value] = self.alias[source]
        if source in self.channels_last:
            self.channels_last.add(value)
        if source in self.channels_swapped:
            self.channels_swapped.add(value)

    def _convert_view(self, node: onnx.NodeProto, attrs: _Attributes, source: str) -> bool:
        """Reshapes and transposes of a channel shuffle, channels-last permutes and layer norms."""
        op_type, where = node.op_type, _node_name(node)
        out = node.output[0]
        if op_type == "Transpose":
            rank = len(self._shape(source, node))
            perm = tuple(attrs.get_axes("perm")) if "perm" in attrs else tuple(range(rank))[::-1]
            if source in self.grouped and perm == _SWAP_CHANNEL_GROUPS:
                tensor, groups, transposed = self.grouped[source]
                self.grouped[out] = (tensor, groups, not transposed)
            elif (
                source in self.alias
                and rank == 4
                and not (source in self.channels_last or source in self.channels_swapped)
                and perm == _TO_CHANNELS_LAST
            ):
                self.alias[out] = self.alias[source]
                self.channels_last.add(out)
            elif source in self.channels_last and perm == _TO_CHANNELS_FIRST:
                self.alias[out] = self.alias[source]
            elif source in self.alias and rank == 4 and perm == _SWAP_CHANNELS_AND_WIDTH:
                if source in self.channels_swapped:
                    self.alias[out] = self.alias[source]
                elif source not in self.channels_last:
                    self.alias[out] = self.alias[source]
                    self.channels_swapped.add(out)
                else:
                    raise UnsupportedOperator(op_type, where, "a transpose of a channels-last tensor")
            elif perm == tuple(range(rank)):
                self._view(out, source)
            else:
                raise UnsupportedOperator(
                    op_type,
                    where,
                    f"only (N, C, H, W) <-> (N, H, W, C) transposes and channel shuffles are supported, got perm {list(perm)}",
                )
            return True
        if op_type == "Reshape" and source in self.grouped:
            tensor, groups, transposed = self.grouped[source]
            out_shape = self._layer_shape(out, node)
            if len(out_shape) != 4:
                raise UnsupportedOperator(
                    op_type, where, "a 5-D view of the channels must be reshaped back to (N, C, H, W)"
                )
            if not transposed:
                self.alias[out] = tensor
            else:
                self.alias[out] = self._add_layer(
                    where, Op.CHANNEL_SHUFFLE, [tensor], out_shape, out_shape, {"groups": groups}
                )
            return True
        if op_type == "Reshape" and not (source in self.channels_last or source in self.channels_swapped):
            in_shape, out_shape = self._shape(source, node), self._shape(out, node)
            if in_shape == out_shape:
                self._view(out, source)
                return True
            if len(in_shape) == 4 and len(out_shape) == 5:
                n, c, h, w = in_shape
                if out_shape[0] == n and out_shape[3:] == (h, w) and out_shape[1] * out_shape[2] == c:
                    self.grouped[out] = (self.alias[source], out_shape[1], False)
                    return True
            if len(out_shape) != 2:
                raise UnsupportedOperator(
                    op_type,
                    where,
                    f"only a flatten or the reshapes of a channel shuffle are supported, got {in_shape} -> {out_shape}",
                )
            return False
        if op_type == "Softmax" and source in self.channels_swapped:
            shape = self._shape(source, node)
            if attrs.get_int("axis", -1 if self.opset >= 13 else 1) % 4 != 3:
                raise UnsupportedOperator(
                    op_type, where, "a softmax of a tensor with its channels last must run over the last axis"
                )
            swapped_back = (shape[0], shape[3], shape[2], shape[1])
            self.alias[out] = self._add_layer(
                where, Op.SOFTMAX, [self.alias[source]], swapped_back, swapped_back, {}
            )
            self.channels_swapped.add(out)
            return True
        if op_type == "LayerNormalization":
            shape = self._shape(source, node)
            axis = attrs.get_int("axis", -1) % max(len(shape), 1)
            channels_last = source in self.channels_last and axis == 3
            if not (channels_last or (len(shape) == 2 and source not in self.grouped and axis == 1)):
                raise UnsupportedOperator(
                    op_type,
                    where,
                    f"only a layer normalisation over the channels (of a channels-last map or of (N, F) "
                    f"features) is supported, got axis {attrs.get_int('axis', -1)} of {shape}",
                )
            ir_shape = self._ir_layer_shape(source, node)
            self.alias[out] = self._add_layer(
                where, Op.LAYERNORM, [self.alias[source]], ir_shape, ir_shape, {}
            )
            if channels_last:
                self.channels_last.add(out)
            return True
        return False

    def _split(self, node: onnx.NodeProto, attrs: _Attributes, source: str) -> None:
        """A split along channels: one slice layer per output that is used."""
        where = _node_name(node)
        shape = self._layer_shape(source, node)
        axis = attrs.get_int("axis", 0)
        if len(shape) != 4 or axis % 4 != 1:
            raise UnsupportedOperator(
                "Split", where, f"only a split along channels (axis 1) is supported, got axis {axis}"
            )
        offset = 0
        for index, out in enumerate(node.output):
            out_shape = self._layer_shape(out, node) if out else shape
            if out:
                self.alias[out] = self._add_layer(
                    f"{where}:{index}",
                    Op.SLICE,
                    [self.alias[source]],
                    shape,
                    out_shape,
                    {"channel_offset": offset},
                )
            offset += out_shape[1]

    def _pad_amounts(self, node: onnx.NodeProto, attrs: _Attributes) -> tuple[int, int]:
        """The (H, W) padding of a zero Pad of H and W, the same on both sides of each."""
        where = _node_name(node)
        mode = attrs.get_string("mode", "constant")
        if "pads" in attrs:  # before opset 11
            pads = tuple(attrs.by_name["pads"].ints)
            value = attrs.get_float("value", 0.0)
        else:
            pads = tuple(int(v) for v in self._constant_input(node, attrs, 1, "pads").ravel())
            has_value = len(node.input) > 2 and bool(node.input[2])
            value = (
                float(self._constant_input(node, attrs, 2, "constant_value").ravel()[0]) if has_value else 0.0
            )
            if len(node.input) > 3 and node.input[3]:
                raise UnsupportedOperator("Pad", where, "the axes input is not supported; pad all four axes")
        if mode != "constant" or value != 0.0:
            raise UnsupportedOperator(
                "Pad", where, f"only zero padding is supported, got mode={mode!r} value={value}"
            )
        if (
            len(pads) != 8
            or pads[:2] != (0, 0)
            or pads[4:6] != (0, 0)
            or pads[2:4] != pads[6:8]
            or min(pads) < 0
        ):
            raise UnsupportedOperator(
                "Pad",
                where,
                f"only the same padding on both sides of H and W is supported, got pads {list(pads)}",
            )
        return pads[2], pads[3]

    def _check_softmax(self, node: onnx.NodeProto, attrs: _Attributes, source: str) -> None:
        shape = self._layer_shape(source, node)
        axis = attrs.get_int("axis", -1 if self.opset >= 13 else 1) % len(shape)
        # Before opset 13 a softmax runs over all axes from `axis` on: over channels only when H = W = 1.
        over_channels = axis == 1 and (self.opset >= 13 or len(shape) == 2 or shape[2:] == (1, 1))
        if not over_channels:
            raise UnsupportedOperator(
                "Softmax",
                _node_name(node),
                f"only a softmax over channels (axis 1) is supported, got axis {attrs.get_int('axis', -1)} "
                f"of {shape} at opset {self.opset}",
            )

    def _slice_offset(self, node: onnx.NodeProto, attrs: _Attributes, source: str) -> int:
        """The first channel a Slice of channels reads; anything else is refused."""
        where = _node_name(node)
        in_shape = self._layer_shape(source, node)
        out_shape = self._layer_shape(node.output[0], node)
        if "starts" in attrs:  # before opset 10
            starts = list(attrs.by_name["starts"].ints)
            axes = list(attrs.by_name["axes"].ints) if "axes" in attrs else list(range(len(starts)))
            steps = [1] * len(starts)
        else:
            starts = [int(v) for v in self._constant_input(node, attrs, 1, "starts").ravel()]
            has_axes = len(node.input) > 3 and bool(node.input[3])
            has_steps = len(node.input) > 4 and bool(node.input[4])
            axes_values = (
                self._constant_input(node, attrs, 3, "axes").ravel() if has_axes else range(len(starts))
            )
            axes = [int(v) for v in axes_values]
            steps = (
                [int(v) for v in self._constant_input(node, attrs, 4, "steps").ravel()]
                if has_steps
                else [1] * len(starts)
            )
        rank = len(in_shape)
        channel_axes = [i for i, axis in enumerate(axes) if axis % rank == 1]
        only_channels = in_shape[0] == out_shape[0] and in_shape[2:] == out_shape[2:]
        if len(channel_axes) != 1 or not only_channels or steps[channel_axes[0]] != 1:
            raise UnsupportedOperator(
                "Slice",
                where,
                f"only a contiguous slice of the channels is supported, got {in_shape} -> {out_shape}",
            )
        start = starts[channel_axes[0]]
        start = start + in_shape[1] if start < 0 else start
        return min(max(start, 0), in_shape[1])

    def _resize_op(self, node: onnx.NodeProto, attrs: _Attributes, source: str) -> Op:
        where = _node_name(node)
        mode = attrs.get_string("mode", "nearest")
        in_shape = self._layer_shape(source, node)
        out_shape = self._layer_shape(node.output[0], node)
        if mode not in _RESIZE_MODES:
            raise UnsupportedOperator(
                node.op_type, where, f"only nearest and linear modes are supported, got {mode!r}"
            )
        integral = len(in_shape) == 4 and all(
            o % i == 0 for o, i in zip(out_shape[2:], in_shape[2:], strict=True)
        )
        if not integral or out_shape[:2] != in_shape[:2]:
            raise UnsupportedOperator(
                node.op_type,
                where,
                f"only integer upscaling of H and W is supported, got {in_shape} -> {out_shape}",
            )
        return _RESIZE_MODES[mode]

    def _constant_input(self, node: onnx.NodeProto, attrs: _Attributes, index: int, what: str) -> np.ndarray:
        """The values of the constant `index`-th input of a node (its `what`), at most MAX_RANK * 2 of them."""
        value = node.input[index] if len(node.input) > index else ""
        if value not in self.constants:
            raise UnsupportedOperator(node.op_type, attrs.where, f"the {what} must be a constant")
        values = _constant_values(self.constants[value], attrs)
        if values.size > 2 * MAX_RANK:
            raise UnsupportedOperator(node.op_type, attrs.where, f"the {what} {value!r} has too many values")
        return values

    def _add_layer(
        self,
        base_name: str,
        op: Op,
        inputs: list[str],
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        fields: dict[str, Any],
    ) -> str:
        """Append a layer named after `base_name` (made unique) taking the IR values `inputs`; its name."""
        layer_name = base_name
        k = 1
        while layer_name in self.used:
            layer_name = f"{base_name}:{k}"
            k += 1
        self.used.add(layer_name)
        in_channels = fields.pop("in_channels", in_shape[1])
        try:
            layer = Layer(
                name=layer_name,
                op=op,
                inputs=inputs,
                in_channels=in_channels,
                out_channels=out_shape[1],
                in_hw=_hw(in_shape, base_name),
                out_hw=_hw(out_shape, base_name),
                **fields,
            )
        except ValidationError as exc:
            raise architecture_error(exc) from exc
        self.layers.append(layer)
        self.layer_by_name[layer_name] = layer
        return layer_name

    def _reduce_mean(self, node: onnx.NodeProto, attrs: _Attributes, source: str) -> None:
        """A mean over H and W: adaptive average pooling, then a flatten when the reduced axes are dropped."""
        where = _node_name(node)
        shape = self._layer_shape(source, node)
        axes = self._reduce_axes(node, attrs)
        if len(shape) != 4 or axes is None or sorted(axis % 4 for axis in axes) != [2, 3]:
            shown = "all axes" if axes is None else f"axes {list(axes)}"
            raise UnsupportedOperator(
                "ReduceMean",
                where,
                f"only a mean over H and W (axes 2, 3) is supported, got {shown} of {shape}",
            )
        pooled_shape = (shape[0], shape[1], 1, 1)
        pooled = self._add_layer(where, Op.ADAPTIVE_AVGPOOL2D, [self.alias[source]], shape, pooled_shape, {})
        if attrs.get_int("keepdims", 1):
            self.alias[node.output[0]] = pooled
            return
        flat_shape = (shape[0], shape[1])
        self.alias[node.output[0]] = self._add_layer(
            f"{where}:flatten", Op.FLATTEN, [pooled], pooled_shape, flat_shape, {}
        )

    def _reduce_axes(self, node: onnx.NodeProto, attrs: _Attributes) -> tuple[int, ...] | None:
        """The axes a reduction runs over (an attribute before opset 18, an input from 18); None for all."""
        if len(node.input) > 1 and node.input[1]:
            axes = node.input[1]
            if axes not in self.constants:
                raise UnsupportedOperator(node.op_type, attrs.where, "the reduction axes must be a constant")
            values = _constant_values(self.constants[axes], attrs)
            if values.ndim != 1 or values.size > MAX_RANK:
                raise UnsupportedOperator(
                    node.op_type,
                    attrs.where,
                    f"the axes {axes!r} must be a list of at most {MAX_RANK} integers",
                )
            return tuple(int(axis) for axis in values)
        if "axes" in attrs:
            return attrs.get_axes("axes")
        if attrs.get_int("noop_with_empty_axes", 0):
            raise UnsupportedOperator(node.op_type, attrs.where, "a reduction over no axes is not supported")
        return None

    def _gated(self, gate: str, source: str) -> Op | None:
        """The activation `source * gate` computes when `gate` is a gate layer of `source`, else None."""
        layer = self.layer_by_name.get(self.alias[gate])
        if layer is None or layer.op not in _GATED or layer.inputs != [self.alias[source]]:
            return None
        return _GATED[layer.op]

    @staticmethod
    def _window_fields(attrs: _Attributes) -> dict[str, Any]:
        auto_pad = attrs.get_string("auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):
            raise UnsupportedOperator(
                attrs.op_type, attrs.where, f"auto_pad={auto_pad} is not supported; export explicit pads"
            )
        if "kernel_shape" not in attrs:
            raise UnsupportedOperator(
                attrs.op_type, attrs.where, "the kernel_shape attribute is missing; export it explicitly"
            )
        kernel = attrs.get_ints("kernel_shape", (), 2)
        pads = attrs.get_ints("pads", (0, 0, 0, 0), 4)
        return {
            "kernel": kernel,
            "stride": attrs.get_ints("strides", (1, 1), 2),
            "padding": pads[:2],
            "end_padding": pads[2:],
            "dilation": attrs.get_ints("dilations", (1, 1), 2),
        }

    def _pool_fields(self, node: onnx.NodeProto, attrs: _Attributes, op: Op) -> dict[str, Any]:
        fields = self._window_fields(attrs)
        fields["ceil_mode"] = bool(attrs.get_int("ceil_mode", 0))
        if op is Op.MAXPOOL2D and not fields["ceil_mode"] and fields["end_padding"] != fields["padding"]:
            # MaxPool has no ceil_mode before opset 10: exporters pad the end instead, which gives the
            # same windows and, for a maximum, the same values.
            in_hw = _hw(self._layer_shape(node.input[0], node), attrs.where)
            out_hw = _hw(self._layer_shape(node.output[0], node), attrs.where)
            window = (fields["kernel"], fields["stride"], fields["padding"], fields["dilation"])
            if conv_output_hw(in_hw, *window, ceil_mode=True) == out_hw:
                fields["ceil_mode"] = True
                fields["end_padding"] = fields["padding"]
        _require_symmetric(fields, attrs)
        if op is Op.AVGPOOL2D:
            fields.pop("dilation")
        return fields

    def _clip_bounds(self, node: onnx.NodeProto, attrs: _Attributes) -> tuple[float, float]:
        if "min" in attrs or "max" in attrs:  # opset < 11
            return attrs.get_float("min", float("-inf")), attrs.get_float("max", float("inf"))
        bounds = []
        for i, default in ((1, float("-inf")), (2, float("inf"))):
            if len(node.input) > i and node.input[i]:
                if node.input[i] not in self.constants:
                    raise UnsupportedOperator("Clip", attrs.where, "clip bounds must be constants")
                bounds.append(_constant_number(self.constants[node.input[i]], attrs))
            else:
                bounds.append(default)
        return bounds[0], bounds[1]


def _require_symmetric(fields: dict[str, Any], attrs: _Attributes) -> None:
    """Refuse a window padded differently at its end than at its start; drop the end padding."""
    end = fields.pop("end_padding")
    if end != fields["padding"]:
        pads = (*fields["padding"], *end)
        raise UnsupportedOperator(attrs.op_type, attrs.where, f"asymmetric padding {pads} is not supported")


def _constant_number(tensor: TensorProto, attrs: _Attributes) -> float:
    """The one number a constant tensor holds (an operand of the node `attrs` belong to)."""
    if _numel(tuple(tensor.dims)) != 1 or tensor.data_type == TensorProto.STRING:
        raise UnsupportedOperator(
            attrs.op_type, attrs.where, f"constant {tensor.name!r} must hold a single number"
        )
    return float(_constant_values(tensor, attrs).item())


def _constant_values(tensor: TensorProto, attrs: _Attributes) -> np.ndarray:
    """The numbers of a constant tensor (an operand of the node `attrs` belong to)."""
    try:
        values = numpy_helper.to_array(tensor)
        if values.dtype.kind not in "biuf":
            raise TypeError(f"elements of type {values.dtype} are not real numbers")
        return values
    except (ValueError, TypeError, KeyError) as exc:
        # Data that does not fit its declared shape, or an element type with no real number.
        raise InvalidArchitecture(
            f"ONNX constant {tensor.name!r} of node {attrs.where!r} cannot be read as a number: {exc}",
            {"node": attrs.where, "tensor": tensor.name},
        ) from exc


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
