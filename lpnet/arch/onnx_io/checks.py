"""Checks of a scanned model before shape inference: its opsets, its operators and its image input."""

from __future__ import annotations

import onnx
from onnx import TensorProto

from lpnet.arch.onnx_io.converter import ATTENTION_PATTERNS, SUPPORTED_OPS
from lpnet.arch.onnx_io.folding import FOLDABLE_OPS
from lpnet.arch.onnx_io.limits import MAX_OPSET, MIN_OPSET, check_tensor_shape
from lpnet.arch.onnx_io.nodes import DEFAULT_DOMAINS, enum_name, node_name
from lpnet.errors import InvalidArchitecture, LpnetError, UnsupportedOperator, UnsupportedOpset

_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})


def check_opsets(model: onnx.ModelProto) -> int:
    """The version of the default operator set the model imports, refusing any other domain or version."""
    default: int | None = None
    for opset in model.opset_import:
        if opset.domain not in DEFAULT_DOMAINS:
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


def check_operators(graph: onnx.GraphProto) -> None:
    """Refuse the first node that is neither converted nor folded, so shape inference never runs on it.

    In a graph with attention, that node is refused as attention: the export of a transformer whose
    attention is not the one the converter reads is named by what it is, whatever operators it uses.
    """
    for node in graph.node:
        problem = _unreadable(node)
        if problem is not None:
            _refuse_attention(graph, problem)
            raise problem


def _unreadable(node: onnx.NodeProto) -> LpnetError | None:
    """Why the converter can neither convert nor fold `node`, or None."""
    if not node.output or not node.output[0]:
        return InvalidArchitecture(
            f"ONNX {node.op_type} node {node.name!r} has no output",
            {"node": node.name, "op": node.op_type},
        )
    if node.domain not in DEFAULT_DOMAINS:
        return UnsupportedOperator(
            f"{node.domain}.{node.op_type}",
            node_name(node),
            "only operators of the default ONNX domain are supported",
        )
    if node.op_type not in SUPPORTED_OPS and node.op_type not in FOLDABLE_OPS:
        return UnsupportedOperator(node.op_type, node_name(node))
    return None


def _refuse_attention(graph: onnx.GraphProto, problem: LpnetError) -> None:
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
                node_name(node),
                f"a {node.op_type} of two computed tensors (attention) is read only inside "
                f"{ATTENTION_PATTERNS}, and this graph also has a node that is not read: "
                f"{problem.message}; trace the PyTorch model instead (its IR has `attention` layers)",
            ) from problem


def check_image_input(graph: onnx.GraphProto, initializers: set[str], batch_size: int) -> None:
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
        elem_type = enum_name(TensorProto.DataType, tensor_type.elem_type)
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
    check_tensor_shape(value)
