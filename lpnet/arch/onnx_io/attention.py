"""Self-attention as torch.onnx.export writes nn.MultiheadAttention (ViT's): one `attention` layer.

For a (N, L, C) sequence x of L tokens of C features, and h heads of d = C / h features, the
exported subgraph is:

    Transpose(x, 1 0 2)                                    (L, N, C)
    MatMul by W_qkv, Add of b_qkv                          (L, N, 3C)
    Reshape, Unsqueeze, Transpose(3 1 2 0 4), Squeeze      (3, L, N, C)
    Gather(0), Gather(1), Gather(2) on axis 0: q, k, v     (L, N, C) each
    each: Reshape, Transpose(1 0 2), Reshape               (N, h, L, d)
    k: Transpose(0 1 3 2)                                  (N, h, d, L)
    q and k: Mul by constants whose product is 1 / sqrt(d)
    MatMul(q, k), Softmax over the last axis, MatMul by v  (N, h, L, d)
    Transpose(2 0 1 3), Reshape                            (L N, C)
    Gemm by W_out (transB=1) and b_out                     (L N, C)
    Reshape, Transpose(1 0 2)                              (N, L, C)

Without biases, the projections are MatMuls alone. A sequence held as (N, C, L) before or after the
attention has its own transpose merged into the first or the last one: Transpose(x, 2 0 1), or
Transpose(1 2 0) back to (N, C, L). Identity and Dropout nodes may sit anywhere in it. Before any node is converted, `find_attention`
follows every such subgraph from its first Transpose, checking each node's operator, attributes,
constants and output shape against the pattern and that no value inside it is used outside it. For a
product of two computed tensors outside a complete match, it tells why the candidate it is computed
from does not match: the converter refuses such a product by name (`attention`) when no other
attention pattern reads it, so a graph that resembles attention is never read as something else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NoReturn

import onnx

from lpnet.arch.ir import Op
from lpnet.arch.onnx_io.conversion import Conversion
from lpnet.arch.onnx_io.nodes import Attributes, constant_number, node_name, node_scope
from lpnet.errors import UnsupportedOperator

_SEQUENCE_FIRST = (1, 0, 2)
# The first Transpose puts the tokens first, and the last one puts them back: by its perm, whether the
# sequence is (N, L, C) (channels last) or (N, C, L) (the exporter merges a transpose next to the
# attention into its own).
_STARTS = {_SEQUENCE_FIRST: True, (2, 0, 1): False}
_ENDS = {_SEQUENCE_FIRST: True, (1, 2, 0): False}
_PASS_THROUGH = frozenset({"Identity", "Dropout"})
# Steps that only move data: (stage, operator) -> (the stage of their output, the Transpose's perm).
_MOVES: dict[tuple[str, str], tuple[str, tuple[int, ...] | None]] = {
    ("qkv_product", "Reshape"): ("qkv_split", None),  # projections without biases
    ("qkv", "Reshape"): ("qkv_split", None),
    ("qkv_split", "Unsqueeze"): ("qkv_unsqueezed", None),
    ("qkv_unsqueezed", "Transpose"): ("qkv_moved", (3, 1, 2, 0, 4)),
    ("qkv_moved", "Squeeze"): ("qkv_stacked", None),
    ("heads_sequence_first", "Transpose"): ("heads_flat", _SEQUENCE_FIRST),
    ("heads_flat", "Reshape"): ("heads", None),
    ("context", "Transpose"): ("context_sequence_first", (2, 0, 1, 3)),
    ("context_sequence_first", "Reshape"): ("context_flat", None),
    ("output_flat", "Reshape"): ("output_sequence_first", None),
}
_ROLES = ("q", "k", "v")
_SCALE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class _Part:
    """A value inside an exported self-attention: how far through the pattern it is."""

    origin: str  # the output of the Transpose starting the attention
    stage: str
    role: str = ""  # q, k or v, from the split of the projection on
    heads: int = 0
    scale: float = 1.0  # the product of the constants q or k was multiplied by


@dataclass
class _Attention:
    """One self-attention followed from its first node."""

    source: str  # the token sequence it reads
    source_channels_last: bool  # whether `source` is (N, L, C), not (N, C, L)
    name: str  # its layer's name
    shape: tuple[int, int, int]  # (N, L, C)
    output_channels_last: bool = True
    nodes: list[int] = field(default_factory=list)  # indices of its nodes in the graph
    bias: bool = False
    heads: int = 0  # known once it is complete
    failure: str = ""  # why it does not match the pattern, naming the node
    end: int = -1  # the index of its last node, once it is complete


@dataclass
class FoundAttention:
    """The self-attentions of a graph: their nodes, the last node of each, which makes its layer, and
    why the candidates that do not match differ from the pattern, by the products computed from them."""

    inner: set[int] = field(default_factory=set)
    ends: dict[int, _Attention] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)


class _Mismatch(Exception):
    """A node that does not continue the pattern of the attention it reads."""


class _Matcher:
    """Follows every candidate self-attention of a graph through the pattern, node by node."""

    def __init__(self, state: Conversion) -> None:
        self.state = state
        self.parts: dict[str, _Part] = {}
        self.attentions: dict[str, _Attention] = {}
        self.outputs = {value.name for value in state.graph.output}

    def run(self) -> FoundAttention:
        for index, node in enumerate(self.state.graph.node):
            read = [value for value in node.input if value in self.parts]
            if not read and not self._start(node):
                continue
            origin = self.parts[read[0]].origin if read else node.output[0]
            attention = self.attentions[origin]
            if not attention.failure:
                attention.failure = self._follow(node, read, attention)
            if attention.failure:
                # Off the pattern, or computed from a node that is: it starts no other attention.
                self.parts.update((out, _Part(origin, "failed")) for out in node.output if out)
                continue
            attention.nodes.append(index)
            if attention.heads and attention.end < 0:  # the step that completed it
                attention.end = index
        found = FoundAttention(failures=self._failures())
        for attention in self._matched():
            found.inner.update(index for index in attention.nodes if index != attention.end)
            found.ends[attention.end] = attention
        return found

    def _matched(self) -> list[_Attention]:
        return [a for a in self.attentions.values() if a.end >= 0 and not a.failure]

    def _start(self, node: onnx.NodeProto) -> bool:
        """Whether `node` starts an attention: a Transpose putting the tokens of a sequence first."""
        shape = self.state.shapes.get(node.input[0], ()) if node.input else ()
        if node.op_type != "Transpose" or len(shape) != 3:
            return False
        attrs = Attributes(node, node_name(node))
        perm = attrs.get_axes("perm") if "perm" in attrs else ()
        if perm not in _STARTS:
            return False
        channels_last = _STARTS[perm]
        n, length, channels = shape if channels_last else (shape[0], shape[2], shape[1])
        attention = _Attention(node.input[0], channels_last, node_scope(node), (n, length, channels))
        self.attentions[node.output[0]] = attention
        return True

    def _follow(self, node: onnx.NodeProto, read: list[str], attention: _Attention) -> str:
        """Check `node` as the next step of `attention`: why it is not, or "" when it is."""
        try:
            if read:
                self._step(node, read, attention)
            else:
                n, length, channels = attention.shape
                self._record(node, _Part(node.output[0], "sequence_first"), (length, n, channels))
        except _Mismatch as exc:
            return str(exc)
        except UnsupportedOperator as exc:  # a constant operand that is not one number
            return exc.message
        return ""

    def _failures(self) -> dict[int, str]:
        """Why the attention a MatMul outside a complete match reads from does not match, by its index."""
        matched = {index for attention in self._matched() for index in attention.nodes}
        failures = {}
        for index, node in enumerate(self.state.graph.node):
            origins = [self.parts[value].origin for value in node.input if value in self.parts]
            why = [self.attentions[origin].failure for origin in origins if self.attentions[origin].failure]
            if node.op_type == "MatMul" and index not in matched and why:
                failures[index] = why[0]
        return failures

    def _record(self, node: onnx.NodeProto, part: _Part, expected: tuple[int, ...]) -> None:
        """`node`'s output is `part`, of the shape the pattern expects, used by as many nodes as it expects."""
        out = node.output[0] if node.output else ""
        shape = self.state.shapes.get(out)
        if shape != expected:
            self._refuse(node, f"its output has shape {shape}, expected {expected}")
        users = 3 if part.stage == "qkv_stacked" else 1
        if self.state.consumers[out] != users or out in self.outputs:
            self._refuse(node, f"its output {out!r} is used outside the attention")
        self.parts[out] = part

    @staticmethod
    def _refuse(node: onnx.NodeProto, problem: str) -> NoReturn:
        raise _Mismatch(f"the self-attention around it does not match at node {node_name(node)!r}: {problem}")

    def _step(self, node: onnx.NodeProto, read: list[str], attention: _Attention) -> None:
        """Check `node` as the next step of the pattern for the parts it reads, and record its output."""
        part = self.parts[read[0]]
        n, length, channels = attention.shape
        heads = part.heads or 1
        head_features = channels // heads
        attrs = Attributes(node, node_name(node))
        op_type = node.op_type
        move = _MOVES.get((part.stage, op_type))
        if op_type in _PASS_THROUGH:
            self._record(node, part, self.state.shapes.get(read[0], ()))
        elif move is not None:
            stage, perm = move
            if perm is not None and ("perm" not in attrs or attrs.get_axes("perm") != perm):
                self._refuse(node, f"expected a Transpose with perm {list(perm)}")
            shapes = {
                "qkv_split": (length, n, 3, channels),
                "qkv_unsqueezed": (1, length, n, 3, channels),
                "qkv_moved": (3, length, n, 1, channels),
                "qkv_stacked": (3, length, n, channels),
                "heads_flat": (n * heads, length, head_features),
                "heads": (n, heads, length, head_features),
                "context_sequence_first": (length, n, heads, head_features),
                "context_flat": (length * n, channels),
                "output_sequence_first": (length, n, channels),
            }
            self._record(node, replace(part, stage=stage), shapes[stage])
        elif part.stage == "sequence_first" and op_type == "MatMul":
            self._weight(node, read, (channels, 3 * channels))
            self._record(node, replace(part, stage="qkv_product"), (length, n, 3 * channels))
        elif part.stage == "qkv_product" and op_type == "Add":
            self._weight(node, read, (3 * channels,))
            attention.bias = True
            self._record(node, replace(part, stage="qkv"), (length, n, 3 * channels))
        elif part.stage == "qkv_stacked" and op_type == "Gather":
            self._split(node, attrs, part, (length, n, channels))
        elif part.stage == "projection" and op_type == "Reshape":
            self._split_heads(node, part, attention)
        else:
            self._attend(node, attrs, read, attention)

    def _attend(
        self, node: onnx.NodeProto, attrs: Attributes, read: list[str], attention: _Attention
    ) -> None:
        """The steps from the heads to the output: scaling, scores, softmax, context, output projection."""
        part = self.parts[read[0]]
        n, length, channels = attention.shape
        heads, op_type = part.heads, node.op_type
        head_features = channels // max(heads, 1)
        if part.stage == "heads" and part.role == "k" and op_type == "Transpose":
            if "perm" not in attrs or attrs.get_axes("perm") != (0, 1, 3, 2):
                self._refuse(node, "expected the keys transposed with perm [0, 1, 3, 2]")
            self._record(node, replace(part, stage="keys_transposed"), (n, heads, head_features, length))
        elif op_type == "Mul" and (part.stage, part.role) in (("heads", "q"), ("keys_transposed", "k")):
            factor = self._scalar_operand(node, attrs, read[0])
            shape = self.state.shapes.get(read[0], ())
            self._record(node, replace(part, stage="scaled", scale=part.scale * factor), shape)
        elif op_type == "MatMul" and (part.stage, part.role) == ("scaled", "q"):
            keys = self._other_part(node, read, "scaled", "k")
            expected_scale = head_features**-0.5
            if abs(part.scale * keys.scale - expected_scale) > _SCALE_TOLERANCE * expected_scale:
                self._refuse(
                    node,
                    f"the scores are scaled by {part.scale * keys.scale}, expected 1 / sqrt({head_features})",
                )
            self._record(node, replace(part, stage="scores", role=""), (n, heads, length, length))
        elif op_type == "Softmax" and part.stage == "scores":
            axis = attrs.get_int("axis", -1 if self.state.opset >= 13 else 1)
            if axis % 4 != 3:
                self._refuse(node, f"expected a softmax over the last axis, got axis {axis}")
            self._record(node, replace(part, stage="weights"), (n, heads, length, length))
        elif op_type == "MatMul" and part.stage == "weights":
            self._other_part(node, read, "heads", "v")
            self._record(node, replace(part, stage="context"), (n, heads, length, head_features))
        elif op_type in ("Gemm", "MatMul") and part.stage == "context_flat":
            self._output_projection(node, attrs, read, attention)
            self._record(node, replace(part, stage="output_flat"), (length * n, channels))
        elif op_type == "Transpose" and part.stage == "output_sequence_first":
            perm = attrs.get_axes("perm") if "perm" in attrs else ()
            if perm not in _ENDS:
                self._refuse(node, f"expected a Transpose with perm {[list(end) for end in _ENDS]}")
            tokens_last = (n, length, channels) if _ENDS[perm] else (n, channels, length)
            if self.state.shapes.get(node.output[0]) != tokens_last:
                self._refuse(node, f"its output must be the token sequence {tokens_last}")
            attention.heads, attention.output_channels_last = heads, _ENDS[perm]
        else:
            stage = f"{part.role} {part.stage}" if part.role else part.stage
            self._refuse(node, f"a {op_type} of {read[0]!r} ({stage}) is not the next step of the pattern")

    def _weight(self, node: onnx.NodeProto, read: list[str], dims: tuple[int, ...]) -> None:
        """`node` takes the part it reads first and, second, a constant of `dims` (a MatMul's weight)."""
        others = [value for value in node.input if value and value not in read]
        if node.op_type == "MatMul" and node.input[0] != read[0]:
            self._refuse(node, "the projection must multiply the tokens by the weight, in that order")
        if len(read) != 1 or len(others) != 1 or others[0] not in self.state.constants:
            self._refuse(node, "expected one constant operand")
        found = tuple(self.state.constants[others[0]].dims)
        if found != dims:
            self._refuse(node, f"its constant has shape {found}, expected {dims}")

    def _split(self, node: onnx.NodeProto, attrs: Attributes, part: _Part, shape: tuple[int, ...]) -> None:
        """A Gather of q, k or v from the stacked projections."""
        if attrs.get_int("axis", 0) != 0 or len(node.input) != 2 or node.input[1] not in self.state.constants:
            self._refuse(node, "expected a Gather of a constant index on axis 0")
        index = constant_number(self.state.constants[node.input[1]], attrs)
        if index not in (0, 1, 2):
            self._refuse(node, f"expected index 0, 1 or 2, got {index}")
        self._record(node, replace(part, stage="projection", role=_ROLES[int(index)]), shape)

    def _split_heads(self, node: onnx.NodeProto, part: _Part, attention: _Attention) -> None:
        """The reshape of q, k or v into heads: (L, N, C) to (L, N h, d), which tells h."""
        n, length, channels = attention.shape
        out = self.state.shapes.get(node.output[0], ())
        if len(out) != 3 or out[0] != length or out[1] % n or (out[1] // n) * out[2] != channels:
            self._refuse(node, f"expected the reshape of {(length, n, channels)} into heads, got {out}")
        heads = out[1] // n
        self._record(node, replace(part, stage="heads_sequence_first", heads=heads), out)

    def _scalar_operand(self, node: onnx.NodeProto, attrs: Attributes, value: str) -> float:
        others = [other for other in node.input if other != value]
        if len(node.input) != 2 or len(others) != 1 or others[0] not in self.state.constants:
            self._refuse(node, "expected a multiplication by a constant")
        return constant_number(self.state.constants[others[0]], attrs)

    def _other_part(self, node: onnx.NodeProto, read: list[str], stage: str, role: str) -> _Part:
        """The second operand of a product of two parts: at `stage` with `role`, of the same attention."""
        first = self.parts[read[0]]
        second = self.parts.get(node.input[1]) if len(node.input) == 2 else None
        if (
            node.input[0] != read[0]
            or second is None
            or (second.origin, second.stage, second.role) != (first.origin, stage, role)
            or second.heads != first.heads
        ):
            self._refuse(
                node, f"expected the product of the {first.stage} and the {role} {stage} of one attention"
            )
        return second

    def _output_projection(
        self, node: onnx.NodeProto, attrs: Attributes, read: list[str], attention: _Attention
    ) -> None:
        """Gemm as exported for nn.Linear, or, without biases, a MatMul by the transposed weight."""
        channels = attention.shape[2]
        if node.op_type == "MatMul":
            if attention.bias:
                self._refuse(node, "the input and output projections must both have biases or both have none")
            self._weight(node, read, (channels, channels))
            return
        plain = attrs.get_int("transA", 0) == 0 and attrs.get_int("transB", 0) == 1
        if not plain or attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            self._refuse(node, "expected Gemm(transA=0, transB=1, alpha=beta=1) as exported for nn.Linear")
        weight = node.input[1] if len(node.input) > 1 else ""
        bias = node.input[2] if len(node.input) > 2 else ""
        if weight not in self.state.constants or tuple(self.state.constants[weight].dims) != (
            channels,
            channels,
        ):
            self._refuse(node, f"expected a constant weight of shape {(channels, channels)}")
        if bool(bias) != attention.bias:
            self._refuse(node, "the input and output projections must both have biases or both have none")
        if bias and (
            bias not in self.state.constants or tuple(self.state.constants[bias].dims) != (channels,)
        ):
            self._refuse(node, f"expected a constant bias of shape {(channels,)}")


def find_attention(state: Conversion) -> FoundAttention:
    """The self-attentions of the graph, and why the candidates that do not match differ from the pattern."""
    return _Matcher(state).run()


def add_attention_layer(state: Conversion, node: onnx.NodeProto, attention: _Attention) -> None:
    """The `attention` layer of a matched self-attention, made at its last node."""
    source = attention.source
    if source not in state.alias or (source in state.channels_last) != attention.source_channels_last:
        layout = "(N, L, C)" if attention.source_channels_last else "(N, C, L)"
        raise UnsupportedOperator(
            "attention", attention.name, f"its input {source!r} must be a {layout} token sequence"
        )
    n, length, channels = attention.shape
    shape = (n, channels, 1, length)
    fields = {"groups": attention.heads, "kernel": (1, length), "bias": attention.bias}
    out = node.output[0]
    state.alias[out] = state.add_layer(
        attention.name, Op.ATTENTION, [state.alias[source]], shape, shape, fields
    )
    if attention.output_channels_last:
        state.channels_last.add(out)
