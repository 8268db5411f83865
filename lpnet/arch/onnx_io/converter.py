"""A folded, shape-inferred graph converted node by node into IR layers, by the rule of each operator.

Self-attention subgraphs are found first (`attention`): each becomes one layer at its last node.
"""

from __future__ import annotations

import onnx
from pydantic import ValidationError

from lpnet.arch.ir import NETWORK_INPUT, Network, architecture_error
from lpnet.arch.onnx_io import affine, elementwise, normalisation, tokens, views, windows
from lpnet.arch.onnx_io.attention import add_attention_layer, find_attention
from lpnet.arch.onnx_io.conversion import Conversion, LayerRule, NodeRule
from lpnet.arch.onnx_io.nodes import Attributes, node_name
from lpnet.errors import InvalidArchitecture, UnsupportedOperator

_PASS_THROUGH = frozenset({"Identity", "Dropout"})
# Operators taking several tensors, none of which may be a constant.
_MULTI_INPUT = frozenset({"Add", "Mul", "Sum", "Concat"})
# Operators that view their input in another layout, or whose input's layout decides what they are.
_VIEW_RULES: dict[str, NodeRule] = {
    "Transpose": views.transpose,
    "Reshape": views.reshape,
    "Softmax": normalisation.softmax_of_swapped,
    "LayerNormalization": normalisation.layer_norm,
}
# Operators of (N, C, H, W) or (N, F) tensors that make several layers.
_MULTI_LAYER_RULES: dict[str, NodeRule] = {"ReduceMean": windows.reduce_mean, "Split": views.split}
# Operators of (N, C, H, W) or (N, F) tensors that make one layer.
_LAYER_RULES: dict[str, LayerRule] = {
    **dict.fromkeys(elementwise.ACTIVATIONS, elementwise.activation),
    **dict.fromkeys(("Add", "Mul", "Sum"), elementwise.add_or_mul),
    "Clip": elementwise.relu6,
    "Conv": windows.conv,
    "MaxPool": windows.pool,
    "AveragePool": windows.pool,
    "GlobalAveragePool": windows.global_pool,
    "Pad": windows.pad,
    "Resize": windows.resize,
    "Upsample": windows.resize,
    "Gemm": affine.gemm,
    "BatchNormalization": normalisation.batch_norm,
    "LRN": normalisation.lrn,
    "Softmax": normalisation.softmax,
    "Concat": views.concat,
    "Flatten": views.flatten,
    "Reshape": views.flatten,
    "Slice": views.slice_channels,
}
# Every operator the converter has a rule for.
SUPPORTED_OPS = frozenset(
    {*_PASS_THROUGH, *_VIEW_RULES, *_MULTI_LAYER_RULES, *_LAYER_RULES, *elementwise.GELU_OPS, "MatMul"}
)


class OnnxConverter(Conversion):
    """Converts a folded, shape-inferred graph node by node into IR layers."""

    def convert(self, name: str | None, family: str | None) -> Network:
        (graph_input,) = [v for v in self.graph.input if v.name not in self.initializers]
        self.alias[graph_input.name] = NETWORK_INPUT
        input_shape = self.shapes[graph_input.name]
        attention = find_attention(self)
        for index, node in enumerate(self.graph.node):
            if index in attention.ends:
                add_attention_layer(self, node, attention.ends[index])
            elif index not in attention.inner:
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

    def _drop_unused_gates(self) -> None:
        # A gate merged into a SiLU or HardSwish above has no consumer left.
        used = {ref for layer in self.layers for ref in layer.inputs}
        used |= {self.alias[v.name] for v in self.graph.output if v.name in self.alias}
        self.layers = [lay for lay in self.layers if lay.op not in elementwise.GATED or lay.name in used]

    def _convert_node(self, node: onnx.NodeProto) -> None:
        op_type = node.op_type
        where = node_name(node)
        attrs = Attributes(node, where)
        inputs = [v for v in node.input if v]
        data_inputs = [v for v in inputs if self.is_tensor(v)]
        if not data_inputs:
            raise UnsupportedOperator(op_type, where, "a node computing only on constants")
        if (
            elementwise.convert_gelu(self, node, attrs, inputs, data_inputs)
            or elementwise.convert_channels_last_activation(self, node, data_inputs)
            or affine.convert_affine(self, node, inputs, data_inputs)
            or tokens.convert_tokens(self, node, attrs, inputs, data_inputs)
            or elementwise.convert_channels_last_add(self, node, inputs, data_inputs)
        ):
            return
        if op_type in _MULTI_INPUT and len(data_inputs) != len(inputs):
            raise UnsupportedOperator(
                op_type, where, "only tensor-tensor operations are supported, not constants"
            )
        if op_type in _PASS_THROUGH or (op_type in _MULTI_INPUT and len(inputs) == 1):
            self.view(node.output[0], data_inputs[0])
            return
        view_rule = _VIEW_RULES.get(op_type)
        if view_rule is not None and view_rule(self, node, attrs, data_inputs[0]):
            return
        self._refuse_other_layouts(node, data_inputs)
        multi_layer_rule = _MULTI_LAYER_RULES.get(op_type)
        if multi_layer_rule is not None:
            multi_layer_rule(self, node, attrs, data_inputs[0])
            return
        rule = _LAYER_RULES.get(op_type)
        if rule is None:
            raise UnsupportedOperator(op_type, where)
        spec = rule(self, node, attrs, data_inputs)
        in_shape = self.layer_shape(spec.inputs[0], node)
        out_shape = self.layer_shape(node.output[0], node)
        refs = [self.alias[v] for v in spec.inputs]
        self.alias[node.output[0]] = self.add_layer(where, spec.op, refs, in_shape, out_shape, spec.fields)

    def _refuse_other_layouts(self, node: onnx.NodeProto, data_inputs: list[str]) -> None:
        """Refuse an input that is a channel shuffle's 5-D view or a permuted tensor."""
        for value in data_inputs:
            if value in self.grouped or self.is_permuted(value):
                layout = "a 5-D view of the channels" if value in self.grouped else "a channels-last tensor"
                raise UnsupportedOperator(
                    node.op_type,
                    node_name(node),
                    f"its input {value!r} is {layout}; only channel shuffles and channels-last layer "
                    "normalisations are supported",
                )
