"""A folded, shape-inferred graph converted node by node into IR layers, by the rule of each operator.

Subgraphs read as one layer or one view are found first: self-attention (ViT's in `attention`,
Swin's in `shifted_windows`, MaxViT's in `partitions`, the IR's own module's in `built_attention`),
Swin's patch merging (the IR's own module's too), MaxViT's partitions and the read-out of a map's
first position (`tokens`). Each is converted at its last node, and its other nodes are skipped.
"""

from __future__ import annotations

from functools import partial

import onnx
from pydantic import ValidationError

from lpnet.arch.ir import NETWORK_INPUT, Network, architecture_error
from lpnet.arch.onnx_io import (
    affine,
    built_attention,
    elementwise,
    normalisation,
    partitions,
    shifted_windows,
    tokens,
    views,
    windows,
)
from lpnet.arch.onnx_io.attention import add_attention_layer, find_attention
from lpnet.arch.onnx_io.conversion import Conversion, LayerRule, NodeRule
from lpnet.arch.onnx_io.nodes import Attributes, node_name
from lpnet.arch.onnx_io.subgraphs import GraphIndex, Mismatch, SubgraphMatcher, Subgraphs
from lpnet.errors import InvalidArchitecture, UnsupportedOperator

_PASS_THROUGH = frozenset({"Identity", "Dropout"})
# Operators taking several tensors, none of which may be a constant.
_MULTI_INPUT = frozenset({"Add", "Mul", "Sum", "Concat"})
# Operators that view their input in another layout, or whose input's layout decides what they are.
_VIEW_RULES: dict[str, NodeRule] = {
    "Transpose": views.transpose,
    "Reshape": views.reshape,
    "Unsqueeze": views.unsqueeze,
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
# The attention subgraphs read as `attention` layers.
ATTENTION_PATTERNS = (
    "the self-attention of nn.MultiheadAttention (ViT's), Swin's shifted-window attention, MaxViT's "
    "attention or lpnet's own attention module as torch.onnx.export writes them"
)
# What the subgraphs that view their input in another layout (or merge its positions) are read as.
_PATCH_MERGING = (
    "strided slices of a map concatenated along its channels are read only as Swin's patch merging"
)
_PARTITION = (
    "a reshape of a 4-D tensor into 6 dimensions is read only as MaxViT's window partition or departition"
)
# Operators read inside the subgraphs of `find_subgraphs` (MatMul also as a product by a weight).
_SUBGRAPH_OPS = frozenset({"MatMul", "Einsum", "ReduceL2"})
# Every operator the converter has a rule for.
SUPPORTED_OPS = frozenset(
    {*_PASS_THROUGH, *_VIEW_RULES, *_MULTI_LAYER_RULES, *_LAYER_RULES, *elementwise.GELU_OPS, *_SUBGRAPH_OPS}
)


class OnnxConverter(Conversion):
    """Converts a folded, shape-inferred graph node by node into IR layers."""

    def convert(self, name: str | None, family: str | None) -> Network:
        (graph_input,) = [v for v in self.graph.input if v.name not in self.initializers]
        self.alias[graph_input.name] = NETWORK_INPUT
        input_shape = self.shapes[graph_input.name]
        subgraphs = find_subgraphs(self)
        for index, node in enumerate(self.graph.node):
            if index in subgraphs.ends:
                subgraphs.ends[index](self, node)
            elif index not in subgraphs.inner:
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


def find_subgraphs(state: Conversion) -> Subgraphs:
    """The subgraphs of the graph read as one layer or one view each.

    A MatMul or Einsum of two computed tensors outside them is refused as `attention`, naming why the
    attention around it does not match; a Concat of strided slices along the channels that is not
    Swin's patch merging, a reshape of a map into 6 dimensions that is not a MaxViT partition, or a
    Gather of a map along its rows that is not the read-out of its first position, is refused by its
    operator.
    """
    attention = find_attention(state)
    found = Subgraphs(inner=set(attention.inner))
    for end, matched in attention.ends.items():
        found.ends[end] = partial(add_attention_layer, attention=matched)
    index = GraphIndex(state.graph)
    for position, node in enumerate(state.graph.node):
        products = node.op_type in ("MatMul", "Einsum") and not any(v in state.constants for v in node.input)
        if found.claims(position) or not products:
            continue
        match: SubgraphMatcher = partitions.match_attention
        if node.op_type == "MatMul":
            built = built_attention.is_candidate(index, node)
            match = built_attention.match_attention if built else shifted_windows.match_attention
        try:
            found.add(match(state, index, position), state.graph)
        except Mismatch as exc:
            why = attention.failures.get(position, str(exc))
            raise UnsupportedOperator(
                "attention",
                node_name(node),
                f"a {node.op_type} of two computed tensors is read only inside {ATTENTION_PATTERNS}; "
                f"{why}; trace the PyTorch model instead (its IR has `attention` layers)",
            ) from exc
    for position, node in enumerate(state.graph.node):
        rule = _view_subgraph(state, index, node)
        if found.claims(position) or rule is None:
            continue
        match, what = rule
        try:
            found.add(match(state, index, position), state.graph)
        except Mismatch as exc:
            raise UnsupportedOperator(node.op_type, node_name(node), f"{what}: {exc}") from exc
    return found


def _view_subgraph(
    state: Conversion, index: GraphIndex, node: onnx.NodeProto
) -> tuple[SubgraphMatcher, str] | None:
    """The matcher of the subgraph `node` ends or starts, and what it reads: patch merging for a Concat
    of four slices of a 4-D tensor along its last axis (Swin's, channels last) or of four slices of H or
    W along axis 1 (the IR's module, channels first), a MaxViT partition or departition for a reshape of
    a 4-D tensor into 6 dimensions, the read-out of a map's first position for a Gather of a computed
    4-D tensor along axis 2; None for other nodes."""
    out_rank = len(state.shapes.get(node.output[0], ())) if node.output else 0
    in_rank = len(state.shapes.get(node.input[0], ())) if node.input else 0
    if node.op_type == "Concat" and out_rank == 4 and len(node.input) == 4:
        axis = Attributes(node, node_name(node)).get_int("axis", 0) % 4
        slices = [state.graph.node[index.producer[v]] for v in node.input if v in index.producer]
        sliced = len(slices) == 4 and all(found.op_type == "Slice" for found in slices)
        if sliced and (axis == 3 or (axis == 1 and all(_slices_positions(state, s) for s in slices))):
            return shifted_windows.match_patch_merging, _PATCH_MERGING
    if node.op_type == "Reshape" and out_rank == 6 and in_rank == 4:
        return partitions.match_partition, _PARTITION
    computed = bool(node.input) and node.input[0] not in state.constants
    if node.op_type == "Gather" and in_rank == 4 and computed:
        if Attributes(node, node_name(node)).get_int("axis", 0) % 4 == 2:
            return tokens.match_token_select, tokens.TOKEN_SELECT
    return None


def _slices_positions(state: Conversion, node: onnx.NodeProto) -> bool:
    """Whether the Slice `node` of an (N, C, H, W) tensor keeps its channels and takes part of H or W."""
    in_shape, out_shape = state.shapes.get(node.input[0], ()), state.shapes.get(node.output[0], ())
    return len(in_shape) == len(out_shape) == 4 and in_shape[:2] == out_shape[:2] and in_shape != out_shape
