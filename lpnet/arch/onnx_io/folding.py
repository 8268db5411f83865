"""Constants of a graph: weights kept as type and shape, shape inference, and folding of nodes that
compute only on constants."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference
from onnx.checker import ValidationError
from onnx.defs import SchemaError
from onnx.reference import ReferenceEvaluator
from onnx.shape_inference import InferenceError

from lpnet.arch.onnx_io.limits import (
    MAX_FOLDED_ELEMENTS,
    MAX_FOLDED_NODES,
    check_elements,
    check_limit,
    check_rank,
    numel,
)
from lpnet.arch.onnx_io.nodes import DEFAULT_DOMAINS, node_name
from lpnet.errors import InvalidArchitecture, LpnetError, UnsupportedOperator

# Operators folded into a constant when every input is a constant: what exporters use to prepare
# weights and to compute shapes, and what Swin computes its shifted windows' masks (ScatterND) and
# relative position biases with (Swin v2's with a small MLP on a constant table). Shape and Size also
# fold on a tensor whose shape is static. Anything else computing only on constants is refused by name.
FOLDABLE_OPS = frozenset(
    {"Constant", "ConstantOfShape", "Identity", "Dropout", "Cast", "CastLike", "Reshape", "Flatten"}
    | {"Squeeze", "Unsqueeze", "Transpose", "Expand", "Tile", "Concat", "Split", "Slice", "Gather"}
    | {"Shape", "Size", "Range", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Floor", "Ceil", "Sqrt"}
    | {"Reciprocal", "Pow", "Min", "Max", "Sum", "Mod", "Equal", "Less", "Greater", "Not", "Where"}
    | {"ReduceProd", "ScatterND", "MatMul", "Relu", "Sigmoid", "Exp", "Clip"}
)
_SHAPE_OPS = frozenset({"Shape", "Size"})


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every value's type and shape, propagating shape arithmetic on static shapes."""
    try:
        return shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except (InferenceError, ValueError, IndexError, OverflowError, RuntimeError) as exc:
        # InferenceError names what is wrong with the graph; the others are C++ standard exceptions
        # (length_error, out_of_range, ...) that onnx's inference code lets out on malformed nodes.
        raise InvalidArchitecture(f"ONNX shape inference failed: {exc}") from exc


def constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    return names | {s.values.name for s in graph.sparse_initializer}


def drop_weight_data(graph: onnx.GraphProto) -> None:
    """Keep only the type and shape of initializers and Constant values above MAX_FOLDED_ELEMENTS."""
    tensors = list(graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            tensors.extend(attr.t for attr in node.attribute if attr.HasField("t"))
    for tensor in tensors:
        if numel(tuple(tensor.dims)) > MAX_FOLDED_ELEMENTS:
            tensor.CopyFrom(TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims))


def static_dims(value_type: onnx.TypeProto) -> tuple[int, ...] | None:
    """The dimensions of a tensor type when every one of them is a known size, else None."""
    if value_type.WhichOneof("value") != "tensor_type" or not value_type.tensor_type.HasField("shape"):
        return None
    dims = value_type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


class ConstantFolder:
    """Replaces every node that computes only on constants by its results, kept as initializers.

    Each node's outputs are typed first, by onnx's shape inference of that node given its inputs'
    values, and checked against the tensor limits, so nothing is allocated for a result above them.
    Results of at most MAX_FOLDED_ELEMENTS elements computed from inputs with values are evaluated by
    onnx's reference evaluator; the others (weights cast, reshaped or filled in by ConstantOfShape)
    keep their type and shape only. Shape and Size of a tensor whose shape is static read that shape.
    A Constant node holding a tensor is that tensor, read without inference or evaluation. Nodes of one
    operator with the same attributes share one evaluator (exporters repeat the same Unsqueeze, Gather
    and Concat of shapes hundreds of times).
    The nodes that are kept are typed the same way, in graph order, so that a shape computed from the
    output of one of them (Swin's padding and window sizes, block after block) folds in the same pass.
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
            if numel(tuple(tensor.dims)) <= MAX_FOLDED_ELEMENTS
        }
        # An evaluator of one node by its operator, attributes and which inputs and outputs it has.
        self.evaluators: dict[tuple[object, ...], ReferenceEvaluator] = {}
        # The element type and dimensions of every tensor with a static shape.
        self.static_shapes: dict[str, tuple[int, tuple[int, ...]]] = {}
        for value in itertools.chain(self.graph.input, self.graph.value_info):
            dims = static_dims(value.type)
            if dims is not None:
                self.static_shapes[value.name] = (value.type.tensor_type.elem_type, dims)

    def fold(self) -> bool:
        """Fold the graph in place; True when at least one node was folded."""
        kept: list[onnx.NodeProto] = []
        folded: list[TensorProto] = []
        for count, node in enumerate(self.graph.node, start=1):
            if not self._is_foldable(node):
                kept.append(node)
                self._type_kept(node)
                continue
            subject = "the number of nodes computing only on constants"
            check_limit("folded_nodes", count - len(kept), MAX_FOLDED_NODES, subject)
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
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in FOLDABLE_OPS:
            return False
        inputs = [value for value in node.input if value]
        if node.op_type in _SHAPE_OPS:
            return bool(inputs) and (inputs[0] in self.constants or inputs[0] in self.static_shapes)
        return all(value in self.constants for value in inputs)

    def _fold(self, node: onnx.NodeProto) -> list[TensorProto]:
        held = self._held_tensor(node)
        if held is not None:
            return [held]
        inputs = [value for value in node.input if value]
        valued = {value: self.constants[value] for value in inputs if value in self.with_values}
        types = {value: helper.make_tensor_type_proto(*self._signature(value)) for value in inputs}
        outputs = self._output_types(node, types, valued)
        computable = node.op_type in _SHAPE_OPS or all(value in valued for value in inputs)
        if computable and all(numel(dims) <= MAX_FOLDED_ELEMENTS for _, dims in outputs.values()):
            results = self._evaluate(node, outputs, valued)
            self.with_values.update(tensor.name for tensor in results)
            return results
        return [TensorProto(name=out, data_type=elem, dims=dims) for out, (elem, dims) in outputs.items()]

    def _held_tensor(self, node: onnx.NodeProto) -> TensorProto | None:
        """The tensor a Constant node holds in its `value` attribute, named as its output; None for other
        nodes and other forms of Constant, which are inferred and evaluated."""
        attrs = node.attribute
        if node.op_type != "Constant" or len(attrs) != 1 or attrs[0].name != "value" or len(node.output) != 1:
            return None
        held = attrs[0].t
        if held.data_type == TensorProto.UNDEFINED or held.data_location == TensorProto.EXTERNAL:
            return None
        where, out, dims = node_name(node), node.output[0], tuple(held.dims)
        subject = f"constant {out!r} computed by node {where!r}"
        check_rank(len(dims), subject)
        check_elements(dims, subject)
        if numel(dims) > MAX_FOLDED_ELEMENTS:  # its data was dropped with the weights'
            return TensorProto(name=out, data_type=held.data_type, dims=dims)
        try:
            tensor = numpy_helper.from_array(numpy_helper.to_array(held), out)
        except Exception as exc:  # data that does not fit its declared type and shape
            raise InvalidArchitecture(
                f"ONNX constant node {where!r} (Constant) could not be evaluated: {exc}",
                {"node": where, "op": node.op_type},
            ) from exc
        self.with_values.add(out)
        return tensor

    def _type_kept(self, node: onnx.NodeProto) -> None:
        """Record the static shapes of a kept node's outputs when its inputs' shapes are static.

        A node onnx cannot type is left untyped: the shape inference of the whole graph after this
        pass reports what is wrong with it.
        """
        inputs = [value for value in node.input if value]
        outputs = [out for out in node.output if out and out not in self.static_shapes]
        if not outputs or not all(v in self.constants or v in self.static_shapes for v in inputs):
            return
        valued = {value: self.constants[value] for value in inputs if value in self.with_values}
        types = {value: helper.make_tensor_type_proto(*self._signature(value)) for value in inputs}
        try:
            inferred = self._infer(node, types, valued)
        except LpnetError:
            return
        for out in outputs:
            dims = static_dims(inferred[out]) if out in inferred else None
            if dims is not None and inferred[out].tensor_type.elem_type:
                self.static_shapes[out] = (inferred[out].tensor_type.elem_type, dims)

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
        where = node_name(node)
        inferred = self._infer(node, types, valued)
        outputs = {}
        for out in filter(None, node.output):
            dims = static_dims(inferred[out]) if out in inferred else None
            if dims is None or not inferred[out].tensor_type.elem_type:
                raise UnsupportedOperator(
                    node.op_type, where, f"the shape of the constant {out!r} it computes cannot be inferred"
                )
            subject = f"constant {out!r} computed by node {where!r}"
            check_rank(len(dims), subject)
            check_elements(dims, subject)
            outputs[out] = (inferred[out].tensor_type.elem_type, dims)
        return outputs

    def _infer(
        self, node: onnx.NodeProto, types: dict[str, onnx.TypeProto], valued: dict[str, TensorProto]
    ) -> dict[str, onnx.TypeProto]:
        """The types onnx's shape inference gives the outputs of `node`, given its inputs' types and values."""
        where = node_name(node)
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, "")
        except SchemaError as exc:
            raise UnsupportedOperator(
                node.op_type, where, f"the operator is not part of opset {self.opset}"
            ) from exc
        try:
            return dict(
                shape_inference.infer_node_outputs(
                    schema, node, types, valued, opset_imports=[helper.make_opsetid("", self.opset)]
                )
            )
        except (InferenceError, ValidationError, ValueError, IndexError, OverflowError, RuntimeError) as exc:
            raise InvalidArchitecture(
                f"ONNX shape inference failed on node {where!r} ({node.op_type}): {exc}",
                {"node": where, "op": node.op_type},
            ) from exc

    def _evaluate(
        self,
        node: onnx.NodeProto,
        outputs: dict[str, tuple[int, tuple[int, ...]]],
        valued: dict[str, TensorProto],
    ) -> list[TensorProto]:
        """Run `node` with onnx's reference evaluator; every output is within MAX_FOLDED_ELEMENTS."""
        where = node_name(node)
        try:
            evaluator = self._evaluator(node)
            feeds = {f"i{k}": self._feed(value, valued) for k, value in enumerate(node.input) if value}
            # Overflow or division by zero is the file's arithmetic, not an error of the reader: a
            # folded weight's values are never used, and a folded shape is checked where it is used.
            with np.errstate(all="ignore"):
                results = evaluator.run(None, feeds)
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

    def _evaluator(self, node: onnx.NodeProto) -> ReferenceEvaluator:
        """The evaluator of `node` with its inputs and outputs renamed by position (i0, i1, ... and o0,
        o1, ...), shared by the nodes of the same operator, attributes and present inputs and outputs."""
        inputs = [f"i{k}" if value else "" for k, value in enumerate(node.input)]
        outputs = [f"o{k}" if out else "" for k, out in enumerate(node.output)]
        attributes = tuple(attr.SerializeToString(deterministic=True) for attr in node.attribute)
        key = (node.op_type, node.domain, attributes, tuple(inputs), tuple(outputs))
        if key not in self.evaluators:
            renamed = helper.make_node(node.op_type, inputs, outputs, domain=node.domain)
            renamed.attribute.extend(node.attribute)
            untyped = onnx.TypeProto()
            graph = helper.make_graph(
                [renamed],
                "fold",
                [helper.make_value_info(value, untyped) for value in inputs if value],
                [helper.make_value_info(out, untyped) for out in outputs if out],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
            self.evaluators[key] = ReferenceEvaluator(model)
        return self.evaluators[key]

    def _feed(self, value: str, valued: dict[str, TensorProto]) -> np.ndarray:
        if value in valued:
            return numpy_helper.to_array(valued[value])
        # The tensor a Shape or Size node reads, as a view of one element: its shape without its memory.
        elem, dims = self._signature(value)
        return np.broadcast_to(np.zeros((), helper.tensor_dtype_to_np_dtype(elem)), dims)
